"""Folders of output, journal, undo, scratch and destination paths are looked up as the
kernel's fs.protected_symlinks=1 does, even where it is off (paths.open_dir): a symbolic
link another user planted in a sticky folder others can write (/tmp) is not followed when
root names a path through it."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from conftest import KiB, MiB, error_line, make_sparse, run_cli
from test_outputs import NOBODY, as_nobody

from sparsepatch import api, paths

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


def plant(link: Path, target: Path) -> None:
    as_nobody(lambda: os.symlink(target, link))


def _open(path: str | Path, nofollow: bool = False) -> os.stat_result:
    fd = paths.open_dir(str(path), nofollow)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


@needs_root
def test_a_link_of_another_user_in_a_sticky_folder_is_not_followed(shared: Path) -> None:
    plant(shared / "shared" / "evil", shared / "private")
    with pytest.raises(OSError) as e:
        paths.open_dir(str(shared / "shared" / "evil"))
    assert e.value.errno == errno.EACCES
    assert f"owned by uid {NOBODY}" in str(e.value.strerror)
    # Deeper: the link is a middle component, reached by a relative path with "..".
    os.mkdir(shared / "private" / "sub")
    here = os.getcwd()
    try:
        os.chdir(shared / "private")
        with pytest.raises(OSError):
            paths.open_dir("../shared/evil/sub")
    finally:
        os.chdir(here)


@needs_root
def test_links_the_kernel_rule_trusts_are_followed(shared: Path) -> None:
    private = os.stat(shared / "private")
    # Ours, in the sticky folder.
    os.symlink(shared / "private", shared / "shared" / "mine")
    assert _open(shared / "shared" / "mine").st_ino == private.st_ino
    # Another user's link in a folder that user owns (not sticky): only they could put it there.
    theirs = shared / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    plant(theirs / "link", Path("../private"))
    assert _open(theirs / "link").st_ino == private.st_ino
    # A relative link, "..", and /proc's links (/dev/fd leads to /proc/self/fd).
    os.symlink("private", shared / "rel")
    assert _open(shared / "rel" / "." / ".." / "private").st_ino == private.st_ino
    assert _open("/dev/fd").st_dev == os.stat("/proc/self/fd").st_dev


def test_nofollow_refuses_a_link_at_the_end_only(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(OSError) as e:
        paths.open_dir(str(tmp_path / "link"), nofollow=True)
    assert e.value.errno == errno.ELOOP
    (tmp_path / "real" / "inner").mkdir()
    assert _open(tmp_path / "link" / "inner", nofollow=True).st_ino == \
        os.stat(tmp_path / "real" / "inner").st_ino
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(OSError) as e:
        paths.open_dir(str(tmp_path / "loop" / "x"))
    assert e.value.errno == errno.ELOOP


def _update(d: Path) -> tuple[Path, Path, Path]:
    base = make_sparse(d / "base.img", 4 * MiB, [(0, 64 * KiB), (2 * MiB, 64 * KiB)])
    target = make_sparse(d / "target.img", 4 * MiB, [(0, b"\x07" * 64 * KiB), (3 * MiB, 64 * KiB)])
    api.signature(str(base), str(d / "sig"))
    api.diff(str(d / "sig"), str(target), str(d / "patch"))
    return base, target, d / "patch"


@needs_root
def test_outputs_through_a_planted_folder_link_are_refused(shared: Path) -> None:
    """Before: root's signature, patch and stats landed in the folder the link named."""
    img = make_sparse(shared / "img", 1 * MiB, [(0, 64 * KiB)])
    plant(shared / "shared" / "evil", shared / "private")
    out = shared / "shared" / "evil" / "out"
    for args in (["signature", str(img), "-o", str(out)],
                 ["signature", "-q", str(img), "-o", "-", "--stats", str(out)]):
        r = run_cli(*args, check=False)
        assert "refusing to follow the symbolic link 'evil'" in error_line(r, 3)
    assert os.listdir(shared / "private") == []


@needs_root
def test_apply_through_a_planted_folder_link_is_refused(shared: Path) -> None:
    """Before: root's journal, undo patch and scratch went where the link pointed, and a
    destination named through it was updated: another image than the one meant."""
    base, target, patch = _update(shared)
    before = base.read_bytes()
    plant(shared / "shared" / "evil", shared / "private")
    evil = shared / "shared" / "evil"
    for extra in (["--journal", str(evil / "j")], ["--undo", str(evil / "u")],
                  ["--scratch", str(evil)]):
        r = run_cli("apply", "-q", str(patch), str(base), *extra, check=False)
        assert "refusing to follow the symbolic link 'evil'" in error_line(r, 3), extra
        assert base.read_bytes() == before
    shutil.copy(base, shared / "private" / "base.img")
    r = run_cli("apply", "-q", str(patch), str(evil / "base.img"), check=False)
    assert "refusing to follow the symbolic link 'evil'" in error_line(r, 3)
    assert (shared / "private" / "base.img").read_bytes() == before
    assert sorted(os.listdir(shared / "private")) == ["base.img"]
    # The same paths through a link of our own work.
    os.symlink(shared / "private", shared / "shared" / "mine")
    run_cli("apply", "-q", str(patch), str(shared / "shared" / "mine" / "base.img"),
            "--undo", str(shared / "shared" / "mine" / "u"))
    assert (shared / "private" / "base.img").read_bytes() == target.read_bytes()
