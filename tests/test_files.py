"""Output files are written whole or not at all, with ordinary permissions."""
import os
import stat

import pytest

from bnfast._files import atomic_output, same_file


def test_atomic_output_writes_file_with_umask_permissions(tmp_path):
    target = tmp_path / "out.bin"
    old = os.umask(0o022)
    try:
        with atomic_output(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"abc")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"abc"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_atomic_output_leaves_nothing_when_the_body_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_same_file_sees_through_symlinks_hard_links_and_dots(tmp_path):
    a = tmp_path / "a"
    a.write_text("x")
    os.symlink(a, tmp_path / "soft")
    os.link(a, tmp_path / "hard")
    (tmp_path / "b").write_text("x")
    assert same_file(a, tmp_path / "soft") and same_file(a, tmp_path / "hard")
    assert same_file(a, tmp_path / "." / "a")
    assert not same_file(a, tmp_path / "b")
    assert not same_file(a, tmp_path / "absent")
