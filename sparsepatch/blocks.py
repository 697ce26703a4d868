"""Block scanning shared by signature and diff: walk a file's data extents (or a stream)
in large reads, skip blocks of zeros, and hash the rest.

A block is always seen full length: the last partial block is padded with zeros, which
is what the format defines its hash over (spec/FORMAT.md, "Blocks")."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from . import sparse
from .errors import IOFailure, SourceChanged
from .format import block_hash

CHUNK = 4 << 20  # bytes per read: large enough to amortise syscalls, small enough to stay cached


def block_ranges(fd: int, size: int, shift: int) -> Iterator[tuple[int, int]]:
    """Data extents rounded out to whole blocks and merged: (first_block, end_block)."""
    bs = 1 << shift
    cur: tuple[int, int] | None = None
    for start, end in sparse.data_extents(fd, size):
        b0, b1 = start >> shift, (end + bs - 1) >> shift
        if cur and b0 <= cur[1]:
            cur = (cur[0], max(cur[1], b1))
            continue
        if cur:
            yield cur
        cur = (b0, b1)
    if cur:
        yield cur


class Scanner:
    """Yields (block, digest, view) for every block holding non-zero data, in order.

    view is valid only until the next item. Blocks not yielded are holes or zeros.
    For a stream, size is known only once the scan is complete."""

    def __init__(self, fd: int, shift: int, name: str, size: int | None = None,
                 progress: Callable[[int], None] | None = None):
        self.fd = fd
        self.shift = shift
        self.name = name
        self.seekable = sparse.is_seekable(fd)
        self.size = size if size is not None else (sparse.file_size(fd) if self.seekable else 0)
        self.bytes_read = 0
        self.progress = progress
        bs = 1 << shift
        self._buf = bytearray(max(CHUNK, bs))
        self._zero = bytes(bs)

    def __iter__(self) -> Iterator[tuple[int, bytes, memoryview]]:
        if self.seekable:
            return self._scan_file()
        return self._scan_stream()

    def _blocks(self, first: int, view: memoryview, n: int) -> Iterator[tuple[int, bytes, memoryview]]:
        shift, zero = self.shift, self._zero
        for k in range(n):
            blk = view[k << shift : (k + 1) << shift]
            if zero.startswith(blk):
                continue
            yield first + k, block_hash(blk), blk

    def _scan_file(self) -> Iterator[tuple[int, bytes, memoryview]]:
        shift, size = self.shift, self.size
        mv = memoryview(self._buf)
        per = len(self._buf) >> shift
        for b0, b1 in block_ranges(self.fd, size, shift):
            b = b0
            while b < b1:
                n = min(b1 - b, per)
                off = b << shift
                want = min(n << shift, size - off)
                try:
                    got = sparse.pread_full(self.fd, mv[:want], off)
                except OSError as e:
                    raise IOFailure(f"{self.name}: read failed at byte {off}: {e.strerror}") from None
                if got < want:
                    raise SourceChanged(f"{self.name}: file shrank while being read (at byte {off + got})")
                full = n << shift
                if want < full:
                    mv[want:full] = self._zero[: full - want]
                self.bytes_read += want
                yield from self._blocks(b, mv, n)
                if self.progress:
                    self.progress(want)
                b += n

    def _scan_stream(self) -> Iterator[tuple[int, bytes, memoryview]]:
        shift = self.shift
        bs = 1 << shift
        mv = memoryview(self._buf)
        block = 0
        while True:
            got = 0
            while got < len(mv):
                try:
                    k = os.readv(self.fd, [mv[got:]])
                except OSError as e:
                    at = self.size + got
                    raise IOFailure(f"{self.name}: read failed at byte {at}: {e.strerror}") from None
                if k == 0:
                    break
                got += k
            if got == 0:
                return
            self.size += got
            self.bytes_read += got
            n = (got + bs - 1) >> shift
            full = n << shift
            if got < full:
                mv[got:full] = self._zero[: full - got]
            yield from self._blocks(block, mv, n)
            if self.progress:
                self.progress(got)
            block += n
            if got < len(mv):
                return


def read_blocks(fd: int, shift: int, size: int, first: int, count: int, name: str) -> bytes:
    """The bytes of blocks first..first+count-1, clipped at size (no padding)."""
    off = first << shift
    want = min(count << shift, size - off)
    buf = bytearray(want)
    try:
        got = sparse.pread_full(fd, memoryview(buf), off)
    except OSError as e:
        raise IOFailure(f"{name}: read failed at byte {off}: {e.strerror}") from None
    if got < want:
        raise SourceChanged(f"{name}: file shrank while being read (at byte {off + got})")
    return bytes(buf)
