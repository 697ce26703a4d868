"""The destination of an apply as blocks: their state (hash), writing, punching, size and
durability, each failure one IOFailure line naming the path and the byte offset."""

from __future__ import annotations

import errno

from . import sparse
from .errors import IOFailure, io_errors, io_failure
from .format import PAGE_SHIFT, hash_block

WRITE_STEP = 1 << 20  # bytes reserved and written at once


class Destination:
    """Owns the open destination: block reads (zero-padded past its end), block writes in
    reserved steps, punches (zeros written where the filesystem cannot punch), size, sync."""

    def __init__(self, fd: int, name: str, shift: int, discard: bool = False):
        self.fd = fd
        self.name = name
        self.shift = shift
        self.bs = 1 << shift
        self.discard = discard
        self.is_device = sparse.is_block_device(fd)
        self.punch_ok = True
        self.punch_lies = 0  # blocks a punch reported done but left holding data
        self.zero_filled = 0  # bytes of zeros written to grow a file that cannot hold holes
        self._zero = bytes(self.bs)

    def read(self, block: int, limit: int | None = None) -> bytearray:
        """The block's bytes, zero-padded to a whole block past the end of the file, or past
        limit (a byte offset) when given."""
        off = block << self.shift
        want = self.bs if limit is None else max(0, min(self.bs, limit - off))
        buf = bytearray(self.bs)
        try:
            sparse.pread_full(self.fd, memoryview(buf)[:want], off)
        except OSError as e:
            raise io_failure(e, f"{self.name}: read failed at byte {off}") from None
        return buf  # a short read leaves the rest as it was made: zeros

    def read_pages(self, page: int, count: int = 1) -> bytearray:
        """count 4 KiB pages from page number page on, zero-padded past the end of the file."""
        off = page << PAGE_SHIFT
        buf = bytearray(count << PAGE_SHIFT)
        try:
            sparse.pread_full(self.fd, memoryview(buf), off)
        except OSError as e:
            raise io_failure(e, f"{self.name}: read failed at byte {off}") from None
        return buf

    def states(self, first: int, count: int, limit: int) -> list[bytes]:
        """The hashes of blocks [first, first + count), read in one go up to byte limit."""
        off = first << self.shift
        buf = bytearray(count << self.shift)
        try:
            sparse.pread_full(self.fd, memoryview(buf)[: max(0, min(len(buf), limit - off))], off)
        except OSError as e:
            raise io_failure(e, f"{self.name}: read failed at byte {off}") from None
        view = memoryview(buf)
        return [self.hash(view[k << self.shift : (k + 1) << self.shift]) for k in range(count)]

    def state(self, block: int, limit: int | None = None) -> bytes:
        """The block's hash (ZERO_HASH for zeros), as read by read()."""
        return self.hash(self.read(block, limit))

    def hash(self, data: bytes | bytearray | memoryview) -> bytes:
        return hash_block(data, self.bs)

    def write(self, block: int, data: bytes | memoryview) -> int:
        """Write whole blocks from block on, in steps of at least 1 MiB, each reserved first:
        a full disk then stops apply between blocks, never inside one. Returns bytes written."""
        view = memoryview(data)
        step = max(self.bs, WRITE_STEP)
        for pos in range(0, len(view), step):
            piece = view[pos : pos + step]
            off = (block << self.shift) + pos
            try:
                if not self.is_device:
                    sparse.reserve(self.fd, off, len(piece))
                sparse.pwrite_full(self.fd, piece, off)
            except OSError as e:
                if not self._fill_to(off, e):
                    raise IOFailure(f"{self.name}: write failed at byte {off}: {e.strerror}") from None
                self._pwrite(piece, off)
        return len(view)

    def _fill_to(self, end: int, e: OSError) -> bool:
        """After e, writing at byte end: where the filesystem refused to leave a gap (FAT
        through fusefat says EPERM), fill it with zeros up to end and say so."""
        size = self.size()
        if e.errno != errno.EPERM or self.is_device or end <= size:
            return False
        zero = bytes(WRITE_STEP)
        for off in range(size, end, WRITE_STEP):
            self._pwrite(zero[: min(WRITE_STEP, end - off)], off)
        self.zero_filled += end - size
        return True

    def _pwrite(self, data: bytes | memoryview, off: int) -> None:
        try:
            sparse.pwrite_full(self.fd, data, off)
        except OSError as e:
            raise io_failure(e, f"{self.name}: write failed at byte {off}") from None

    def write_zeros(self, first: int, count: int, limit: int) -> int:
        """Zeros over blocks [first, first + count), clipped at byte limit. Returns bytes written."""
        n = 0
        for b in range(first, first + count):
            end = min(self.bs, limit - (b << self.shift))
            if end > 0:
                n += self.write(b, self._zero[:end])
        return n

    def punch(self, first: int, count: int, limit: int) -> int:
        """Make blocks [first, first + count) read as zeros, up to byte limit: a hole where
        the filesystem can punch, zeros written where it cannot. Returns bytes written."""
        off = first << self.shift
        end = limit
        if not self.is_device:
            # To the end of the last block, past EOF: a punch that stops inside a page
            # (a shrink already truncated, resumed) zeroes it but leaves it allocated.
            end = -(-limit >> self.shift) << self.shift
        length = min(count << self.shift, end - off)
        if length <= 0:
            return 0
        try:
            ok = self.punch_ok and sparse.punch_hole(self.fd, off, length, self.discard)
        except OSError as e:
            raise io_failure(e, f"{self.name}: cannot punch a hole at byte {off}") from None
        if ok:
            return self._zero_lies(first, count, limit)
        # The filesystem cannot deallocate: zeros are the only way to get the content right.
        self.punch_ok = False
        return self.write_zeros(first, count, limit)

    def _zero_lies(self, first: int, count: int, limit: int) -> int:
        """Read a punched range back (its holes cost no read) and write zeros over every
        block that still holds data: FUSE, network and thin-provisioned storage may report
        a punch done and keep the data (a qcow2 image does for a partial cluster)."""
        start, end = first << self.shift, min((first + count) << self.shift, limit)
        with io_errors(f"{self.name}: cannot read back the hole at byte {start}"):
            ranges = list(sparse.data_extents(self.fd, end, start))
        n = 0
        for a, b in ranges:
            for block in range(a >> self.shift, ((b - 1) >> self.shift) + 1):
                if self.read(block, limit) != self._zero:
                    self.punch_lies += 1
                    n += self.write_zeros(block, 1, limit)
        return n

    def size(self) -> int:
        with io_errors(f"{self.name}: cannot read its size"):
            return sparse.file_size(self.fd)

    def sync_data(self) -> None:
        with io_errors(f"{self.name}: fdatasync failed"):
            sparse.sync_data(self.fd)

    def finish(self, size: int) -> None:
        """Set the final size (regular files only) and make everything durable."""
        try:
            sparse.set_size(self.fd, size)
        except OSError as e:
            if not self._fill_to(size, e):
                raise IOFailure(f"{self.name}: cannot truncate to {size} bytes: {e.strerror}") from None
        with io_errors(f"{self.name}: cannot finish (fsync)"):
            sparse.sync(self.fd)
