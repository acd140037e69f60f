"""Atomic writes: a temporary file in the target's folder, then a rename. An interrupted write never
leaves a truncated file behind, and never replaces a good one. Files that belong together (an
expert's image and text trajectories) are written as a group: every temporary first, then the renames,
so a full disk or an error leaves none of them.

OS errors leave here naming the target path (torch's own writer would report a full disk as
"unexpected pos"), so the scripts can say which file and why.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple

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
    """Write ``path``'s content into a fresh temporary beside it; delete the temporary if that fails."""
    path = Path(path)
    with naming_path(path):
        handle, temporary = _temporary_in(path)
        try:
            with os.fdopen(handle, "wb") as stream:
                write(stream)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return temporary


def write_all(items: Sequence[Tuple[Path, Callable]]) -> None:
    """``[(path, write(stream))]``: write every temporary, then rename each onto its path. If anything
    fails, no temporary stays, and files that did not exist before are removed again."""
    temporaries: List[Path] = []
    renamed: List[Path] = []
    existed = [Path(path).exists() for path, _ in items]
    try:
        for path, write in items:
            temporaries.append(_write_temporary(Path(path), write))
        for (path, _), temporary in zip(items, temporaries):
            with naming_path(path):
                os.replace(temporary, path)
            renamed.append(Path(path))
    except BaseException:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        for path, was_there in zip(renamed, existed):
            if not was_there:
                path.unlink(missing_ok=True)
        raise


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
