"""Block scanning shared by signature and diff: walk a file's data extents (or a stream)
in large reads, skip blocks of zeros, and hash the rest; and the builder that turns those
hashes into the canonical signature (written out, or only its identity).

A block is always seen full length: the last partial block is padded with zeros, which
is what the format defines its hash over (spec/FORMAT.md, "Blocks")."""

from __future__ import annotations

import os
import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import blake3

from . import sparse
from .errors import IOFailure, SourceChanged
from .format import HASH_LEN, SigHeader, SignatureEncoder, block_hash

CHUNK = 4 << 20  # bytes per read: large enough to amortise syscalls, small enough to stay cached
_Hashed = Future[list[tuple[int, bytes]]]  # (block, digest) of one chunk's non-zero blocks
HASH_THREADS = 2
# Measured here (1 GiB of data, warm): at 64 KiB blocks two threads take 0.19 s against one
# thread's 0.27 s; at 16 KiB they take 0.41 s against 0.35 s, the per-block Python work
# holding the GIL. So threads only from 64 KiB blocks up.
THREADS_FROM_SHIFT = 16


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
        self._local = threading.local()
        # Below 16 KiB per block the per-call overhead, not hashing, dominates: threads lose.
        self.threads = min(HASH_THREADS, os.cpu_count() or 1) if shift >= THREADS_FROM_SHIFT else 1

    def __iter__(self) -> Iterator[tuple[int, bytes, memoryview | None]]:
        if self.seekable:
            return self._scan_file()
        return self._scan_stream()

    def _blocks(self, first: int, view: memoryview, n: int) -> Iterator[tuple[int, bytes, memoryview | None]]:
        shift, zero = self.shift, self._zero
        for k in range(n):
            blk = view[k << shift : (k + 1) << shift]
            if zero.startswith(blk):
                continue
            yield first + k, block_hash(blk), blk

    def _chunks(self) -> Iterator[tuple[int, int, int]]:
        """(first block, block count, bytes to read) for each read, in file order."""
        shift, size = self.shift, self.size
        per = len(self._buf) >> shift
        for b0, b1 in block_ranges(self.fd, size, shift):
            for b in range(b0, b1, per):
                n = min(b1 - b, per)
                yield b, n, min(n << shift, size - (b << shift))

    def _read_hash(self, b: int, n: int, want: int) -> list[tuple[int, bytes]]:
        """Read one chunk into this thread's buffer and hash its non-zero blocks. Both the
        read and BLAKE3 release the GIL, so two of these run in parallel."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(len(self._buf)))
        shift, off = self.shift, b << self.shift
        try:
            got = sparse.pread_full(self.fd, buf[:want], off)
        except OSError as e:
            raise IOFailure(f"{self.name}: read failed at byte {off}: {e.strerror}") from None
        if got < want:
            raise SourceChanged(f"{self.name}: file shrank while being read (at byte {off + got})")
        full = n << shift
        if want < full:
            buf[want:full] = self._zero[: full - want]
        zero = self._zero
        out: list[tuple[int, bytes]] = []
        add, hasher, bs = out.append, blake3.blake3, 1 << shift
        # The loop body is the per-block cost on top of read+hash: keep it to a slice, a
        # memcmp and the hash call (this is format.block_hash, inlined).
        for k, pos in enumerate(range(0, n << shift, bs)):
            blk = buf[pos : pos + bs]
            if not zero.startswith(blk):
                add((b + k, hasher(blk).digest(length=HASH_LEN)))
        return out

    def _scan_file(self) -> Iterator[tuple[int, bytes, memoryview | None]]:
        if self.threads <= 1:
            for b, n, want in self._chunks():
                for i, digest in self._read_hash(b, n, want):
                    yield i, digest, None
                self._account(want)
            return
        # Results are taken in submission order, so output does not depend on threads.
        with ThreadPoolExecutor(self.threads, thread_name_prefix="sparsepatch-hash") as pool:
            pending: deque[tuple[int, _Hashed]] = deque()
            for b, n, want in self._chunks():
                pending.append((want, pool.submit(self._read_hash, b, n, want)))
                if len(pending) > 2 * self.threads:
                    yield from self._collect(pending.popleft())
            while pending:
                yield from self._collect(pending.popleft())

    def _collect(self, item: tuple[int, _Hashed]) -> Iterator[tuple[int, bytes, None]]:
        want, fut = item
        for i, digest in fut.result():
            yield i, digest, None
        self._account(want)

    def _account(self, n: int) -> None:
        self.bytes_read += n
        if self.progress:
            self.progress(n)

    def _scan_stream(self) -> Iterator[tuple[int, bytes, memoryview | None]]:
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


class SignatureBuilder:
    """Feeds block hashes, in order, to the canonical encoder. When the size is known up
    front the bytes stream out as blocks come; a stream's size is known only at its end
    while the header comes first, so its hashes are kept compactly (24 bytes a data block)
    and encoded once the size is known. write may be None: diff wants only the identity."""

    def __init__(self, shift: int, size: int | None, write: Callable[[bytes], object] | None = None):
        self.shift = shift
        self.write = write
        self.written = 0
        self.enc: SignatureEncoder | None = None
        self.index, self.hashes = array("Q"), bytearray()
        if size is not None:
            self._start(size)

    def _start(self, size: int) -> None:
        self.enc = SignatureEncoder(SigHeader(self.shift, size))
        self._emit(self.enc.start())

    def _emit(self, b: bytes) -> None:
        if b and self.write is not None:
            self.write(b)
            self.written += len(b)

    def add(self, index: int, digest: bytes) -> None:
        if self.enc is not None:
            self._emit(self.enc.data_at(index, digest))
        else:
            self.index.append(index)
            self.hashes += digest

    def finish(self, size: int, mtime_ns: int = 0) -> bytes:
        """Returns the identity."""
        if self.enc is None:
            self._start(size)
            assert self.enc is not None
            for k, i in enumerate(self.index):
                self._emit(self.enc.data_at(i, bytes(self.hashes[HASH_LEN * k : HASH_LEN * (k + 1)])))
            self.index, self.hashes = array("Q"), bytearray()
        tail, identity = self.enc.finish(mtime_ns)
        self._emit(tail)
        return identity

    @property
    def data_blocks(self) -> int:
        return self.enc.data_blocks if self.enc is not None else len(self.index)
