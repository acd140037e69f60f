"""Atomic writes: files get the permissions a plain open() would give them, and a write that fails
keeps the old file and leaves no temporary behind."""
import os
import stat

import pytest

from distill_utils.atomic import atomic_save, atomic_write_bytes_with, atomic_write_text

WRITERS = {
    "text": lambda path: atomic_write_text(path, "x"),
    "bytes": lambda path: atomic_write_bytes_with(path, lambda stream: stream.write(b"x")),
    "torch": lambda path: atomic_save({"x": 1}, path),
}


@pytest.fixture
def group_umask():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


@pytest.mark.parametrize("writer", WRITERS)
def test_atomic_files_get_the_mode_open_gives(tmp_path, group_umask, writer):
    plain = tmp_path / "plain"
    plain.write_text("x")
    WRITERS[writer](tmp_path / "atomic")
    mode = stat.S_IMODE((tmp_path / "atomic").stat().st_mode)
    assert mode == stat.S_IMODE(plain.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic", "plain"]


def failed_write(stream):
    stream.write(b"partial")
    raise OSError("disk full")


FAILING_WRITERS = {
    "text": lambda path: atomic_write_text(path, 123),  # not a str: the write itself raises
    "bytes": lambda path: atomic_write_bytes_with(path, failed_write),
    "torch": lambda path: atomic_save({"f": lambda: None}, path),  # a lambda cannot be pickled
}


@pytest.mark.parametrize("writer", FAILING_WRITERS)
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, writer):
    target = tmp_path / "target"
    target.write_bytes(b"good")
    with pytest.raises(Exception):
        FAILING_WRITERS[writer](target)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["target"]
