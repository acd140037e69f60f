"""User errors: one paragraph naming the file or flag and a fix that works when followed.

Library code raises :class:`UsageError` (or its own subclasses of it) and plain ``OSError``s that
carry a file name; :func:`describe_os_error` turns the latter into the paragraph the scripts print.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Optional


class UsageError(RuntimeError):
    """Bad input or an unusable path: the message names it and says what to do."""


_ALREADY_WRITTEN = "Files already written are complete (every file is written to a temporary name, then renamed)."


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{6,}\.tmp$")   # atomic.py's mkstemp names
_PARTIAL = re.compile(r"^\.(?P<name>.+)_[A-Za-z0-9_]{8}\.partial$")  # report folders being written


def final_path(path: str) -> str:
    """The file (or report folder) a temporary name becomes: what a user knows and can move."""
    parts = list(Path(path).parts)
    for position, part in enumerate(parts):
        temporary, partial = _TEMPORARY.match(part), _PARTIAL.match(part)
        if temporary:
            parts[position] = temporary.group("name")
        elif partial:
            return f"the {partial.group('name')} report being written in {Path(*parts[:position])}"
    return str(Path(*parts))


def flag_holding(path: str, outputs: Dict[str, str]) -> Optional[str]:
    """The flag of ``outputs`` (flag: folder) whose folder holds ``path``, the deepest one."""
    target = Path(os.path.abspath(path))
    holding = [(len(Path(os.path.abspath(folder)).parts), flag) for flag, folder in outputs.items()
               if folder and Path(os.path.abspath(folder)) in (target, *target.parents)]
    return max(holding)[1] if holding else None


def describe_os_error(error: OSError, outputs: Optional[Dict[str, str]] = None) -> str:
    """One paragraph for an OS error met while reading or writing a file; ``outputs`` (flag: folder, the
    command's output flags as given) lets it name the flag that moves the file."""
    path = final_path(str(error.filename)) if error.filename is not None else "a file"
    reason = error.strerror or str(error)
    code = error.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        flag = flag_holding(str(error.filename), outputs or {}) if error.filename is not None else None
        move = f"pass {flag} a folder on another disk" if flag else "point the output flag at another disk"
        return (f"no space left on the device while writing {path}. Free space on that disk (df -h "
                f"{Path(str(error.filename or '.')).parent}) or {move}, then run the same command again. "
                f"{_ALREADY_WRITTEN}")
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
