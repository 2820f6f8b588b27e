"""Local output files: every key stays inside the folder and no object overwrites another."""

from __future__ import annotations

from pathlib import Path

import pytest

from workflow.localfiles import key_to_path, write_object


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",  # parent references
        "/absolute/path.jpg",  # leading slash
        "a//b.jpg",  # empty segment
        "./here.jpg",  # current-folder segment
        "back\\slash.jpg",  # Windows separator
        "nul\x00char.jpg",  # NUL byte
    ],
)
def test_key_maps_inside_root(tmp_path: Path, key: str) -> None:
    path = key_to_path(tmp_path, key)

    assert tmp_path.resolve() in path.resolve().parents


def test_distinct_keys_map_to_distinct_files(tmp_path: Path) -> None:
    keys = ["a/b", "a//b", "a/%2F/b", "a/./b", "a/%2E/b", "A/b"]

    paths = {key_to_path(tmp_path, key) for key in keys}

    assert len(paths) == len(keys)


def test_file_and_folder_of_one_name_both_kept(tmp_path: Path) -> None:
    # GIVEN keys `a` and `a/b.png`, which S3 allows and a file system cannot hold as such
    first = write_object(tmp_path, "a", b"file a")
    second = write_object(tmp_path, "a/b.png", b"file a/b.png")

    # THEN both contents survive, in different files inside the folder
    assert first != second
    assert first.read_bytes() == b"file a"
    assert second.read_bytes() == b"file a/b.png"
    assert tmp_path.resolve() in second.resolve().parents


def test_folder_then_file_of_one_name_both_kept(tmp_path: Path) -> None:
    first = write_object(tmp_path, "a/b.png", b"nested")
    second = write_object(tmp_path, "a", b"plain")

    assert first.read_bytes() == b"nested"
    assert second.read_bytes() == b"plain"
    assert not list(tmp_path.rglob(".partial-*"))


def test_name_at_file_system_limit_is_written(tmp_path: Path) -> None:
    path = write_object(tmp_path, "long/" + "L" * 250 + ".jpg", b"x")

    assert path.read_bytes() == b"x"
    assert len(path.name.encode("utf-8")) <= 255


def test_written_file_gets_new_file_mode(tmp_path: Path) -> None:
    # GIVEN the process's umask WHEN a result is written THEN its mode is that of a new file,
    # not the owner-only mode of the temporary file it was written through
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)

    path = write_object(tmp_path, "photos/red.jpg", b"data")

    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
