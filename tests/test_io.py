"""ressl.io: atomic writes leave either the new file or the old one, and never a temp file."""

from __future__ import annotations

import pytest

from ressl.io import atomic_write_bytes


def test_a_failed_publish_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out"
    target.mkdir()  # the rename onto a directory fails after the data was written and synced
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"x" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not list(target.iterdir())


def test_a_write_replaces_the_old_file_whole(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
