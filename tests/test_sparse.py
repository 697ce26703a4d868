"""sparse.py on real files: extents, holes at the end, punching and reserving, and the
fallbacks where the filesystem or the kernel says no (forced by making the call fail)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KiB, MiB, allocated, allocated_blocks, extents, make_sparse, pattern

from sparsepatch import sparse
from sparsepatch.errors import IOFailure, Locked


@pytest.fixture
def fd_of(tmp: Path) -> Iterator[object]:
    opened: list[int] = []

    def open_(path: Path, flags: int = os.O_RDWR) -> int:
        fd = os.open(path, flags)
        opened.append(fd)
        return fd

    yield open_
    for fd in opened:
        os.close(fd)


def _lseek_failing(whence: int, err: int) -> object:
    real = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        if how == whence:
            raise OSError(err, os.strerror(err))
        return real(fd, pos, how)

    return lseek


# -- data_extents

def test_extents_skip_holes(tmp: Path, fd_of: object) -> None:
    p = make_sparse(tmp / "f", 4 * MiB, [(0, 64 * KiB), (MiB, 128 * KiB), (3 * MiB, 4 * KiB)])
    fd = fd_of(p)  # type: ignore[operator]
    assert list(sparse.data_extents(fd, 4 * MiB)) == extents(p)
    assert extents(p) == [(0, 64 * KiB), (MiB, MiB + 128 * KiB), (3 * MiB, 3 * MiB + 4 * KiB)]


def test_a_hole_at_the_end_is_not_an_extent(tmp: Path, fd_of: object) -> None:
    """SEEK_DATA past the last data fails with ENXIO: the rest is a hole, not an error."""
    p = make_sparse(tmp / "f", 2 * MiB, [(0, 64 * KiB)])
    assert list(sparse.data_extents(fd_of(p), 2 * MiB)) == [(0, 64 * KiB)]  # type: ignore[operator]
    empty = make_sparse(tmp / "empty", 2 * MiB, [])
    assert list(sparse.data_extents(fd_of(empty), 2 * MiB)) == []  # type: ignore[operator]


def test_extents_stop_at_the_size_given(tmp: Path, fd_of: object) -> None:
    p = make_sparse(tmp / "f", 2 * MiB, [(0, 64 * KiB), (MiB, 64 * KiB)])
    assert list(sparse.data_extents(fd_of(p), 32 * KiB)) == [(0, 32 * KiB)]  # type: ignore[operator]


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE])
def test_without_seek_data_the_whole_file_is_one_extent(tmp: Path, fd_of: object,
                                                       monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    p = make_sparse(tmp / "f", 2 * MiB, [(MiB, 64 * KiB)])
    fd = fd_of(p)  # type: ignore[operator]
    monkeypatch.setattr(os, "lseek", _lseek_failing(os.SEEK_DATA, err))
    assert list(sparse.data_extents(fd, 2 * MiB)) == [(0, 2 * MiB)]


def test_without_seek_hole_an_extent_runs_to_the_end(tmp: Path, fd_of: object,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_sparse(tmp / "f", 2 * MiB, [(MiB, 64 * KiB)])
    fd = fd_of(p)  # type: ignore[operator]
    monkeypatch.setattr(os, "lseek", _lseek_failing(os.SEEK_HOLE, errno.EINVAL))
    assert list(sparse.data_extents(fd, 2 * MiB)) == [(MiB, 2 * MiB)]


def test_a_failing_seek_data_is_not_taken_for_a_hole(tmp: Path, fd_of: object,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_sparse(tmp / "f", MiB, [(0, 64 * KiB)])
    fd = fd_of(p)  # type: ignore[operator]
    monkeypatch.setattr(os, "lseek", _lseek_failing(os.SEEK_DATA, errno.EIO))
    with pytest.raises(OSError) as e:
        list(sparse.data_extents(fd, MiB))
    assert e.value.errno == errno.EIO


def test_conftest_extents_skip_where_seek_data_is_unsupported(tmp: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An allocation check that cannot see allocation must not pass: it skips, saying why."""
    p = make_sparse(tmp / "f", MiB, [(0, 64 * KiB)])
    monkeypatch.setattr(os, "lseek", _lseek_failing(os.SEEK_DATA, errno.EINVAL))
    with pytest.raises(pytest.skip.Exception, match="SEEK_DATA"):
        extents(p)
    monkeypatch.setattr(os, "lseek", _lseek_failing(os.SEEK_DATA, errno.EIO))
    with pytest.raises(OSError):
        extents(p)


# -- reading and writing whole ranges

def test_pread_full_is_short_only_at_the_end(tmp: Path, fd_of: object) -> None:
    data = pattern(10_000, 1)
    (tmp / "f").write_bytes(data)
    fd = fd_of(tmp / "f")  # type: ignore[operator]
    buf = bytearray(8192)
    assert sparse.pread_full(fd, memoryview(buf), 0) == 8192 and bytes(buf) == data[:8192]
    assert sparse.pread_full(fd, memoryview(buf), 8192) == 10_000 - 8192
    assert bytes(buf[: 10_000 - 8192]) == data[8192:]


def test_short_reads_and_writes_are_continued(tmp: Path, fd_of: object,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may move fewer bytes than asked (signals, pipes, some filesystems)."""
    (tmp / "f").write_bytes(b"")
    fd = fd_of(tmp / "f")  # type: ignore[operator]
    data = pattern(5000, 2)
    real_pwrite, real_preadv = os.pwrite, os.preadv
    monkeypatch.setattr(os, "pwrite", lambda f, b, off: real_pwrite(f, bytes(b)[:777], off))
    monkeypatch.setattr(os, "preadv", lambda f, bufs, off: real_preadv(f, [bufs[0][:333]], off))
    sparse.pwrite_full(fd, data, 100)
    buf = bytearray(5100)
    assert sparse.pread_full(fd, memoryview(buf), 0) == 5100
    assert bytes(buf) == bytes(100) + data


# -- punching and reserving

def test_punch_deallocates_and_reads_zeros(tmp: Path, fd_of: object) -> None:
    p = make_sparse(tmp / "f", MiB, [(0, MiB)])
    fd = fd_of(p)  # type: ignore[operator]
    assert sparse.punch_hole(fd, 256 * KiB, 256 * KiB)
    assert p.read_bytes()[256 * KiB : 512 * KiB] == bytes(256 * KiB)
    assert p.read_bytes()[: 256 * KiB] == pattern(MiB, 0)[: 256 * KiB]
    assert allocated_blocks(p, 64 * KiB) == set(range(16)) - set(range(4, 8))
    assert os.path.getsize(p) == MiB


def test_punch_of_nothing_does_nothing(tmp: Path, fd_of: object, monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_sparse(tmp / "f", MiB, [(0, MiB)])
    monkeypatch.setattr(sparse, "_fallocate", lambda *a: pytest.fail("called"))
    assert sparse.punch_hole(fd_of(p), 0, 0)  # type: ignore[operator]


@pytest.mark.parametrize("err", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV])
def test_punch_unsupported_says_so_and_changes_nothing(tmp: Path, fd_of: object,
                                                      monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """The caller then writes zeros instead: the content must still be whole here."""
    p = make_sparse(tmp / "f", MiB, [(0, MiB)])
    fd = fd_of(p)  # type: ignore[operator]
    monkeypatch.setattr(sparse, "_fallocate", lambda *a: err)
    assert sparse.punch_hole(fd, 0, 64 * KiB) is False
    assert p.read_bytes() == pattern(MiB, 0)


def test_punch_failing_otherwise_raises(tmp: Path, fd_of: object, monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_sparse(tmp / "f", MiB, [(0, MiB)])
    monkeypatch.setattr(sparse, "_fallocate", lambda *a: errno.EIO)
    with pytest.raises(OSError) as e:
        sparse.punch_hole(fd_of(p), 0, 64 * KiB)  # type: ignore[operator]
    assert e.value.errno == errno.EIO


def test_reserve_allocates_without_growing(tmp: Path, fd_of: object) -> None:
    p = make_sparse(tmp / "f", 64 * KiB, [])
    before = allocated(p)
    sparse.reserve(fd_of(p), 0, 4 * MiB)  # type: ignore[operator]
    assert os.path.getsize(p) == 64 * KiB
    assert allocated(p) >= before + 4 * MiB
    assert p.read_bytes() == bytes(64 * KiB)


@pytest.mark.parametrize("err", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV])
def test_reserve_unsupported_is_a_no_op(tmp: Path, fd_of: object, monkeypatch: pytest.MonkeyPatch,
                                       err: int) -> None:
    p = make_sparse(tmp / "f", 64 * KiB, [])
    monkeypatch.setattr(sparse, "_fallocate", lambda *a: err)
    sparse.reserve(fd_of(p), 0, MiB)  # type: ignore[operator]
    assert allocated(p) == 0


def test_reserve_on_a_full_disk_raises(tmp: Path, fd_of: object, monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_sparse(tmp / "f", 64 * KiB, [])
    monkeypatch.setattr(sparse, "_fallocate", lambda *a: errno.ENOSPC)
    with pytest.raises(OSError) as e:
        sparse.reserve(fd_of(p), 0, MiB)  # type: ignore[operator]
    assert e.value.errno == errno.ENOSPC


def _why_no_loop() -> str | None:
    if os.geteuid() != 0:
        return "attaching loop devices needs root"
    if shutil.which("losetup") is None:
        return "losetup (util-linux) is not installed"
    return None


@pytest.mark.skipif(_why_no_loop() is not None, reason=_why_no_loop() or "")
def test_punch_on_a_device_falls_back_to_zeroout(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backing = make_sparse(tmp / "disk", 4 * MiB, [(0, 4 * MiB)])
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot attach a loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        fd = os.open(dev, os.O_RDWR)
        try:
            assert sparse.is_block_device(fd) and sparse.file_size(fd) == 4 * MiB
            monkeypatch.setattr(sparse, "_fallocate", lambda *a: errno.EOPNOTSUPP)
            assert sparse.punch_hole(fd, MiB, MiB)  # by BLKZEROOUT
            assert os.pread(fd, MiB, MiB) == bytes(MiB)
            assert os.pread(fd, MiB, 0) == pattern(4 * MiB, 0)[:MiB]
            sparse.set_size(fd, MiB)  # a device is never resized
            assert sparse.file_size(fd) == 4 * MiB
        finally:
            os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


# -- files, names and locks

def test_set_size_and_file_size(tmp: Path, fd_of: object) -> None:
    p = make_sparse(tmp / "f", MiB, [(0, MiB)])
    fd = fd_of(p)  # type: ignore[operator]
    sparse.set_size(fd, 3 * MiB + 5)
    assert sparse.file_size(fd) == 3 * MiB + 5
    assert extents(p) == [(0, MiB)]  # growth is a hole
    sparse.set_size(fd, 100)
    sparse.sync(fd)
    sparse.sync_data(fd)
    assert p.read_bytes() == pattern(MiB, 0)[:100]


def test_open_at_with_excl_refuses_an_existing_name(tmp: Path) -> None:
    dfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(sparse.open_at(dfd, "f", os.O_RDWR | os.O_CREAT | os.O_EXCL))
        with pytest.raises(FileExistsError):
            sparse.open_at(dfd, "f", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    finally:
        os.close(dfd)
    sparse.unlink(str(tmp / "f"))
    sparse.sync_dir(str(tmp))
    assert not (tmp / "f").exists()
    with pytest.raises(FileNotFoundError):
        sparse.unlink(str(tmp / "f"))


def test_open_path_errors_are_one_line(tmp: Path) -> None:
    with pytest.raises(IOFailure, match=r"/missing: no such file$"):
        sparse.open_path(str(tmp / "missing"), os.O_RDONLY)
    with pytest.raises(IOFailure, match=r": is a directory$"):
        sparse.open_path(str(tmp), os.O_RDWR)


def test_a_second_lock_is_refused(tmp: Path, fd_of: object) -> None:
    p = make_sparse(tmp / "f", 4 * KiB, [])
    sparse.lock_destination(fd_of(p), str(p))  # type: ignore[operator]
    with pytest.raises(Locked, match="another sparsepatch apply holds this destination"):
        sparse.lock_destination(fd_of(p), str(p))  # type: ignore[operator]


def test_a_pipe_is_not_seekable() -> None:
    r, w = os.pipe()
    try:
        assert not sparse.is_seekable(r) and not sparse.is_block_device(r)
    finally:
        os.close(r)
        os.close(w)
