"""diff --since: what the extent maps of a reflink snapshot and its source prove equal, on
real XFS and btrfs file systems (loop-mounted), and what they refuse to prove."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparsepatch import since
from sparsepatch.errors import UsageError

MiB = 1 << 20
MKFS = {"xfs": ["mkfs.xfs", "-q", "-f"], "btrfs": ["mkfs.btrfs", "-q", "-f"],
        "ext4": ["mkfs.ext4", "-q", "-F"]}
PACKAGE = {"xfs": "xfsprogs", "btrfs": "btrfs-progs", "ext4": "e2fsprogs"}


@contextlib.contextmanager
def mounted(kind: str, where: Path, size: int = 1200 * MiB) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    if shutil.which(MKFS[kind][0]) is None:
        pytest.skip(f"{MKFS[kind][0]} is missing (Debian package {PACKAGE[kind]})")
    image, mnt = where / f"{kind}.img", where / f"{kind}-mnt"
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(MKFS[kind] + [str(image)], check=True, capture_output=True)
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount {kind}: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)


@pytest.fixture(scope="module", params=["xfs", "btrfs"])
def fs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with mounted(request.param, tmp_path_factory.mktemp(request.param)) as mnt:
        yield mnt


def _image(path: Path, size: int, extents: list[tuple[int, int]], seed: int = 1) -> None:
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in extents:
            f.seek(off)
            f.write(rng.randbytes(n))
        os.fsync(f.fileno())


def _write(path: Path, off: int, n: int, seed: int = 9) -> None:
    import random

    with open(path, "r+b") as f:
        f.seek(off)
        f.write(random.Random(seed).randbytes(n))
        os.fsync(f.fileno())


def _ranges(snap: Path, src: Path, expected: int | None = None) -> tuple[list[tuple[int, int]], int]:
    a, b = os.open(snap, os.O_RDONLY), os.open(src, os.O_RDONLY)
    try:
        return since.changed_ranges(a, str(snap), b, str(src),
                                    os.fstat(a).st_size if expected is None else expected)
    finally:
        os.close(a)
        os.close(b)


def _covers(ranges: list[tuple[int, int]], off: int, n: int) -> bool:
    return any(s <= off and off + n <= e for s, e in ranges)


def test_only_what_was_written_since_the_snapshot_is_read(fs: Path) -> None:
    img, snap = fs / "a.img", fs / "a.snap"
    _image(img, 512 * MiB, [(i * 8 * MiB, MiB) for i in range(64)])
    subprocess.run(["cp", "--reflink=always", str(img), str(snap)], check=True)
    writes = [(5 * MiB, 100_000), (300 * MiB + 12345, 70_000), (511 * MiB, 4096)]
    for k, (off, n) in enumerate(writes):
        _write(img, off, n, seed=k)
    ranges, shared = _ranges(snap, img)
    for off, n in writes:
        assert _covers(ranges, off, n), (off, n, ranges)
    read = sum(e - s for s, e in ranges)
    assert read <= 3 * sum(n for _, n in writes) + 1 * MiB, ranges  # the change, not the image
    assert shared >= 60 * MiB


def test_a_punched_range_and_growth_are_read(fs: Path) -> None:
    img, snap = fs / "b.img", fs / "b.snap"
    _image(img, 64 * MiB, [(0, 32 * MiB)])
    subprocess.run(["cp", "--reflink=always", str(img), str(snap)], check=True)
    subprocess.run(["fallocate", "--punch-hole", "-o", str(4 * MiB), "-l", str(MiB), str(img)], check=True)
    with open(img, "r+b") as f:
        f.truncate(80 * MiB)
    _write(img, 70 * MiB, 4096)
    ranges, _ = _ranges(snap, img)
    assert _covers(ranges, 4 * MiB, MiB)  # data in the snapshot, a hole now: must be seen
    assert _covers(ranges, 64 * MiB, 16 * MiB)  # appended
    assert not _covers(ranges, 8 * MiB, 4096)  # untouched


def test_a_copy_that_is_not_a_reflink_is_refused(fs: Path) -> None:
    img, copy = fs / "c.img", fs / "c.copy"
    _image(img, 16 * MiB, [(0, 4 * MiB)])
    subprocess.run(["cp", "--reflink=never", str(img), str(copy)], check=True)
    with pytest.raises(UsageError, match="shares no extent.*cp --reflink=always"):
        _ranges(copy, img)


def test_sizes_that_cannot_be_the_snapshot_are_refused(fs: Path) -> None:
    img, snap = fs / "d.img", fs / "d.snap"
    _image(img, 16 * MiB, [(0, 4 * MiB)])
    subprocess.run(["cp", "--reflink=always", str(img), str(snap)], check=True)
    with pytest.raises(UsageError, match="signature describes 1234"):
        _ranges(snap, img, expected=1234)
    with open(img, "r+b") as f:
        f.truncate(8 * MiB)
    with pytest.raises(UsageError, match="shorter than the snapshot"):
        _ranges(snap, img)


def test_ext4_is_refused_with_the_reason(tmp_path: Path) -> None:
    with mounted("ext4", tmp_path, 64 * MiB) as mnt:
        img, snap = mnt / "e.img", mnt / "e.snap"
        _image(img, 8 * MiB, [(0, MiB)])
        shutil.copyfile(img, snap)
        with pytest.raises(UsageError, match="needs a reflink snapshot on XFS or btrfs; this is ext4"):
            _ranges(snap, img)


# ------------------------------------------------------------------ the command line


def _device_reads(mnt: Path) -> int:
    """Bytes read so far from the block device mounted at mnt (/sys/block/*/stat)."""
    dev = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mnt)], capture_output=True,
                         text=True, check=True).stdout.strip()
    fields = Path(f"/sys/block/{os.path.basename(dev)}/stat").read_text().split()
    return int(fields[2]) * 512


def _drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError as e:
        pytest.skip(f"cannot drop the page cache: {e}")


def test_diff_since_reads_the_change_and_writes_the_same_patch(fs: Path) -> None:
    from conftest import run_cli

    img, snap = fs / "vm.img", fs / "vm.snap"
    data = [(i * 4 * MiB, 2 * MiB) for i in range(128)]  # 256 MiB of data in a 512 MiB image
    _image(img, 512 * MiB, data)
    sig = fs.parent / f"{fs.name}.sig"
    run_cli("signature", str(img), "-o", str(sig))
    subprocess.run(["cp", "--reflink=always", str(img), str(snap)], check=True)
    changed = 0
    for k in range(10):  # 10 MiB rewritten, scattered; one write past the end (growth)
        _write(img, k * 40 * MiB + 12345, MiB, seed=100 + k)
        changed += MiB
    _write(img, 512 * MiB + 4096, 8192, seed=7)
    changed += 8192
    full, fast = fs.parent / f"{fs.name}-full.patch", fs.parent / f"{fs.name}-since.patch"
    run_cli("diff", str(sig), str(img), "-o", str(full))
    _drop_caches()
    before = _device_reads(fs)
    r = run_cli("diff", "--since", str(snap), str(sig), str(img), "-o", str(fast), "--json")
    read = _device_reads(fs) - before
    assert fast.read_bytes() == full.read_bytes()
    stats = json.loads(r.stdout)
    assert stats["bytes_read"] <= 2 * changed + 16 * MiB, stats
    assert read <= 3 * changed + 16 * MiB, (read, changed)
    # And it applies: the snapshot (the state the signature describes) becomes the image.
    run_cli("apply", str(fast), str(snap))
    assert _same(snap, img)


def test_diff_since_refuses_ext4_and_a_stream(tmp_path: Path) -> None:
    from conftest import error_line, run_cli

    with mounted("ext4", tmp_path, 64 * MiB) as mnt:
        img, snap, sig = mnt / "e.img", mnt / "e.snap", mnt / "e.sig"
        _image(img, 8 * MiB, [(0, MiB)])
        shutil.copyfile(img, snap)
        run_cli("signature", str(img), "-o", str(sig))
        r = run_cli("diff", "--since", str(snap), str(sig), str(img), "-o", str(mnt / "p"), check=False)
        assert "needs a reflink snapshot on XFS or btrfs; this is ext4" in error_line(r, 2)
        r = run_cli("diff", "--since", str(snap), str(sig), "-", "-o", str(mnt / "p"), check=False,
                    input=img.read_bytes())
        assert "not stdin" in error_line(r, 2)
        assert not (mnt / "p").exists()


def _same(a: Path, b: Path) -> bool:
    with open(a, "rb") as f, open(b, "rb") as g:
        while True:
            x, y = f.read(1 << 20), g.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
