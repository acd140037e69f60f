"""Index claims in a folder shared by several writers (torchrun ranks, machines on one disk, reruns).

A writer claims index ``n`` by creating ``.claim_n`` exclusively while it holds the folder's lock
(``.lock``, ``flock``), and only when no file of index ``n`` exists; it keeps the claim until its files
are in place, and drops it under the same lock. Looking at the folder, creating and dropping claims
all under one lock is what makes a claim fail while any file of that index exists: without it, a
writer could see an index free, lose the processor while another finishes that index and drops its
claim, and then claim it again.

A claim names its host and process. A claim whose process is gone (a kill -9, a power cut) is stale:
:func:`remove_stale_claims` deletes it and the partial files of its index when the process ran on this
host; claims of other hosts are reported, never guessed at.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CLAIM_PREFIX = ".claim_"


@dataclass(frozen=True)
class Claim:
    index: int
    host: str
    pid: int

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """True unless the process is known to be gone (only decidable on this host)."""
        if not self.here or self.pid <= 0:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True


def claim_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"{CLAIM_PREFIX}{index}"


@contextmanager
def folder_lock(folder: Path, wait: bool = True, owner: str = "", name: str = LOCK_NAME) -> Iterator[None]:
    """Exclusive advisory lock on ``folder/.lock`` (or ``folder/name``: a lock of another purpose, which one
    process can hold while it takes ``.lock``); the kernel drops it when the process dies, so a
    killed holder never leaves a stale lock. ``wait=False`` raises :class:`FolderBusy` at once when
    another process holds it; ``owner`` is written into the file so that error can name the holder."""
    folder = Path(folder)
    path = folder / name
    handle = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise FolderBusy(folder, _read_owner(path)) from None
        if owner:
            os.ftruncate(handle, 0)
            os.pwrite(handle, owner.encode("utf-8"), 0)
        yield
    finally:
        os.close(handle)  # closing releases the lock


class FolderBusy(RuntimeError):
    def __init__(self, folder: Path, owner: str):
        super().__init__(f"{folder} is locked by {owner or 'another process'}")
        self.folder = folder
        self.owner = owner


def this_process() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _read_owner(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def read_claim(path: Path) -> Optional[Claim]:
    try:
        words = path.read_text(encoding="utf-8").split()
        index = int(path.name[len(CLAIM_PREFIX):])
    except (OSError, ValueError):
        return None
    # "HOST pid PID", the layout every version of this project wrote
    if len(words) >= 3 and words[1] == "pid" and words[2].isdigit():
        return Claim(index, words[0], int(words[2]))
    return Claim(index, "?", -1)


def claims(folder: Path) -> List[Claim]:
    found = []
    for path in Path(folder).glob(f"{CLAIM_PREFIX}*"):
        if path.name[len(CLAIM_PREFIX):].isdigit():
            claim = read_claim(path)
            if claim is not None:
                found.append(claim)
    return sorted(found, key=lambda c: c.index)


def claim_first_free(folder: Path, taken: Callable[[], Iterable[int]]) -> int:
    """Create the claim of the lowest index that ``taken()`` (files already there) and no claim use."""
    folder = Path(folder)
    with folder_lock(folder):
        # claims before files: a writer renames its files before it drops its claim, so an index whose
        # claim is gone by now already shows its files to the listing that follows
        used = {c.index for c in claims(folder)}
        used |= set(taken())
        index = 0
        while True:
            if index not in used:
                try:
                    handle = os.open(claim_path(folder, index), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                except FileExistsError:  # a claim file we could not parse, or a writer without the lock
                    index += 1
                    continue
                with os.fdopen(handle, "w") as stream:
                    stream.write(f"{socket.gethostname()} pid {os.getpid()}\n")
                return index
            index += 1


def release(folder: Path, index: int) -> None:
    with folder_lock(folder):
        claim_path(folder, index).unlink(missing_ok=True)


def remove_stale_claims(folder: Path, leftovers: Callable[[int], Iterable[Path]]) -> List[int]:
    """Delete claims of dead processes on this host, and ``leftovers(index)`` (their partial files).
    Return the indices cleaned; log claims of other hosts, which cannot be checked from here."""
    folder = Path(folder)
    cleaned = []
    with folder_lock(folder):
        for claim in claims(folder):
            if claim.alive():
                if not claim.here:
                    log.info("%s: index %d is claimed by pid %d on host %s (a writer there, or one that died); "
                             "if no buffer.py runs there, delete %s and the files of index %d that lack a twin",
                             folder, claim.index, claim.pid, claim.host, claim_path(folder, claim.index).name,
                             claim.index)
                continue
            removed = [path.name for path in leftovers(claim.index) if _unlink(path)]
            claim_path(folder, claim.index).unlink(missing_ok=True)
            cleaned.append(claim.index)
            log.warning("%s: removed the stale claim of index %d (pid %d on this host is gone)%s", folder,
                        claim.index, claim.pid, f" and its partial files {removed}" if removed else "")
    return cleaned


def _unlink(path: Path) -> bool:
    try:
        Path(path).unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            log.warning("cannot remove %s (%s)", path, error.strerror)
            return False
        raise
