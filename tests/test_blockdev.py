"""Block devices (loop devices over sparse files): signature, diff and apply on /dev nodes,
as an administrator syncs an LVM volume or a disk with an image file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KiB, MiB, allocated, default_journal, make_sparse, pattern, run_cli

from sparsepatch.format import CRC, SIG_TRAILER, read_signature

BS = 64 * KiB
SIZE = 16 * MiB
SLACK = 2 * BS  # filesystem metadata and rounding the allocation may differ by
BLKDISCARD = 0x1277
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81


def _why_no_loop() -> str | None:
    if os.geteuid() != 0:
        return "attaching loop devices needs root"
    if shutil.which("losetup") is None:
        return "losetup (util-linux) is not installed"
    if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
        return "this kernel or container has no loop devices"
    return None


pytestmark = pytest.mark.skipif(_why_no_loop() is not None, reason=_why_no_loop() or "")


@contextlib.contextmanager
def loop(backing: Path, renew: bool = False) -> Iterator[str]:
    """backing attached as a loop device; detached (and its default journal removed) after.
    renew: also remove and re-create the device, for a test that changed its queue limits
    (which outlive the attachment and cannot always be written back)."""
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    journal = device_journal(dev)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal)  # a journal a crashed earlier run left for this device name
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal)
        if renew:
            _renew(dev)


def _renew(dev: str) -> None:
    index = os.minor(os.stat(dev).st_rdev)
    fd = os.open("/dev/loop-control", os.O_RDWR)
    try:
        for _ in range(50):  # udev may still hold the device just after the detach
            try:
                fcntl.ioctl(fd, LOOP_CTL_REMOVE, index)
                break
            except OSError:
                time.sleep(0.1)
        with contextlib.suppress(OSError):  # exists already if another process re-created it
            fcntl.ioctl(fd, LOOP_CTL_ADD, index)
    finally:
        os.close(fd)


def device_journal(dev: str) -> str:
    """Where apply keeps the journal for dev unless told otherwise."""
    path = default_journal(dev)
    assert os.path.dirname(path) == "/var/lib/sparsepatch"
    return path


def read_dev(dev: str) -> bytes:
    with open(dev, "rb", buffering=0) as f:
        return f.read()


def digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def holes_at(path: Path, start: int, end: int) -> bool:
    """True when [start, end) of path holds no allocated byte."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            data = os.lseek(fd, start, os.SEEK_DATA)
        except OSError:
            return True  # no data after start
        return data >= end
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def base_and_target(tmp: Path) -> tuple[Path, Path]:
    """A base image and a target that changes, zeroes, keeps and adds blocks, all aligned
    to the block size so that allocation compares exactly."""
    base = make_sparse(tmp / "base.img", SIZE, [
        (0, 4 * BS),                     # kept
        (10 * BS, 4 * BS),               # changed
        (40 * BS, 8 * BS),               # becomes zeros
        (100 * BS, 4 * BS),              # kept
    ])
    target = make_sparse(tmp / "target.img", SIZE, [
        (0, pattern(4 * BS, 0)),
        (10 * BS, pattern(4 * BS, 777)),
        (100 * BS, pattern(4 * BS, 100 * BS)),
        (200 * BS, 4 * BS),              # new
    ])
    return base, target


# ---------------------------------------------------------------------------- signature


def test_signature_of_device_equals_signature_of_backing_file(tmp: Path) -> None:
    backing = make_sparse(tmp / "disk.img", SIZE, [
        (0, 3 * BS + 100),               # ends inside a block
        (20 * BS + 4096, 5000),          # starts and ends inside a block
        (60 * BS, bytes(3 * BS)),        # allocated zeros: no data in either signature
        (SIZE - 4096, 4096),             # the last block
    ])
    file_sig = run_cli("signature", str(backing), "-q").stdout
    with loop(backing) as dev:
        dev_sig = run_cli("signature", dev, "-q").stdout
    a = read_signature(io.BytesIO(file_sig).read, "file signature")
    b = read_signature(io.BytesIO(dev_sig).read, "device signature")
    assert b.identity == a.identity
    assert b.header == a.header
    assert b.header.file_size == SIZE
    assert list(b.data_index) == list(a.data_index)
    assert bytes(b.hashes) == bytes(a.hashes)
    assert a.mtime_ns == os.stat(backing).st_mtime_ns
    # Everything before the trailer (which holds the mtime, and a CRC over it) is identical.
    trailer = SIG_TRAILER.size + CRC.size
    assert len(dev_sig) == len(file_sig)
    assert dev_sig[:-trailer] == file_sig[:-trailer]


# ---------------------------------------------------------------------------- device as source


def test_diff_from_device_source_applies_to_file(tmp: Path) -> None:
    base, target = base_and_target(tmp)
    dest = base
    run_cli("signature", str(dest), "-o", str(tmp / "dest.sig"), "-q")
    with loop(target) as dev:
        run_cli("diff", str(tmp / "dest.sig"), dev, "-o", str(tmp / "p"), "-q")
        run_cli("diff", "--full", dev, "-o", str(tmp / "full"), "-q")
    run_cli("apply", str(tmp / "p"), str(dest), "--verify", "-q")
    assert dest.read_bytes() == target.read_bytes()
    assert allocated(dest) <= allocated(target) + SLACK

    # The first copy of a volume into a new, sparse image file.
    fresh = tmp / "fresh.img"
    run_cli("apply", str(tmp / "full"), str(fresh), "--verify", "-q")
    assert fresh.read_bytes() == target.read_bytes()
    assert allocated(fresh) <= allocated(target) + SLACK


# ---------------------------------------------------------------------------- device as destination


def _disable_discard(dev: str) -> None:
    knob = Path("/sys/block") / os.path.basename(dev) / "queue" / "discard_max_bytes"
    try:
        knob.write_text("0\n")
    except OSError as e:
        pytest.skip(f"cannot turn off discard on {dev} ({knob}: {e.strerror})")
    fd = os.open(dev, os.O_RDWR)
    try:
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("<QQ", 0, BS))
    except OSError:
        return  # as wanted: the device now refuses BLKDISCARD
    finally:
        os.close(fd)
    pytest.skip(f"{dev} still accepts BLKDISCARD with discard_max_bytes 0")


@pytest.mark.parametrize("mode", ["plain", "discard", "discard-unsupported"])
def test_apply_onto_device_keeps_backing_file_sparse(tmp: Path, mode: str) -> None:
    backing, target = base_and_target(tmp)
    base_bytes = backing.read_bytes()
    with loop(backing, renew=mode == "discard-unsupported") as dev:
        if mode == "discard-unsupported":
            _disable_discard(dev)
        run_cli("signature", dev, "-o", str(tmp / "dev.sig"), "-q", "-b", "64K")
        run_cli("diff", str(tmp / "dev.sig"), str(target), "-o", str(tmp / "p"), "-q")
        extra = ["--discard"] if mode != "plain" else []
        r = run_cli("apply", str(tmp / "p"), dev, "--verify", "--json", *extra)
        stats = json.loads(r.stdout)
        assert read_dev(dev) == target.read_bytes()
        assert read_dev(dev) != base_bytes
        assert stats["blocks_punched"] == 8
        assert stats["target_size"] == SIZE
        sync_file(backing)
        if mode != "discard-unsupported":
            assert holes_at(backing, 40 * BS, 48 * BS), "zero blocks were written, not punched"
            assert allocated(backing) <= allocated(target) + SLACK
        # Without discard the kernel can only zero the range (BLKZEROOUT), which a loop
        # device turns into allocated zeros: correct content is all there is to check.
        assert not os.path.exists(device_journal(dev))
        # Applying again finds every block current and writes nothing.
        again = json.loads(run_cli("apply", str(tmp / "p"), dev, "--json", *extra).stdout)
        assert again["blocks_written"] == again["blocks_punched"] == 0
        assert again["blocks_skipped"] > 0
    assert backing.read_bytes() == target.read_bytes()


def test_patch_for_another_size_is_refused_on_device(tmp: Path) -> None:
    backing, _ = base_and_target(tmp)
    smaller = make_sparse(tmp / "smaller.img", SIZE - 4 * MiB, [(0, 4 * BS), (BS * 30, BS)])
    with loop(backing) as dev:
        before = digest(dev)
        run_cli("signature", dev, "-o", str(tmp / "dev.sig"), "-q")
        run_cli("diff", str(tmp / "dev.sig"), str(smaller), "-o", str(tmp / "p"), "-q")
        run_cli("diff", "--full", str(smaller), "-o", str(tmp / "full"), "-q")
        for patch in ("p", "full"):
            r = run_cli("apply", str(tmp / patch), dev, check=False)
            assert r.returncode == 2, r.stderr
            err = r.stderr.decode()
            assert err.startswith("sparsepatch: error: ")
            assert "block device" in err and str(SIZE) in err
            assert digest(dev) == before
            assert not os.path.exists(device_journal(dev))


# ---------------------------------------------------------------------------- journal


def _two_record_patch(tmp: Path) -> tuple[Path, Path, bytes]:
    """A base, a target and a patch of two large data records (random, so the patch is
    about as large as the data), to stop apply between them."""
    base = make_sparse(tmp / "jbase.img", SIZE, [(0, BS)])
    target = make_sparse(tmp / "jtarget.img", SIZE, [(0, 2 * MiB), (8 * MiB, 2 * MiB)])
    run_cli("signature", str(base), "-o", str(tmp / "j.sig"), "-q")
    run_cli("diff", str(tmp / "j.sig"), str(target), "-o", str(tmp / "j.patch"), "-q")
    info = json.loads(run_cli("info", str(tmp / "j.patch"), "--json").stdout)
    assert info["records"]["data"] == 2
    return base, target, (tmp / "j.patch").read_bytes()


@pytest.mark.parametrize("where", ["default", "option"])
def test_device_journal_location_and_removal(tmp: Path, where: str) -> None:
    base, target, patch = _two_record_patch(tmp)
    with loop(base) as dev:
        journal = device_journal(dev) if where == "default" else str(tmp / "my.journal")
        extra = [] if where == "default" else ["--journal", journal]
        proc = subprocess.Popen([sys.executable, "-m", "sparsepatch", "apply", "-", dev, "-q", *extra],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdin is not None
            # The header and the first record, and part of the second: apply writes the
            # first record, then waits for the rest of the second.
            proc.stdin.write(patch[: len(patch) * 3 // 4])
            proc.stdin.flush()
            deadline = time.monotonic() + 30
            while not os.path.exists(journal) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            seen = os.path.exists(journal)
            if where == "option":
                assert not os.path.exists(device_journal(dev))
            assert not os.path.exists(os.path.join(os.path.dirname(dev), f".{os.path.basename(dev)}"
                                                   ".sparsepatch-journal"))
            _, err = proc.communicate(patch[len(patch) * 3 // 4 :], timeout=60)
        finally:
            _end(proc)
        assert proc.returncode == 0, err
        assert seen, f"no journal appeared at {journal} while apply was running"
        assert not os.path.exists(journal)
        assert read_dev(dev) == target.read_bytes()


# ---------------------------------------------------------------------------- exclusive access


@contextlib.contextmanager
def paused_apply(patch: bytes, dev: str) -> Iterator[subprocess.Popen[bytes]]:
    """An apply of patch (from stdin) onto dev that has read the header, taken its lock
    and waits for the rest of the patch; it is given the rest when the block ends."""
    proc = subprocess.Popen([sys.executable, "-m", "sparsepatch", "apply", "-", dev, "-q"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        proc.stdin.write(patch[:200])
        proc.stdin.flush()
        fd = os.open(dev, os.O_RDONLY)
        try:
            deadline = time.monotonic() + 30
            probe = struct.pack("@hhqqi", fcntl.F_RDLCK, 0, 0, 0, 0) + bytes(8)
            while proc.poll() is None and time.monotonic() < deadline:
                if struct.unpack_from("@h", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0] == fcntl.F_WRLCK:
                    break  # the apply holds its lock
                time.sleep(0.02)
            else:
                pytest.fail(f"apply did not take its lock on {dev} (exit {proc.returncode})")
        finally:
            os.close(fd)
        yield proc
        _, err = proc.communicate(patch[200:], timeout=60)
        assert proc.returncode == 0, err
    finally:
        _end(proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Stop proc if it still runs, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    proc.wait()


@pytest.mark.parametrize("path", [
    "symlink",
    "device node",  # another inode for the same device: flock alone would not see it
])
def test_second_apply_on_the_same_device_is_refused(tmp: Path, path: str) -> None:
    base, target, patch = _two_record_patch(tmp)
    (tmp / "j.patch").write_bytes(patch)
    with loop(base) as dev:
        other = tmp / "other"
        if path == "symlink":
            os.symlink(dev, other)
        else:
            os.mknod(other, 0o600 | 0o060000, os.stat(dev).st_rdev)
        with paused_apply(patch, dev):
            r = run_cli("apply", str(tmp / "j.patch"), str(other), check=False)
            assert r.returncode == 7, r.stderr
            assert b"another sparsepatch apply holds" in r.stderr
        assert read_dev(dev) == target.read_bytes()


def test_apply_onto_a_mounted_device_is_refused(tmp: Path) -> None:
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    backing = make_sparse(tmp / "fs.img", SIZE, [])
    with loop(backing) as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
        mnt = tmp / "mnt"
        mnt.mkdir()
        r = subprocess.run(["mount", dev, str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a test filesystem: {r.stderr.strip()}")
        try:
            # The patch changes only the last block, free space of this small filesystem.
            run_cli("signature", dev, "-o", str(tmp / "dev.sig"), "-q")
            target = tmp / "target.img"
            with open(dev, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            with open(target, "r+b") as f:
                f.seek(SIZE - BS)
                f.write(pattern(BS, 5))
            run_cli("diff", str(tmp / "dev.sig"), str(target), "-o", str(tmp / "p"), "-q")
            with open(dev, "rb") as f:
                f.seek(SIZE - BS)
                tail = f.read(BS)
            r2 = run_cli("apply", str(tmp / "p"), dev, check=False)
            with open(dev, "rb") as f:
                f.seek(SIZE - BS)
                assert f.read(BS) == tail
            assert r2.returncode != 0
            assert r2.stderr.startswith(b"sparsepatch: error: ")
        finally:
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
