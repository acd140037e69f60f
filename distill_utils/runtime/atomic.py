"""Atomic, durable writes: a temporary file in the target's folder, synced to the disk, then a rename,
then a sync of the folder. An interrupted write (a kill, a full disk, a power loss) never leaves a
truncated or empty file behind, and never replaces a good one. Files that belong together (an
expert's image and text trajectories) are written as a group: every temporary first, then the renames,
so a full disk or an error leaves none of them, and a group that replaces files puts the old ones back
when it fails part-way.

OS errors leave here naming the target path (torch's own writer would report a full disk as
"unexpected pos"), so the scripts can say which file and why.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_in(path: Path):
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); the renamed result should be as readable as a file open() creates
    os.chmod(temporary, 0o666 & ~_current_umask())
    return handle, Path(temporary)


def temporaries_of(path: Path) -> List[Path]:
    """Temporary files an interrupted atomic write of ``path`` may have left."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


@contextmanager
def naming_path(path: Path) -> Iterator[None]:
    """Re-raise an OSError that lacks a file name with ``path`` as its file name."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise type(error)(error.errno, error.strerror or str(error), str(path)) from None
        raise


def _write_temporary(path: Path, write: Callable) -> Path:
    """Write ``path``'s content into a fresh temporary beside it and flush it to the disk (so the rename
    that follows can never publish an empty file after a power loss); delete the temporary if that fails."""
    path = Path(path)
    with naming_path(path):
        handle, temporary = _temporary_in(path)
        try:
            with os.fdopen(handle, "wb") as stream:
                write(stream)
                stream.flush()
                os.fsync(stream.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return temporary


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Filesystems that cannot sync a folder (some network and
    FUSE mounts answer EINVAL) are left as they are: there the rename is as durable as they make it."""
    try:
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(handle)


def _backup(path: Path) -> Path:
    """A second name for the file at ``path`` (a hard link; a copy where links are refused), so a
    group write that fails after replacing it can put it back."""
    backup = path.parent / f".{path.name}.{secrets.token_hex(4)}.bak.tmp"
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)
    return backup


def write_all(items: Sequence[Tuple[Path, Callable]]) -> None:
    """``[(path, write(stream))]``: write and sync every temporary, then rename each onto its path and
    sync the folders. If anything fails, no temporary stays, every file that was replaced is put back
    as it was and files that did not exist before are removed again: the group is either all new or
    all old, never a mix of two writes."""
    paths = [Path(path) for path, _ in items]
    temporaries: List[Path] = []
    backups: Dict[Path, Path] = {}
    renamed: List[Path] = []
    try:
        for path, (_, write) in zip(paths, items):
            temporaries.append(_write_temporary(path, write))
        for path in paths:
            if path.exists():
                with naming_path(path):
                    backups[path] = _backup(path)
        for path, temporary in zip(paths, temporaries):
            with naming_path(path):
                os.replace(temporary, path)
            renamed.append(path)
        for folder in dict.fromkeys(path.parent for path in paths):
            with naming_path(folder):
                fsync_folder(folder)
    except BaseException:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        for path in renamed:
            if path in backups:
                os.replace(backups.pop(path), path)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        for backup in backups.values():
            backup.unlink(missing_ok=True)


def torch_writer(obj) -> Callable:
    """``torch.save`` into a Python stream, so that a full disk surfaces as the OSError it is: torch's
    own file writer, and its zip finaliser after a failed write, report it as "unexpected pos"."""
    def write(stream):
        try:
            torch.save(obj, stream)
        except RuntimeError as error:
            cause = error.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None
    return write


def text_writer(text: str) -> Callable:
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return lambda stream: stream.write(text.encode("utf-8"))


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` atomically."""
    write_all([(Path(path), torch_writer(obj))])


def atomic_write_text(path: Path, text: str) -> None:
    write_all([(Path(path), text_writer(text))])


def atomic_write_bytes_with(path: Path, write) -> None:
    """Call ``write(stream)`` on a temporary binary file, then rename it to ``path``."""
    write_all([(Path(path), write)])
