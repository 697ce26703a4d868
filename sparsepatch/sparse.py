"""The only module that talks to the kernel about holes, allocation and durability:
lseek(SEEK_DATA/SEEK_HOLE), fallocate, ioctl, flock and fsync. Everything above it sees
byte ranges and file descriptors."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import stat
import struct
from collections.abc import Callable, Iterator
from typing import Any

from .errors import IOFailure, Locked

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
BLKDISCARD = 0x1277



def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2), which os lacks: 0, or the errno. ctypes is loaded on first use, so
    signature and diff, which never allocate, do not pay for it at start-up."""
    global _fallocate_c
    if _fallocate_c is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)  # already loaded; find_library would fork ldconfig
        f = libc.fallocate
        f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        f.restype = ctypes.c_int
        _fallocate_c = (f, ctypes.get_errno)
    call, get_errno = _fallocate_c
    return 0 if call(fd, mode, offset, length) == 0 else get_errno()


_fallocate_c: tuple[Any, Callable[[], int]] | None = None


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def is_seekable(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def file_size(fd: int) -> int:
    """Size in bytes: st_size for files, BLKGETSIZE64 for block devices."""
    if is_block_device(fd):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("<Q", buf)[0])
    return os.fstat(fd).st_size


def data_extents(fd: int, size: int, pos: int = 0) -> Iterator[tuple[int, int]]:
    """Yield (start, end) byte ranges from pos to size that may hold data, in order; holes
    are skipped without being read. Where SEEK_DATA is unsupported, it is all one range."""
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE):
                yield pos, size
                return
            raise
        if start >= size:
            return
        try:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            end = size
        end = min(end, size)
        yield start, end
        pos = end


def reopen(fd: int) -> int:
    """A new open file description of the file behind fd, with its own read-ahead state
    (a forked process shares fd's): fd itself where /proc is not available."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return fd


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Fill view from offset; returns bytes read, short only at end of file."""
    got = 0
    n = len(view)
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            break
        got += k
    return got


def pwrite_full(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate a range before writing it, so a full disk fails the whole write up front
    instead of part-way through a block (which would leave it neither base nor target).
    A no-op where the filesystem or device cannot preallocate."""
    err = _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)
    if not err:
        return
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return
    raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int, discard: bool = False) -> bool:
    """Deallocate a range so it reads as zeros. False where the filesystem cannot punch.

    On a block device, discard=True tries BLKDISCARD first and keeps it only if the range
    then reads back as zeros (not every device guarantees that); otherwise PUNCH_HOLE
    (which zeroes and deallocates, e.g. a loop device's backing file), then BLKZEROOUT."""
    if length <= 0:
        return True
    if discard and is_block_device(fd) and _discard_zeroes(fd, offset, length):
        return True
    err = _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if not err:
        return True
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        if is_block_device(fd):
            return _zeroout(fd, offset, length)
        return False
    raise OSError(err, os.strerror(err))


def _discard_zeroes(fd: int, offset: int, length: int) -> bool:
    try:
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("<QQ", offset, length))
    except OSError:
        return False
    chunk = 1 << 20
    zero = bytes(chunk)
    pos = offset
    while pos < offset + length:
        n = min(chunk, offset + length - pos)
        if not zero.startswith(os.pread(fd, n, pos)):
            return False
        pos += n
    return True


def _zeroout(fd: int, offset: int, length: int) -> bool:
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("<QQ", offset, length))
    except OSError:
        return False
    return True


def set_size(fd: int, size: int) -> None:
    """Truncate a regular file to size. A truncate that changes nothing is skipped: some
    filesystems (FAT through fusefat) refuse even that."""
    if not is_block_device(fd) and os.fstat(fd).st_size != size:
        os.ftruncate(fd, size)


def file_size_limit(folder: str, size: int) -> tuple[int, str] | None:
    """None if a file in folder may grow to size bytes, as far as can be told; otherwise
    (the largest size allowed, what sets it). Probed on an anonymous file in folder, which
    stays sparse and empty, so any size costs no space."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and size > soft:
        return soft, "the file size limit (ulimit -f)"
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        fd = _named_probe(folder)
        if fd < 0:
            return None  # cannot create a file there: let the real writes tell
    try:
        if _fits(fd, size) is not False:
            return None
        lo, hi = 0, size  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _fits(fd, mid) else (lo, mid)
        return lo, "this filesystem's largest file"
    finally:
        os.close(fd)


def _fits(fd: int, size: int) -> bool | None:
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        return False if e.errno == errno.EFBIG else None
    return True


def _named_probe(folder: str) -> int:
    """An unlinked file in folder where O_TMPFILE is not supported; -1 if none can be made."""
    for _ in range(10):
        path = os.path.join(folder, f".sparsepatch-probe.{os.urandom(4).hex()}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError:
            return -1
        os.unlink(path)
        return fd
    return -1


def sync(fd: int) -> None:
    os.fsync(fd)


def sync_data(fd: int) -> None:
    os.fdatasync(fd)


def sync_dir(path: str) -> None:
    """Make a rename or unlink in the directory durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_exclusive(fd: int, path: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Locked(f"{path}: another sparsepatch apply holds this destination") from None


def open_device_exclusive(path: str) -> int:
    """Open a block device for writing only if nobody else holds it: O_EXCL on a block
    device fails with EBUSY while it is mounted or opened exclusively elsewhere, whatever
    path or device node is used (flock would only see one inode)."""
    try:
        return os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise Locked(
                f"{path}: device is in use: mounted, or another sparsepatch apply holds it"
            ) from None
        raise IOFailure(f"{path}: {e.strerror}") from None


def open_path(path: str, flags: int, mode: int = 0o666) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except FileNotFoundError:
        raise IOFailure(f"{path}: no such file") from None
    except IsADirectoryError:
        raise IOFailure(f"{path}: is a directory") from None
    except PermissionError:
        raise IOFailure(f"{path}: permission denied") from None
    except OSError as e:
        raise IOFailure(f"{path}: {e.strerror}") from None
