"""User errors: one paragraph naming the file or flag and a fix that works when followed.

Library code raises :class:`UsageError` (or its own subclasses of it) and plain ``OSError``s that
carry a file name; :func:`describe_os_error` turns the latter into the paragraph the scripts print.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


class UsageError(RuntimeError):
    """Bad input or an unusable path: the message names it and says what to do."""


_ALREADY_WRITTEN = "Files already written are complete (every file is written to a temporary name, then renamed)."


def describe_os_error(error: OSError) -> str:
    """One paragraph for an OS error met while reading or writing a file."""
    path = error.filename if error.filename is not None else "a file"
    reason = error.strerror or str(error)
    code = error.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return (f"no space left on the device while writing {path}. Free space on that disk (df -h "
                f"{Path(str(path)).parent}) or point the output flag at another disk, then run the same command "
                f"again. {_ALREADY_WRITTEN}")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"permission denied for {path} ({reason}): make it writable (or readable) for this user, or "
                f"choose another folder with the corresponding flag.")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return (f"{path} is a file where a folder is needed ({reason}): choose another path, or move that "
                f"file away.")
    if code == errno.EISDIR:
        return f"{path} is a folder where a file is needed: pass the file's path instead."
    if code == errno.ENOENT:
        return f"{path} does not exist: check the path you passed."
    return f"cannot use {path}: {reason}. Check the path and the disk, then run the same command again."


def writable_folder(path, flag: str) -> Path:
    """Create ``path`` if needed and prove that files can be created in it, before any long work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write_test.", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        where = f" at {error.filename}" if error.filename and Path(str(error.filename)) != path else ""
        raise UsageError(f"{flag} {path}: cannot write there ({error.strerror or error}{where}). Pass {flag} a "
                         f"folder this user can write (it is created if missing), or fix that path: a file in "
                         f"the way, or missing permissions.") from None
    return path
