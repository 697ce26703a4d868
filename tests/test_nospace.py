"""A full filesystem (ENOSPC) on real small filesystems: a loop-mounted ext4 image and a tmpfs.
apply stops with exit 3 and one line naming the path, the offset and the cause, leaving only
whole base or target blocks; once space is freed the same apply finishes the job. diff and
signature with -o leave no file under the output name.

Needs root (mount, losetup); skipped otherwise."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import error_line, make_sparse, pattern, run_cli

MiB = 1 << 20
BS = 64 << 10  # the default block size, as a user would run it
SIZE = 24 * MiB
TOOLS = ("mount", "umount", "losetup", "mkfs.ext4")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                       reason=f"needs {', '.join(TOOLS)}"),
]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _unmount(mnt: Path) -> None:
    if _run("umount", str(mnt)).returncode != 0:
        _run("umount", "-l", str(mnt))


@pytest.fixture(params=["ext4", "tmpfs"])
def fs_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def small_fs(fs_kind: str, tmp: Path) -> Iterator[Path]:
    """A freshly made, mounted filesystem of a few tens of MiB; unmounted (and its loop
    device detached) whatever happens."""
    mnt = tmp / "mnt"
    mnt.mkdir()
    if fs_kind == "tmpfs":
        r = _run("mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt))
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        try:
            yield mnt
        finally:
            _unmount(mnt)
        return
    image = tmp / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    r = _run("losetup", "--find", "--show", str(image))
    if r.returncode != 0:
        pytest.skip(f"no loop device available: {r.stderr.strip()}")
    loop = r.stdout.strip()
    try:
        r = _run("mkfs.ext4", "-q", "-F", "-m", "0", loop)
        assert r.returncode == 0, r.stderr
        r = _run("mount", loop, str(mnt))
        if r.returncode != 0:
            pytest.skip(f"cannot mount an ext4 image here: {r.stderr.strip()}")
        try:
            yield mnt
        finally:
            _unmount(mnt)
    finally:
        _run("losetup", "-d", loop)


def fill(folder: Path, name: str = "filler") -> Path:
    """Fill the filesystem up to its last byte with one file."""
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (MiB, 4096, 512, 1):
            data = pattern(chunk, chunk)
            while True:
                try:
                    os.write(fd, data)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bfree * st.f_frsize


def reserve(folder: Path, n: int) -> Path:
    """A file of n bytes to delete later, leaving that much room on a full filesystem."""
    path = folder / "spare"
    path.write_bytes(pattern(n, 5))
    return path


def blocks(data: bytes) -> list[bytes]:
    return [data[i : i + BS] for i in range(0, len(data), BS)]


def base_and_target(tmp: Path, dest: Path) -> tuple[bytes, bytes, Path, Path]:
    """A mostly empty base at dest, a target outside with 20 MiB of incompressible data, the
    signature of dest and the patch (both outside dest's filesystem)."""
    base_map: list[tuple[int, bytes | int]] = [(0, 256 << 10), (8 * MiB, 512 << 10)]
    make_sparse(dest, SIZE, base_map)
    target = make_sparse(tmp / "target.img", SIZE,
                         [(0, 256 << 10), (2 * MiB, 20 * MiB), (23 * MiB, b"end")])
    sig, patch = tmp / "dest.sig", tmp / "update.patch"
    run_cli("signature", str(dest), "-o", str(sig))
    run_cli("diff", str(sig), str(target), "-o", str(patch))
    return dest.read_bytes(), target.read_bytes(), sig, patch


def fail_for_lack_of_space(mnt: Path, tmp: Path) -> tuple[bytes, bytes, Path, Path, Path]:
    """Run an apply that needs 20 MiB onto mnt with about 4 MiB free; check its error line.
    Returns base, target, dest, patch and the filler file to delete for room."""
    dest = mnt / "dest.img"
    base, target, _, patch = base_and_target(tmp, dest)
    spare = reserve(mnt, 4 * MiB)
    filler = fill(mnt)
    spare.unlink()
    assert free_bytes(mnt) < 8 * MiB  # far less than the 20 MiB the patch brings
    line = error_line(run_cli("apply", str(patch), str(dest), check=False), 3)
    assert "No space left" in line and str(dest) in line and "at byte" in line, line
    assert os.path.getsize(dest) == SIZE
    assert dest.read_bytes() != base, "the filesystem filled up before the first write"
    return base, target, dest, patch, filler


def test_apply_onto_a_full_filesystem_stops_and_resumes_once_there_is_room(small_fs: Path,
                                                                           tmp: Path) -> None:
    _, target, dest, patch, filler = fail_for_lack_of_space(small_fs, tmp)
    filler.unlink()
    r = run_cli("apply", str(patch), str(dest), "--verify", check=False)
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == target
    assert sorted(os.listdir(small_fs)) == sorted(n for n in ["dest.img", "lost+found"]
                                                  if (small_fs / n).exists())


def test_apply_onto_a_full_filesystem_leaves_whole_blocks(small_fs: Path, tmp: Path) -> None:
    # apply reserves each step (fallocate) before writing it, so ENOSPC stops it between blocks.
    base, target, dest, _, _ = fail_for_lack_of_space(small_fs, tmp)
    now = dest.read_bytes()
    bad = [i for i, (d, b, t) in enumerate(zip(blocks(now), blocks(base), blocks(target), strict=True))
           if d not in (b, t)]
    assert not bad, f"blocks {bad} are neither base nor target"


@pytest.mark.parametrize("command", ["diff", "signature"])
def test_output_onto_a_full_filesystem_leaves_no_file(small_fs: Path, tmp: Path, command: str) -> None:
    _, _, sig, _ = base_and_target(tmp, tmp / "dest.img")
    fill(small_fs)
    before = sorted(os.listdir(small_fs))
    out = small_fs / "out.bin"
    if command == "diff":
        args = ["diff", str(sig), str(tmp / "target.img"), "-o", str(out)]
    else:
        args = ["signature", str(tmp / "target.img"), "-o", str(out), "-b", "4K"]
    line = error_line(run_cli(*args, check=False), 3)
    assert "No space left" in line and str(out) in line, line
    assert sorted(os.listdir(small_fs)) == before  # neither out.bin nor a temporary beside it


def test_split_output_onto_a_full_filesystem_leaves_no_piece(small_fs: Path, tmp: Path) -> None:
    _, _, sig, _ = base_and_target(tmp, tmp / "dest.img")
    spare = reserve(small_fs, 6 * MiB)
    fill(small_fs)
    spare.unlink()
    before = sorted(os.listdir(small_fs))
    out = small_fs / "out.patch"
    line = error_line(run_cli("diff", str(sig), str(tmp / "target.img"), "-o", str(out),
                              "--split", "4M", check=False), 3)
    assert "No space left" in line, line
    assert sorted(os.listdir(small_fs)) == before, "pieces of an unfinished patch were left"
