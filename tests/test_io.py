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


def test_a_full_disk_leaves_no_temp_file_and_the_old_file_as_it_was(tmp_path, monkeypatch):
    """ENOSPC from the kernel (/dev/full behind the temp name): the failed flush fails again when the file is
    closed, and the temp file must still go."""
    import errno

    import ressl.io

    target = tmp_path / "summary.json"
    atomic_write_bytes(target, b"old")
    real = ressl.io.temp_name

    def full_disk(path):
        tmp = real(path)
        tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(ressl.io, "temp_name", full_disk)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, b"new" * 1000)
    assert e.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
