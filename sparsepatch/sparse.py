"""The only module that talks to the kernel about holes, allocation and durability:
lseek(SEEK_DATA/SEEK_HOLE), fallocate, ioctl, file locks and fsync. Everything above it sees
byte ranges and file descriptors. Every call that changes a destination or its journal
(write, punch, truncate, create, unlink, sync) goes through here, so that the crash tests
can record them in one place and rebuild what a power cut would leave."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import stat
import struct
from collections.abc import Callable, Iterator
from typing import Any

from .errors import IOFailure, Locked, io_errors

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


def data_extents(fd: int, size: int, pos: int = 0,
                 unreported: Callable[[], None] | None = None) -> Iterator[tuple[int, int]]:
    """Yield (start, end) byte ranges from pos to size that may hold data, in order; holes
    are skipped without being read. Where SEEK_DATA is unsupported, it is all one range.

    A filesystem without a hole map of its own (ramfs, and others whose lseek is the
    generic one) calls the whole file data, and reading its holes may even allocate them.
    That cannot be told from a file with no holes but by st_blocks: unreported() is called
    when a regular file comes back as one range although it has far fewer bytes allocated
    than its size."""
    whole = pos == 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE):
                if unreported and whole and _looks_sparse(fd, size):
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
        if unreported and whole and start == 0 and end == size and _looks_sparse(fd, size):
            unreported()
        yield start, end
        pos = end


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1  # write delayed allocations out first, so every extent has its place
_FIEMAP = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, extent_count, reserved
_EXTENT = struct.Struct("=QQQQQI12x")  # logical, physical, length, reserved64[2], flags, reserved[3]
FIEMAP_BATCH = 512  # extents asked for per call (28 KiB of buffer)
FIEMAP_EXTENT_LAST = 0x1


def extent_map(fd: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    """The file's extents below size as (logical, physical, length, flags), ascending, from
    the FIEMAP ioctl (after syncing delayed allocations). OSError where the filesystem has no
    FIEMAP (EOPNOTSUPP, ENOTTY) propagates: the caller decides what that means."""
    pos = 0
    while pos < size:
        buf = bytearray(_FIEMAP.pack(pos, size - pos, FIEMAP_FLAG_SYNC, 0, FIEMAP_BATCH, 0))
        buf += bytes(_EXTENT.size * FIEMAP_BATCH)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)  # a mutable buffer: no 1 KiB limit
        mapped = _FIEMAP.unpack_from(buf)[3]
        if not mapped:
            return
        last = pos
        for k in range(mapped):
            logical, physical, length, _, _, flags = _EXTENT.unpack_from(buf, _FIEMAP.size + k * _EXTENT.size)
            if logical >= size:
                return
            yield logical, physical, length, flags
            last = logical + length
            if flags & FIEMAP_EXTENT_LAST:
                return
        if last <= pos:
            return
        pos = last


UNREPORTED_SLACK = 1 << 20  # unallocated bytes below which a whole-file range is believed
NO_HOLE_MAP = {"ramfs"}  # reading a hole allocates it, so a file read once looks dense


def _looks_sparse(fd: int, size: int) -> bool:
    """A regular file with at least UNREPORTED_SLACK bytes fewer allocated than its size
    (st_blocks counts 512-byte units whatever the filesystem's block size), or one on a
    filesystem known to keep no hole map."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return False
    return st.st_blocks * 512 + UNREPORTED_SLACK <= size or fs_type(st.st_dev) in NO_HOLE_MAP


def fs_type(dev: int) -> str:
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


_FS_MAGIC = {0x58465342: "xfs", 0x9123683E: "btrfs", 0xEF53: "ext4", 0x01021994: "tmpfs"}


def fs_type_of(fd: int) -> str:
    """The type of the filesystem fd lives on: by its device number in mountinfo, else (btrfs
    gives its files device numbers of their own) by the magic number fstatfs(2) reports."""
    kind = fs_type(os.fstat(fd).st_dev)
    if kind:
        return kind
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first field (a long)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fstatfs(fd, buf) != 0:
        return ""
    return _FS_MAGIC.get(ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF, "")


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


def folder_of(fd: int, path: str) -> str:
    """The folder that holds the file open on fd: where a symbolic link at path leads, not
    where the link sits (a size limit or a free-space check must look there)."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = ""
    if not real.startswith("/") or real.endswith(" (deleted)"):
        real = os.path.realpath(path)
    return os.path.dirname(real)


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


def unlink(path: str, dir_fd: int | None = None) -> None:
    """Remove a name (relative to dir_fd if given); durable only after its folder is
    synced. OSError as raised."""
    os.unlink(path, dir_fd=dir_fd)


def rename(src: str, dst: str, dir_fd: int) -> None:
    """Rename src over dst, both names in the folder dir_fd; durable only after the folder
    is synced. OSError as raised."""
    os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def sync_dir(path: str | int) -> None:
    """Make a create, rename or unlink in the directory durable. path may be the folder's
    open descriptor (held open so that no one can swap the folder for another)."""
    if isinstance(path, int):
        os.fsync(path)
        return
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# struct flock for F_OFD_* (the kernel takes the 64-bit layout for them on every ABI).
_FLOCK = struct.Struct("@hhqqi")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# Where an apply told to ignore other programs' locks still locks, so that two applies keep
# excluding each other: far past any image's data and the bytes qemu locks (100-300).
LOCK_MARK = 1 << 62
HELD = "another sparsepatch apply holds this destination"


def _ofd(fd: int, cmd: int, kind: int, start: int) -> tuple[int, int, int, int]:
    """One F_OFD_* call over [start, end of file and beyond); (type, start, len, pid) back."""
    buf = _FLOCK.pack(kind, os.SEEK_SET, start, 0, 0) + bytes(8)
    out = fcntl.fcntl(fd, cmd, buf)
    kind_, _, start_, len_, pid = _FLOCK.unpack_from(out)
    return kind_, start_, len_, pid


def _try_write_lock(fd: int, start: int) -> tuple[int, int, int, int] | None:
    """Take an OFD write lock from start on; None when taken, else the lock in the way."""
    for _ in range(10):
        try:
            _ofd(fd, _F_OFD_SETLK, fcntl.F_WRLCK, start)
            return None
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        found = _ofd(fd, _F_OFD_GETLK, fcntl.F_WRLCK, start)
        if found[0] != fcntl.F_UNLCK:
            return found
        # Released between the two calls: try again.
    return _ofd(fd, _F_OFD_GETLK, fcntl.F_WRLCK, start)


def lock_whole(fd: int) -> bool:
    """An OFD write lock over all of fd (open for writing); False if another open file
    holds a lock on it. Held until fd is closed or the process dies."""
    return _try_write_lock(fd, 0) is None


def _is_apply(lock: tuple[int, int, int, int]) -> bool:
    """The lock another apply takes: an OFD (pid -1) write lock from byte 0 or LOCK_MARK to
    the end. A write lock needs a descriptor open for writing, so a mere reader cannot
    pose as an apply."""
    kind, start, length, pid = lock
    return kind == fcntl.F_WRLCK and pid == -1 and length == 0 and start in (0, LOCK_MARK)


def _describe(lock: tuple[int, int, int, int]) -> str:
    kind, start, length, pid = lock
    what = "write" if kind == fcntl.F_WRLCK else "read"
    where = f"bytes {start}-{start + length - 1}" if length else f"byte {start} to the end"
    return f"{what} lock on {where}" + (f" by pid {pid}" if pid > 0 else "")


def lock_destination(fd: int, path: str, allow_in_use: bool = False) -> None:
    """Claim fd (open for writing) with an OFD write lock over the whole file.

    It conflicts with every POSIX and OFD lock another program holds on the file (qemu
    locks single bytes of the images it runs), so an image in use is refused; flock, which
    any reader can take, does not count. With allow_in_use, other programs' locks are
    ignored, and only a lock far past the data keeps a second apply out. The lock belongs
    to this open file and ends when it is closed or the process dies."""
    with io_errors(f"{path}: cannot lock"):
        found = _try_write_lock(fd, 0)
        if found is None:
            return
        # Every apply holds the bytes from LOCK_MARK on: asking there tells another apply
        # from a program that locks bytes near the start, when both hold the file.
        mark = _try_write_lock(fd, LOCK_MARK)
    if _is_apply(found) or mark is not None and _is_apply(mark):
        raise Locked(f"{path}: {HELD}")
    if not allow_in_use:
        raise Locked(f"{path}: in use: a lock held by another process ({_describe(found)}); "
                     "--allow-in-use applies anyway")


LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit, lo_number,
# lo_encrypt_type, lo_encrypt_key_size, lo_flags, lo_file_name, lo_crypt_name, lo_encrypt_key,
# lo_init[2]
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")


def _kernel_dev(d: int) -> int:
    """A dev_t in the kernel's huge_encode_dev form, as userspace's st_dev."""
    return os.makedev((d >> 8) & 0xFFF, (d & 0xFF) | ((d >> 12) & 0xFFF00))


def _loop_backing(name: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file behind an attached loop device; None if not attached.
    LOOP_GET_STATUS64 names the inode itself, which survives renames; the path in sysfs
    (read only where the device node cannot be opened) does not."""
    try:
        with open(f"/sys/block/{name}/loop/backing_file", "rb") as f:
            backing = os.fsdecode(f.read().rstrip(b"\n"))
    except OSError:
        return None  # no backing_file: the device is not attached
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
            device, inode = _LOOP_INFO64.unpack(info)[:2]
            return _kernel_dev(device), inode
        except OSError:
            pass
        finally:
            os.close(fd)
    try:
        st = os.stat(backing.removesuffix(" (deleted)"))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def loop_devices_of(fd: int) -> list[str]:
    """The loop devices whose backing file is the file open on fd."""
    st = os.fstat(fd)
    try:
        names = sorted(n for n in os.listdir("/sys/block") if n.startswith("loop"))
    except OSError:
        return []
    return [f"/dev/{n}" for n in names if _loop_backing(n) == (st.st_dev, st.st_ino)]


def why_not_opened(e: OSError) -> str:
    """Why open_at refused a name, in words: its O_NOFOLLOW says ELOOP for a symbolic link,
    O_NONBLOCK ENXIO for a FIFO with no writer."""
    if e.errno == errno.ELOOP:
        return "it is a symbolic link"
    if e.errno in (errno.ENXIO, errno.EISDIR, errno.ENODEV):
        return "not a regular file"
    return e.strerror or str(e)


def open_at(dir_fd: int, name: str, flags: int, mode: int = 0o600) -> int:
    """name inside dir_fd, never through a symbolic link (ELOOP) and never blocking on a
    FIFO: for files in places another user may write to."""
    return os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode,
                   dir_fd=dir_fd)


def open_side(dir_fd: int, name: str, path: str, what: str) -> int | None:
    """A file apply keeps beside its work (the journal, the undo spool) that an earlier
    run left: name in dir_fd, open for reading and writing; None if there is none. A
    symbolic link or a FIFO put there is refused, not opened. path and what (the apply
    journal, the undo spool) are for messages; the caller still checks what it opened."""
    try:
        return open_at(dir_fd, name, os.O_RDWR)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IOFailure(f"{path}: refusing the {what}: {why_not_opened(e)}") from None


def create_side(dir_fd: int, name: str, path: str, what: str) -> int:
    """Create such a file where open_side found none: a name that appeared meanwhile is
    refused, not written through. Durable only after the caller syncs the folder."""
    try:
        return open_at(dir_fd, name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        raise IOFailure(f"{path}: appeared while apply was running; refusing to write the "
                        f"{what} through it") from None
    except OSError as e:
        raise IOFailure(f"{path}: cannot create the {what}: {e.strerror}") from None


def not_ours(fd: int, owners: frozenset[int], one_link: bool = True) -> str | None:
    """Why the file open on fd may not be trusted as one apply made (None if it may): it
    must be a regular file owned by one of owners and, when apply writes to it, have no
    other link (through which a write or a cut would reach another file)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if one_link and st.st_nlink != 1:
        return f"it has {st.st_nlink} hard links"
    if st.st_uid not in owners:
        allowed = " or ".join(str(u) for u in sorted(owners))
        return f"owned by uid {st.st_uid}, not {allowed}"
    return None


def remove_side(dir_fd: int, name: str, fd: int) -> None:
    """Close fd, then unlink name in dir_fd and sync the folder if the name still is fd's
    file: one put in its place meanwhile is not ours to remove. OSError as raised, except
    that a name already gone is no error."""
    mine = os.fstat(fd)
    os.close(fd)
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            return
        unlink(name, dir_fd)
        sync_dir(dir_fd)
    except FileNotFoundError:
        return


def open_device_exclusive(path: str, *, dir_fd: int | None = None, name: str | None = None) -> int:
    """Open a block device for writing only if nobody else holds it: O_EXCL on a block
    device fails with EBUSY while it is mounted or opened exclusively elsewhere, whatever
    path or device node is used (flock would only see one inode). With dir_fd, name is
    looked up there, not through a symbolic link; path is for messages."""
    with io_errors(path):
        try:
            if dir_fd is not None and name is not None:
                return os.open(name, os.O_RDWR | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=dir_fd)
            return os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise Locked(
                    f"{path}: device is in use: mounted, or another sparsepatch apply holds it"
                ) from None
            raise


def open_path(path: str, flags: int, mode: int = 0o666) -> int:
    with io_errors(path, short=True):
        return os.open(path, flags | os.O_CLOEXEC, mode)
