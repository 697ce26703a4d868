"""The only module that talks to the kernel about holes, allocation and durability:
lseek(SEEK_DATA/SEEK_HOLE), fallocate, ioctl, flock and fsync. Everything above it sees
byte ranges and file descriptors."""

from __future__ import annotations

import errno
import fcntl
import os
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


def data_extents(fd: int, size: int,
                 unreported: Callable[[], None] | None = None) -> Iterator[tuple[int, int]]:
    """Yield (start, end) byte ranges that may hold data, in order; holes are skipped
    without being read. Where SEEK_DATA is unsupported, the whole file is one range.

    A filesystem without a hole map of its own (ramfs, and others whose lseek is the
    generic one) calls the whole file data, and reading its holes may even allocate them.
    That cannot be told from a file with no holes but by st_blocks: unreported() is called
    when a regular file comes back as one range although it has far fewer bytes allocated
    than its size."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE):
                if unreported and pos == 0 and _looks_sparse(fd, size):
                    unreported()
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
        if unreported and pos == 0 and start == 0 and end == size and _looks_sparse(fd, size):
            unreported()
        yield start, end
        pos = end


UNREPORTED_SLACK = 1 << 20  # unallocated bytes below which a whole-file range is believed
NO_HOLE_MAP = {"ramfs"}  # reading a hole allocates it, so a file read once looks dense


def _looks_sparse(fd: int, size: int) -> bool:
    """A regular file with at least UNREPORTED_SLACK bytes fewer allocated than its size
    (st_blocks counts 512-byte units whatever the filesystem's block size), or one on a
    filesystem known to keep no hole map."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return False
    return st.st_blocks * 512 + UNREPORTED_SLACK <= size or _fs_type(st.st_dev) in NO_HOLE_MAP


def _fs_type(dev: int) -> str:
    """The type of the filesystem mounted from device number dev ("" if unknown)."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == want and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        pass
    return ""


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
    if not is_block_device(fd):
        os.ftruncate(fd, size)


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
