"""Apply checks what it did and refuses what cannot work before writing: storage that lies
about a punch or a write, a target larger than the filesystem can hold, filesystems without
holes (FAT), and destinations that are not files."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import KiB, MiB, error_line, make_sparse, pattern, run_cli

from sparsepatch import api, sparse
from sparsepatch.errors import IOFailure, UsageError, VerifyMismatch
from sparsepatch.journal import journal_path

BS = 16 * KiB


def make_patch(tmp: Path, base: Path, target: Path) -> Path:
    api.signature(str(base), str(tmp / "base.sig"), block_size=BS)
    api.diff(str(tmp / "base.sig"), str(target), str(tmp / "p.patch"), block_size=BS)
    return tmp / "p.patch"


def base_and_target(tmp: Path, size: int = 1 * MiB) -> tuple[Path, Path]:
    """A base full of data; the target zeroes one block, changes another and grows a hole."""
    base = make_sparse(tmp / "base", size, [(0, size)])
    data = bytearray(base.read_bytes())
    data[4 * BS : 5 * BS] = bytes(BS)
    data[9 * BS : 10 * BS] = pattern(BS, 99)
    target = tmp / "target"
    target.write_bytes(data)
    return base, target


# -- storage that lies


def test_lying_punch_is_repaired_with_zeros(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, target = base_and_target(tmp_path)
    patch = make_patch(tmp_path, base, target)
    dest = tmp_path / "dest"
    shutil.copyfile(base, dest)
    # Reports every punch done and keeps the data, as a qcow2 image does for part of a cluster.
    monkeypatch.setattr(sparse, "punch_hole", lambda fd, off, length, discard=False: True)
    stats = api.apply(str(patch), str(dest))
    assert dest.read_bytes() == target.read_bytes()
    assert stats.blocks_punched == 1
    assert not os.path.exists(journal_path(str(dest)))


def test_lost_write_fails_loudly_and_a_rerun_repairs_it(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    base, target = base_and_target(tmp_path)
    patch = make_patch(tmp_path, base, target)
    dest = tmp_path / "dest"
    shutil.copyfile(base, dest)
    real = sparse.pwrite_full

    def forgetful(fd: int, data: bytes | memoryview, offset: int) -> None:
        if offset != 9 * BS:  # storage that acknowledges this write and keeps nothing
            real(fd, data, offset)

    monkeypatch.setattr(sparse, "pwrite_full", forgetful)
    with pytest.raises(VerifyMismatch) as e:
        api.apply(str(patch), str(dest))
    assert e.value.exit_code == 8
    assert f"byte {9 * BS}" in str(e.value)
    assert os.path.exists(journal_path(str(dest)))  # the run is not finished
    monkeypatch.undo()
    api.apply(str(patch), str(dest))
    assert dest.read_bytes() == target.read_bytes()
    assert not os.path.exists(journal_path(str(dest)))


QSD = shutil.which("qemu-storage-daemon")
QEMU_IMG = shutil.which("qemu-img")


@pytest.mark.skipif(not (QSD and QEMU_IMG and os.path.exists("/dev/fuse")),
                    reason="needs qemu-storage-daemon, qemu-img (Debian qemu-system-common, "
                    "qemu-utils) and /dev/fuse")
def test_qcow2_fuse_export_that_ignores_partial_cluster_punches(tmp_path: Path) -> None:
    assert QSD and QEMU_IMG
    image, export, pidfile = tmp_path / "img.qcow2", tmp_path / "export", tmp_path / "pid"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    export.touch()
    r = subprocess.run(
        [QSD, "--blockdev", f"driver=file,filename={image},node-name=file,discard=unmap",
         "--blockdev", "driver=qcow2,file=file,node-name=fmt,discard=unmap",
         "--export", f"type=fuse,id=exp,node-name=fmt,mountpoint={export},writable=on",
         "--pidfile", str(pidfile), "--daemonize"], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"qemu-storage-daemon cannot export through FUSE here: {r.stderr.decode()}")
    try:
        base, target = base_and_target(tmp_path, 4 * MiB)
        with open(export, "r+b") as f:
            f.write(base.read_bytes())
        patch = make_patch(tmp_path, export, target)
        journal = str(tmp_path / "journal")
        r = run_cli("apply", str(patch), str(export), "--journal", journal, check=False)
        assert r.returncode == 0, r.stderr
        assert export.read_bytes() == target.read_bytes()
    finally:
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if str(export) not in Path("/proc/mounts").read_text():
                break
            time.sleep(0.05)


# -- a target larger than the filesystem holds


@pytest.mark.parametrize("through_link", [False, True], ids=["direct", "through a link on tmpfs"])
def test_target_beyond_ext4_file_size_limit_is_refused_before_writing(tmp_path: Path,
                                                                      through_link: bool) -> None:
    """Through a link in a folder of another filesystem (tmpfs holds any size), the probe
    must still be made where the image itself lives."""
    if "ext4" not in fs_type(tmp_path) or "tmpfs" not in fs_type(Path("/dev/shm")):
        pytest.skip("needs the test folder on ext4 and /dev/shm on tmpfs")
    huge = 17 << 40  # ext4 with 4 KiB blocks holds 16 TiB in one file
    source = Path("/dev/shm") / f"sparsepatch-huge-{os.getpid()}"
    try:
        make_sparse(source, huge, [(0, 64 * KiB), (huge - 64 * KiB, 64 * KiB)])
        base = make_sparse(tmp_path / "base", 1 * MiB, [(0, 1 * MiB)])
        patch = make_patch(tmp_path, base, source)
    finally:
        source.unlink(missing_ok=True)
    dest = tmp_path / "dest"
    shutil.copyfile(base, dest)
    named = dest
    if through_link:
        links = Path(tempfile.mkdtemp(dir="/dev/shm"))
        named = links / "dest"
        named.symlink_to(dest)
    try:
        r = run_cli("apply", str(patch), str(named), check=False)
        line = error_line(r, 3)
        assert str(huge) in line and "largest file" in line
        assert dest.read_bytes() == base.read_bytes()
        assert not os.path.exists(journal_path(str(named)))
    finally:
        if through_link:
            shutil.rmtree(named.parent)


def test_target_beyond_ulimit_is_refused_before_writing(tmp_path: Path) -> None:
    import resource

    base = make_sparse(tmp_path / "base", 1 * MiB, [(0, 1 * MiB)])
    target = make_sparse(tmp_path / "target", 4 * MiB, [(0, 1 * MiB), (3 * MiB, 1 * MiB)])
    patch = make_patch(tmp_path, base, target)
    dest = tmp_path / "dest"
    shutil.copyfile(base, dest)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * MiB, 2 * MiB))

    r = run_cli("apply", str(patch), str(dest), check=False, preexec_fn=limit)
    line = error_line(r, 3)
    assert str(4 * MiB) in line and "ulimit" in line and str(2 * MiB) in line
    assert dest.read_bytes() == base.read_bytes()
    assert not os.path.exists(journal_path(str(dest)))


def fs_type(path: Path) -> str:
    r = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", str(path)], capture_output=True, text=True)
    return r.stdout.strip()


# -- filesystems without holes (FAT)


def is_dest(fd: int) -> bool:
    return os.readlink(f"/proc/self/fd/{fd}").endswith("/dest")


def eperm_on_ftruncate(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """FAT through fusefat: every ftruncate of the destination that does not shrink it fails."""
    calls: list[int] = []
    real = os.ftruncate

    def ftruncate(fd: int, size: int) -> None:
        calls.append(size)
        if is_dest(fd) and size >= os.fstat(fd).st_size:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        real(fd, size)

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    return calls


def test_truncate_to_the_same_size_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, target = base_and_target(tmp_path)
    patch = make_patch(tmp_path, base, target)
    dest = tmp_path / "dest"
    shutil.copyfile(base, dest)
    eperm_on_ftruncate(monkeypatch)
    api.apply(str(patch), str(dest))
    assert dest.read_bytes() == target.read_bytes()
    assert not os.path.exists(journal_path(str(dest)))


def test_growth_without_truncate_is_written_as_zeros(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_sparse(tmp_path / "base", 1 * MiB, [(0, 1 * MiB)])
    target = make_sparse(tmp_path / "target", 3 * MiB, [(0, 1 * MiB), (2 * MiB, 64 * KiB)])
    patch = make_patch(tmp_path, base, target)
    dest = tmp_path / "dest"
    shutil.copyfile(base, dest)
    eperm_on_ftruncate(monkeypatch)
    real_write = sparse.pwrite_full

    def no_gaps(fd: int, data: bytes | memoryview, offset: int) -> None:
        if is_dest(fd) and offset > os.fstat(fd).st_size:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        real_write(fd, data, offset)

    monkeypatch.setattr(sparse, "pwrite_full", no_gaps)
    warnings: list[str] = []
    api.apply(str(patch), str(dest), warn=warnings.append)
    assert dest.read_bytes() == target.read_bytes()
    assert not os.path.exists(journal_path(str(dest)))
    assert len([w for w in warnings if "FAT" in w]) == 1


def test_failed_final_truncate_does_not_wedge_the_next_run(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = base_and_target(tmp_path)
    target = make_sparse(tmp_path / "target", 512 * KiB, [(0, pattern(512 * KiB, 7))])
    patch = make_patch(tmp_path, base, target)
    dest = tmp_path / "dest"
    shutil.copyfile(base, dest)

    real = os.ftruncate

    def broken(fd: int, size: int) -> None:
        if is_dest(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd, size)

    monkeypatch.setattr(os, "ftruncate", broken)
    with pytest.raises(IOFailure):
        api.apply(str(patch), str(dest))
    assert os.path.exists(journal_path(str(dest)))
    monkeypatch.undo()
    api.apply(str(patch), str(dest))
    assert dest.read_bytes() == target.read_bytes()


FUSEFAT = shutil.which("fusefat")


@pytest.mark.skipif(not (FUSEFAT and shutil.which("mkfs.vfat") and os.path.exists("/dev/fuse")),
                    reason="needs fusefat and mkfs.vfat (Debian fusefat, dosfstools) and /dev/fuse")
def test_fusefat_first_copy_and_update(tmp_path: Path) -> None:
    assert FUSEFAT
    image, mnt = tmp_path / "fat.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.vfat", str(image)], check=True, capture_output=True)
    r = subprocess.run([FUSEFAT, "-o", "rw+", str(image), str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"fusefat cannot mount here: {r.stderr.decode()}")
    try:
        base = make_sparse(tmp_path / "base", 2 * MiB, [(0, 64 * KiB), (1 * MiB, 64 * KiB)])
        target = make_sparse(tmp_path / "target", 2 * MiB, [(0, 64 * KiB), (1 * MiB, 128 * KiB)])
        api.diff(None, str(base), str(tmp_path / "full.patch"), full=True, block_size=BS)
        patch = make_patch(tmp_path, base, target)
        dest = mnt / "IMAGE.RAW"
        journal = str(tmp_path / "journal")
        r = run_cli("apply", str(tmp_path / "full.patch"), str(dest), "--journal", journal,
                    check=False)
        assert r.returncode == 0, r.stderr
        assert "FAT" in r.stderr.decode()
        assert dest.read_bytes() == base.read_bytes()
        r = run_cli("apply", str(patch), str(dest), "--journal", journal, check=False)
        assert r.returncode == 0, r.stderr
        assert dest.read_bytes() == target.read_bytes()
        assert not os.path.exists(journal)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# -- destinations that are not files


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_character_device_is_refused_before_any_journal(tmp_path: Path, device: str) -> None:
    source = make_sparse(tmp_path / "source", 64 * KiB, [(0, 64 * KiB)])
    api.diff(None, str(source), str(tmp_path / "full.patch"), full=True, block_size=BS)
    jpath = journal_path(device)
    try:
        r = run_cli("apply", str(tmp_path / "full.patch"), device, check=False)
    finally:
        leftover = os.path.exists(jpath)
        if leftover:
            os.unlink(jpath)
    line = error_line(r, 2)
    assert device in line and "regular file or a block device" in line
    assert not leftover


def test_fifo_is_refused(tmp_path: Path) -> None:
    source = make_sparse(tmp_path / "source", 64 * KiB, [(0, 64 * KiB)])
    api.diff(None, str(source), str(tmp_path / "full.patch"), full=True, block_size=BS)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError):
        api.apply(str(tmp_path / "full.patch"), str(fifo))
    assert not os.path.exists(journal_path(str(fifo)))
