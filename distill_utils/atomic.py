"""Atomic writes: a temporary file in the target's folder, then a rename. An interrupted write never
leaves a truncated file behind, and never replaces a good one."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Tuple

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


@contextmanager
def _replacing(path: Path) -> Iterator[Tuple[int, Path]]:
    """Yield an open descriptor and the path of a temporary file beside ``path``; rename it over ``path``
    when the block finishes, delete it when the block raises."""
    path = Path(path)
    handle, temporary = _temporary_in(path)
    try:
        yield handle, temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` atomically."""
    with _replacing(path) as (handle, temporary):
        os.close(handle)
        torch.save(obj, temporary)


def atomic_write_text(path: Path, text: str) -> None:
    with _replacing(path) as (handle, _), os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)


def atomic_write_bytes_with(path: Path, write) -> None:
    """Call ``write(stream)`` on a temporary binary file, then rename it to ``path``."""
    with _replacing(path) as (handle, _), os.fdopen(handle, "wb") as stream:
        write(stream)
