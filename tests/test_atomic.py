"""Atomic writes: files get the permissions a plain open() would give them, and a write that fails
keeps the old file and leaves no temporary behind."""
import os
import shutil
import stat

import pytest

from distill_utils.runtime import atomic
from distill_utils.runtime.atomic import atomic_save, atomic_write_bytes_with, atomic_write_text, text_writer, write_all

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


def test_the_content_is_synced_before_the_rename_and_the_folder_after_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(handle):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(handle).st_mode) else "fsync file")
        real_fsync(handle)

    def replace(source, target):
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_all([(tmp_path / "a", text_writer("1")), (tmp_path / "b", text_writer("2"))])
    assert events == ["fsync file", "fsync file", "rename", "rename", "fsync folder"]


# every step of a group write that replaces two files, each made to fail in turn
STEPS = ["write second", "backup second", "rename first", "rename second", "fsync folder"]


@pytest.mark.parametrize("step", STEPS)
def test_a_group_write_that_fails_at_any_step_puts_back_what_it_replaced(tmp_path, monkeypatch, step):
    first, second = tmp_path / "img", tmp_path / "txt"
    first.write_text("old img")
    second.write_text("old txt")
    real_replace, real_link = os.replace, os.link
    renames = []

    def second_writer(stream):
        if step == "write second":
            raise OSError(28, "No space left on device")
        stream.write(b"new txt")

    def link(source, target):
        if step == "backup second" and str(source) == str(second):
            raise OSError(28, "No space left on device")
        real_link(source, target)

    def replace(source, target):
        renames.append(target)
        if (step, len(renames)) in (("rename first", 1), ("rename second", 2)):
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    def fsync_folder(folder):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(shutil, "copy2", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    monkeypatch.setattr(os, "replace", replace)
    if step == "fsync folder":
        monkeypatch.setattr(atomic, "fsync_folder", fsync_folder)
    with pytest.raises(OSError):
        write_all([(first, text_writer("new img")), (second, second_writer)])
    assert (first.read_text(), second.read_text()) == ("old img", "old txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "txt"]  # no temporary, no backup left


def test_a_group_write_that_fails_removes_the_files_it_created(tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def replace(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        write_all([(tmp_path / "a", text_writer("1")), (tmp_path / "b", text_writer("2"))])
    assert list(tmp_path.iterdir()) == []
