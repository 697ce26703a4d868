"""Attacks on apply, signature and diff found in review: each test states what a user
(or an attacker with a local account) would notice. Marked xfail(strict) until fixed."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KiB, MiB, make_sparse, pattern, run_cli

from sparsepatch import api, inputs, sparse
from sparsepatch.errors import SparsePatchError


def _full_patch(tmp: Path) -> tuple[Path, bytes]:
    src = make_sparse(tmp / "src.img", 1 * MiB, [(0, 64 * KiB), (512 * KiB, 64 * KiB)])
    patch = tmp / "first.patch"
    api.diff(None, str(src), str(patch), full=True)
    return patch, src.read_bytes()


def test_a_failed_first_copy_removes_only_the_file_it_created(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A first copy into a folder another user controls (here: owns the parent of). That
    user swaps the folder for a symlink to one of root's folders right after apply creates
    the destination (inotify makes that easy; sync_dir stands in for the moment). apply
    then fails (the journal check sees the swap) and removes the empty file it created:
    by path, so through the symlink, deleting root's file of the same name instead
    (reproduced with a real nobody process polling for the new file, no hooks needed)."""
    patch, _ = _full_patch(tmp_path)
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "disk.img"
    victim.write_bytes(b"root's other image, must survive")
    box = tmp_path / "box"
    (box / "vm").mkdir(parents=True)
    dest = box / "vm" / "disk.img"

    real = sparse.sync_dir
    swapped = []

    def attacker_moves(path: str | int) -> None:
        real(path)
        if not swapped:
            swapped.append(1)
            os.rename(box / "vm", box / "vm.old")
            os.symlink(victim_dir, box / "vm")

    monkeypatch.setattr(sparse, "sync_dir", attacker_moves)
    with pytest.raises(SparsePatchError):
        api.apply(str(patch), str(dest))
    assert victim.read_bytes() == b"root's other image, must survive"


def test_a_shrink_does_not_cut_off_data_that_is_not_the_base(tmp_path: Path) -> None:
    """base: 2 MiB; target: its first 1 MiB (the patch has no records, only the sizes).
    The destination has the base's size and first half, but other data in the second half
    (written after the signature, or an old authentic patch replayed): apply must refuse
    (exit 5) and keep those bytes, not truncate them away with exit 0."""
    base = pattern(2 * MiB, 1)
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "target").write_bytes(base[: 1 * MiB])
    run_cli("signature", "-q", str(tmp_path / "base"), "-o", str(tmp_path / "sig"))
    run_cli("diff", "-q", str(tmp_path / "sig"), str(tmp_path / "target"), "-o", str(tmp_path / "p"))
    other = base[: 1 * MiB] + pattern(1 * MiB, 2)
    dest = tmp_path / "dest"
    dest.write_bytes(other)
    r = run_cli("apply", "-q", str(tmp_path / "p"), str(dest), check=False)
    assert (r.returncode, dest.read_bytes()) == (5, other), r.stderr


def _sticky_folder() -> Path:
    d = Path(tempfile.mkdtemp(prefix="sparsepatch-review-"))
    d.chmod(0o1777)
    return d


def _as_nobody(*argv: str) -> None:
    subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv], check=True)


needs_root_and_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to act as another user")


@needs_root_and_setpriv
def test_a_fifo_planted_as_the_next_piece_does_not_hang_apply(tmp_path: Path) -> None:
    """root's split patch (two pieces) in /tmp-like folder; another user adds PATCH.002 as
    a FIFO. Expected: the planted name is ignored or refused at once (as -o does for
    another user's FIFO); observed: apply blocks forever in open()."""
    src = make_sparse(tmp_path / "src.img", 1 * MiB, [(0, 256 * KiB), (512 * KiB, 256 * KiB)])
    shared = _sticky_folder()
    try:
        run_cli("diff", "-q", "--full", str(src), "-o", str(shared / "p"), "--split", "300K")
        assert (shared / "p.001").exists()
        _as_nobody("mkfifo", str(shared / "p.002"))
        try:
            r = run_cli("apply", "-q", str(shared / "p.000"), str(tmp_path / "dest"),
                        check=False, timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail("apply hung opening another user's FIFO named as a piece")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "dest").read_bytes() == src.read_bytes()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@needs_root_and_setpriv
def test_a_piece_planted_after_the_last_one_does_not_stop_apply(tmp_path: Path) -> None:
    src = make_sparse(tmp_path / "src.img", 1 * MiB, [(0, 256 * KiB), (512 * KiB, 256 * KiB)])
    shared = _sticky_folder()
    try:
        run_cli("diff", "-q", "--full", str(src), "-o", str(shared / "p"), "--split", "300K")
        last = max(shared.glob("p.*"))
        nxt = shared / f"p.{int(last.suffix[1:]) + 1:03d}"
        _as_nobody("sh", "-c", f"echo junk > {nxt}")
        r = run_cli("apply", "-q", str(shared / "p.000"), str(tmp_path / "dest"), check=False)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "dest").read_bytes() == src.read_bytes()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_patch_mode_comes_from_the_source_that_was_read(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The source path names a symlink to a 0600 secret when diff opens it, and a 0644
    file when diff looks up the mode (another user who owns the folder swaps it). The
    patch carries the secret's bytes: it must not come out 0644."""
    secret = tmp_path / "secret.img"
    secret.write_bytes(pattern(64 * KiB, 7))
    secret.chmod(0o600)
    decoy = tmp_path / "decoy.img"
    decoy.write_bytes(bytes(64 * KiB))
    decoy.chmod(0o644)
    src = tmp_path / "src.img"
    src.symlink_to(secret)

    real = inputs.open_source

    @contextlib.contextmanager
    def open_then_swap(path: str) -> Iterator[int]:
        with real(path) as fd:
            src.unlink()
            src.symlink_to(decoy)
            yield fd

    monkeypatch.setattr(inputs, "open_source", open_then_swap)
    old = os.umask(0o022)
    try:
        api.diff(None, str(src), str(tmp_path / "p"), full=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "p").st_mode) & 0o077 == 0


def test_info_and_verify_read_a_split_patch(tmp_path: Path) -> None:
    """README: apply PATCH.000 finds the other pieces; an administrator checks the USB
    stick first with `verify` (or `info`) the same way, and is told the patch is truncated."""
    src = make_sparse(tmp_path / "src.img", 1 * MiB, [(0, 256 * KiB), (512 * KiB, 256 * KiB)])
    run_cli("diff", "-q", "--full", str(src), "-o", str(tmp_path / "p"), "--split", "300K")
    i = run_cli("info", str(tmp_path / "p.000"), check=False)
    v = run_cli("verify", "-q", str(tmp_path / "p.000"), check=False)
    assert (i.returncode, v.returncode) == (0, 0), (i.stderr, v.stderr)




@needs_root_and_setpriv
def test_a_first_copy_does_not_fill_another_users_planted_empty_file(tmp_path: Path) -> None:
    """root makes the first copy of a private image (patch 0600) into a sticky folder.
    Another user has created the destination name first, as an empty 0644 file of their
    own. apply treats it as an interrupted first copy and writes the image into it: that
    user can now read root's image and rewrite it before root boots it. Expected: refused
    (or a file of root's alone)."""
    patch, _ = _full_patch(tmp_path)
    patch.chmod(0o600)
    shared = _sticky_folder()
    try:
        dest = shared / "vm.img"
        _as_nobody("sh", "-c", f"umask 022; : > {dest}")
        r = run_cli("apply", "-q", str(patch), str(dest), check=False)
        st = os.stat(dest)
        assert r.returncode != 0 or (st.st_uid == 0 and st.st_mode & 0o077 == 0), \
            f"exit {r.returncode}, result owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@needs_root_and_setpriv
def test_a_first_copy_does_not_write_through_a_planted_symlink(tmp_path: Path) -> None:
    patch, _ = _full_patch(tmp_path)
    empty = tmp_path / "empty-but-important"  # say /etc/cron.allow, /var/log/..., a lock file
    empty.write_bytes(b"")
    shared = _sticky_folder()
    try:
        dest = shared / "vm.img"
        _as_nobody("ln", "-s", str(empty), str(dest))
        run_cli("apply", "-q", str(patch), str(dest), check=False)
        assert empty.stat().st_size == 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)


FUSEFAT = shutil.which("fusefat")
needs_fusefat = pytest.mark.skipif(
    not (FUSEFAT and shutil.which("mkfs.vfat") and os.path.exists("/dev/fuse")),
    reason="needs fusefat and mkfs.vfat (Debian fusefat, dosfstools) and /dev/fuse")


@pytest.fixture
def fat(tmp_path: Path):  # type: ignore[no-untyped-def]
    assert FUSEFAT
    image, mnt = tmp_path / "fat.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.vfat", "-F", "32", str(image)], check=True, capture_output=True)
    r = subprocess.run([FUSEFAT, "-o", "rw+", str(image), str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"fusefat cannot mount here: {r.stderr.decode()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@needs_fusefat
def test_split_patch_onto_a_fusefat_stick(tmp_path: Path, fat: Path) -> None:
    """README, removable media: diff --split fat32 -o /media/usb/img.patch."""
    src = make_sparse(tmp_path / "src.img", 1 * MiB, [(0, 64 * KiB)])
    r = run_cli("diff", "-q", "--full", str(src), "-o", str(fat / "img.patch"), "--split", "fat32",
                check=False)
    assert r.returncode == 0, r.stderr
    run_cli("apply", "-q", str(fat / "img.patch.000"), str(tmp_path / "dest"))
    assert (tmp_path / "dest").read_bytes() == src.read_bytes()


@needs_fusefat
def test_split_4g_is_refused_on_fusefat(tmp_path: Path, fat: Path) -> None:
    src = make_sparse(tmp_path / "src.img", 1 * MiB, [(0, 64 * KiB)])
    r = run_cli("diff", "-q", "--full", str(src), "-o", str(fat / "img.patch"), "--split", "4G",
                check=False)
    assert r.returncode == 2 and "on FAT" in r.stderr.decode(), r.stderr


@needs_root_and_setpriv
@pytest.mark.skipif(shutil.which("losetup") is None or not os.path.exists("/dev/loop-control"),
                    reason="needs losetup (util-linux) and loop devices")
def test_output_into_another_users_folder_does_not_follow_their_symlink_to_a_disk(
        tmp_path: Path) -> None:
    """root writes a signature into a drop folder owned by another user (not sticky, so
    the protected_symlinks-like rule treats the folder owner as trusted). That user has
    put a symlink to a disk under the output's name: root writes the signature over the
    disk's first bytes (its partition table or superblock)."""
    src = make_sparse(tmp_path / "src.img", 1 * MiB, [(0, 64 * KiB)])
    backing = tmp_path / "disk"
    backing.write_bytes(b"SUPERBLOCK" + bytes(4 * MiB - 10))
    disk = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                          check=True).stdout.strip()
    drop = Path(tempfile.mkdtemp(prefix="sparsepatch-review-"))
    try:
        u = pwd.getpwnam("nobody")
        os.chown(drop, u.pw_uid, u.pw_gid)
        drop.chmod(0o755)
        _as_nobody("ln", "-s", disk, str(drop / "img.sig"))
        run_cli("signature", "-q", str(src), "-o", str(drop / "img.sig"), check=False)
        with open(disk, "rb") as f:
            assert f.read(10) == b"SUPERBLOCK"
    finally:
        subprocess.run(["losetup", "-d", disk], capture_output=True)
        shutil.rmtree(drop, ignore_errors=True)


def _update(tmp: Path) -> tuple[Path, Path, bytes]:
    base = make_sparse(tmp / "base", 1 * MiB, [(0, 64 * KiB), (512 * KiB, 64 * KiB)])
    target = make_sparse(tmp / "target", 1 * MiB, [(0, 64 * KiB), (512 * KiB, 128 * KiB)])
    api.signature(str(base), str(tmp / "sig"))
    api.diff(str(tmp / "sig"), str(target), str(tmp / "p"))
    return base, tmp / "p", target.read_bytes()


def test_journal_option_naming_the_destination_is_refused(tmp_path: Path) -> None:
    dest, patch, _ = _update(tmp_path)
    before = dest.read_bytes()
    r = run_cli("apply", "-q", str(patch), str(dest), "--journal", str(dest), check=False)
    assert dest.exists(), f"exit {r.returncode}: the destination was deleted"
    assert r.returncode == 2 and dest.read_bytes() == before, r.stderr


def test_journal_option_naming_the_patch_is_refused(tmp_path: Path) -> None:
    dest, patch, _ = _update(tmp_path)
    r = run_cli("apply", "-q", str(patch), str(dest), "--journal", str(patch), check=False)
    assert patch.exists(), f"exit {r.returncode}: the patch was deleted"


def test_apply_to_dash_is_refused(tmp_path: Path) -> None:
    src = make_sparse(tmp_path / "src.img", 64 * KiB, [(0, 64 * KiB)])
    api.diff(None, str(src), str(tmp_path / "p"), full=True)
    r = run_cli("apply", "-q", str(tmp_path / "p"), "-", check=False, cwd=tmp_path)
    assert r.returncode == 2 and not (tmp_path / "-").exists(), r.stderr


def test_journal_option_naming_an_unrelated_file_leaves_it_alone(tmp_path: Path) -> None:
    dest, patch, target = _update(tmp_path)
    notes = tmp_path / "notes.txt"  # a typo, a tab completion gone wrong: --journal ~/.bashrc
    notes.write_bytes(b"important notes\n" * 64)
    r = run_cli("apply", "-q", str(patch), str(dest), "--journal", str(notes), check=False)
    assert notes.exists() and notes.read_bytes() == b"important notes\n" * 64, \
        f"exit {r.returncode}: {'changed' if notes.exists() else 'deleted'}"
