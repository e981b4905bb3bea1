"""Append-only files that follow their path: opening (directory made), and
telling whether the path still names the open file, on a real file system."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmproxy.export.appendfile import MOVED, UNLINKED, displaced, open_append


def test_open_append_makes_the_directory_and_reports_size_and_identity(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "events.jsonl"
    opened = open_append(path, 0o600)
    try:
        os.write(opened.fd, b"x\n")
        st = path.stat()
        assert (opened.size, opened.identity) == (0, (st.st_dev, st.st_ino))
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0
    finally:
        os.close(opened.fd)
    again = open_append(path)
    os.close(again.fd)
    assert again.size == 2


def test_open_append_appends(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"old\n")
    opened = open_append(path)
    os.write(opened.fd, b"new\n")
    os.close(opened.fd)
    assert path.read_bytes() == b"old\nnew\n"


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[Path, int, tuple[int, int]]]:
    path = tmp_path / "state" / "events.jsonl"
    o = open_append(path)
    yield path, o.fd, o.identity
    os.close(o.fd)


def test_the_path_naming_the_open_file_is_not_displaced(
    opened: tuple[Path, int, tuple[int, int]],
) -> None:
    assert displaced(*opened) is None


def test_a_file_renamed_away_is_moved(opened: tuple[Path, int, tuple[int, int]]) -> None:
    path, fd, identity = opened
    path.rename(path.with_name("events.jsonl.1"))
    assert displaced(path, fd, identity) == MOVED


def test_another_file_at_the_path_means_moved(
    opened: tuple[Path, int, tuple[int, int]],
) -> None:
    path, fd, identity = opened
    path.rename(path.with_name("events.jsonl.1"))
    path.write_bytes(b"")  # logrotate's create
    assert displaced(path, fd, identity) == MOVED


def test_a_deleted_file_is_unlinked(opened: tuple[Path, int, tuple[int, int]]) -> None:
    path, fd, identity = opened
    path.unlink()
    assert displaced(path, fd, identity) == UNLINKED


def test_a_deleted_file_with_a_new_one_in_its_place_is_unlinked(
    opened: tuple[Path, int, tuple[int, int]],
) -> None:
    path, fd, identity = opened
    path.unlink()
    path.write_bytes(b"")
    assert displaced(path, fd, identity) == UNLINKED


def test_a_removed_directory_is_unlinked(opened: tuple[Path, int, tuple[int, int]]) -> None:
    path, fd, identity = opened
    shutil.rmtree(path.parent)
    assert displaced(path, fd, identity) == UNLINKED


def test_a_file_where_the_directory_was_is_unlinked(
    opened: tuple[Path, int, tuple[int, int]],
) -> None:
    path, fd, identity = opened
    shutil.rmtree(path.parent)
    path.parent.write_text("not a directory")
    assert displaced(path, fd, identity) == UNLINKED
