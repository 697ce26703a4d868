"""Block scanning shared by signature and diff: walk a file's data extents (or a stream)
in large reads, skip blocks of zeros, and hash the pages of the rest; and the builder that
turns those page hashes into the canonical signature (written out, or only its identity).

A block is always seen full length: the last partial block is padded with zeros, which
is what the format defines its hash over (spec/FORMAT.md, "Blocks")."""

from __future__ import annotations

import bisect
import mmap
import os
import stat
import struct
from array import array
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing

import blake3

from . import sparse
from .errors import SourceChanged, UsageError, io_errors
from .fork import Rows, pack_rows, share_map, unpack_rows
from .format import (
    HASH_LEN,
    PAGE_SHIFT,
    PAGE_SIZE,
    ZERO_HASH,
    ZERO_PAGE,
    SigHeader,
    Signature,
    SignatureEncoder,
    blocks_for,
    tree_hash,
)

CHUNK = 4 << 20  # bytes per read: large enough to amortise syscalls, small enough to stay cached
_COUNT = struct.Struct("<I")  # data blocks of one chunk, in a group's result
# Chunks go to the two processes (fork.share_map) in groups of about GROUP bytes (at most
# MAX_GROUP chunks, which bounds a group's description): a file of many small extents is
# then not one hand-over per extent.
GROUP = CHUNK
MAX_GROUP = 1024


SOURCE_CHECKS = ("mtime", "content")


class Stamp:
    """How signature and diff notice a regular file that changes while they read it: its
    fstat before the read against its fstat after.

    check "mtime" compares mtime, ctime and size: any write between the two stats shows.
    check "content" compares the size only, for a file whose timestamps say nothing (a
    FUSE export that reports the current time as mtime): diff then relies on its second
    pass, which hashes every block it puts in the patch again and compares with the first
    pass. A block or device, or a stream, has no such stamp and is not checked here."""

    def __init__(self, fd: int, check: str):
        if check not in SOURCE_CHECKS:
            raise UsageError(f"source check {check!r} is not one of: {', '.join(SOURCE_CHECKS)}")
        self.fd = fd
        self.check = check
        st = os.fstat(fd)
        self.regular = stat.S_ISREG(st.st_mode)
        self.mtime_ns = st.st_mtime_ns if self.regular else 0
        self.before = self._take(st)

    def _take(self, st: os.stat_result) -> tuple[int, ...] | None:
        if not self.regular:
            return None
        if self.check == "content":
            return (st.st_size,)
        return st.st_mtime_ns, st.st_ctime_ns, st.st_size

    def verify(self, name: str, verb: str) -> None:
        """Raise SourceChanged if the file is not as it was when the stamp was taken."""
        if self.before is None:
            return
        if self._take(os.fstat(self.fd)) != self.before:
            what = "size" if self.check == "content" else "mtime or size"
            raise SourceChanged(f"{name}: the file changed while {verb} was reading it ({what})")


def block_ranges(fd: int, size: int, shift: int,
                 unreported: Callable[[], None] | None = None) -> Iterator[tuple[int, int]]:
    """Data extents rounded out to whole blocks and merged: (first_block, end_block).
    unreported is called when the filesystem gave no hole map for a sparse file."""
    bs = 1 << shift
    cur: tuple[int, int] | None = None
    for start, end in sparse.data_extents(fd, size, unreported=unreported):
        b0, b1 = start >> shift, (end + bs - 1) >> shift
        if cur and b0 <= cur[1]:
            cur = (cur[0], max(cur[1], b1))
            continue
        if cur:
            yield cur
        cur = (b0, b1)
    if cur:
        yield cur


KNOWN_CHUNK = 4096  # blocks per chunk taken from the signature (diff --since)


def _blocks_of(ranges: list[tuple[int, int]], shift: int) -> list[tuple[int, int]]:
    """Byte ranges rounded out to whole blocks and merged: (first_block, end_block)."""
    out: list[tuple[int, int]] = []
    bs = 1 << shift
    for start, end in ranges:
        b0, b1 = start >> shift, (end + bs - 1) >> shift
        if out and b0 <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b1))
        else:
            out.append((b0, b1))
    return out


def _intersect(a: Iterable[tuple[int, int]], b: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Both ascending lists of disjoint ranges: the ranges in both."""
    j = 0
    for s0, s1 in a:
        while j < len(b) and b[j][1] <= s0:
            j += 1
        k = j
        while k < len(b) and b[k][0] < s1:
            lo, hi = max(s0, b[k][0]), min(s1, b[k][1])
            if lo < hi:
                yield lo, hi
            k += 1


def _merged(a: Generator[Chunk, None, None], b: Iterator[Chunk]) -> Generator[Chunk, None, None]:
    """Two ascending chunk streams over disjoint blocks, as one ascending stream."""
    with closing(a):  # a scan's worker is reaped at once when the walk stops early
        x, y = next(a, None), next(b, None)
        while x is not None or y is not None:
            if y is None or (x is not None and x[0] <= y[0]):
                assert x is not None
                yield x
                x = next(a, None)
            else:
                yield y
                y = next(b, None)


class Scanner:
    """Yields the page hashes of every block holding non-zero data, in order.

    view is valid only until the next item, and is None for a file (diff reads a file's
    changed blocks again). Blocks not yielded are holes or zeros. For a stream, size is
    known only once the scan is complete.

    A file is hashed by two processes where two CPUs are available: this one walks the
    data extents and hands groups of chunks to a forked worker as it is free; each reads
    and hashes its groups, and the worker sends its page hashes back through a pipe.
    Output is the same whether or not a worker ran."""

    def __init__(self, fd: int, shift: int, name: str,
                 progress: Callable[[int], None] | None = None,
                 warn: Callable[[str], object] | None = None,
                 only: list[tuple[int, int]] | None = None, known: Signature | None = None):
        """only: read just these byte ranges of a file (ascending) and take every other
        block's page hashes from known, the signature of what the file held before (diff
        --since: the ranges are all that changed since)."""
        self.fd = fd
        self.shift = shift
        self.name = name
        self.seekable = sparse.is_seekable(fd)
        self.size = sparse.file_size(fd) if self.seekable else 0
        self.bytes_read = 0
        self.progress = progress
        self.warn = warn
        # Whether holes were skipped unread: a stream, a device and a filesystem that gives
        # no hole map (ramfs) have every byte read; the stats say which it was.
        self.holes_skipped = self.seekable and not sparse.is_block_device(fd)
        bs = 1 << shift
        # Anonymous memory is zero-filled by the kernel page by page as it is first used: a
        # bytearray would be cleared whole up front (3 ms for 4 MiB), mostly for nothing on
        # a file of small extents.
        # Private: after the fork, the worker must get its own copy of every page it writes.
        self._buf = memoryview(mmap.mmap(-1, max(CHUNK, bs), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        self._zero = bytes(bs)
        self.pages_per_block = 1 << (shift - PAGE_SHIFT)
        self._own_fd = False
        self.only = None if only is None else _blocks_of(only, shift)
        self.known = known

    def chunks(self) -> Generator[tuple[int, array, bytes, memoryview | None], None, None]:
        """(first block, numbers of its non-zero blocks, their page hashes, view) per read,
        in order. The page hashes are pages_per_block * HASH_LEN bytes a block, block by
        block (ZERO_HASH for a page of zeros). view holds the chunk's bytes from block first
        (a stream's only; valid until the next item), None for a file. Per chunk rather
        than per block: the callers' per-block Python work was a tenth of the time at
        16 KiB blocks."""
        if self.seekable:
            if self.only is not None and self.known is not None:
                return _merged(self._scan_file(), self._known_chunks(self.known, self.only))
            return self._scan_file()
        return self._scan_stream()

    def _known_chunks(self, sig: Signature,
                      only: list[tuple[int, int]]) -> Iterator[tuple[int, array, bytes, None]]:
        """The signature's data blocks outside the ranges read, as chunks of at most
        KNOWN_CHUNK blocks: the file holds what the signature says there."""
        di, width = sig.data_index, HASH_LEN * self.pages_per_block
        limit = blocks_for(self.size, self.shift)
        d = 0
        gaps = [(0, only[0][0] if only else limit)]
        gaps += [(a[1], b[0]) for a, b in zip(only, only[1:], strict=False)]
        if only:
            gaps.append((only[-1][1], limit))
        for g0, g1 in gaps:
            d = bisect.bisect_left(di, g0, d)
            e = bisect.bisect_left(di, min(g1, limit), d)
            for k in range(d, e, KNOWN_CHUNK):
                m = min(e, k + KNOWN_CHUNK)
                yield di[k], di[k:m], bytes(sig.pages[k * width : m * width]), None
            d = e

    def _chunks(self) -> Iterator[tuple[int, int, int]]:
        """(first block, block count, bytes to read) for each read, in file order. Only
        this process walks the extents: reading a preallocated (unwritten) range makes
        SEEK_DATA call it data from then on, so a second walk could see other extents."""
        shift, size = self.shift, self.size
        per = len(self._buf) >> shift
        ranges = block_ranges(self.fd, size, shift, self._unreported)
        if self.only is not None:
            ranges = _intersect(ranges, self.only)
        for b0, b1 in ranges:
            for b in range(b0, b1, per):
                n = min(b1 - b, per)
                yield b, n, min(n << shift, size - (b << shift))

    def _unreported(self) -> None:
        self.holes_skipped = False
        if self.warn is not None:
            self.warn(f"{self.name}: the filesystem does not report holes: reading all "
                      f"{self.size} bytes, holes included")

    def _groups(self) -> Iterator[Rows]:
        group: Rows = []
        size = 0
        for chunk in self._chunks():
            group.append(chunk)
            size += chunk[2]
            if size >= GROUP or len(group) >= MAX_GROUP:
                yield group
                group, size = [], 0
        if group:
            yield group

    def _read_hash(self, b: int, n: int, want: int) -> tuple[array, bytes]:
        """Read one chunk and hash the pages of its non-zero blocks: their numbers and
        page hashes."""
        buf, off = self._buf, b << self.shift
        with io_errors(f"{self.name}: read failed at byte {off}"):
            got = sparse.pread_full(self.fd, buf[:want], off)
        if got < want:
            raise SourceChanged(f"{self.name}: file shrank while being read (at byte {off + got})")
        return self._hash(b, n, want)

    def _hash(self, b: int, n: int, want: int) -> tuple[array, bytes]:
        """Hash the pages of the non-zero blocks among the first n of the buffer (want
        bytes read; the last block is padded with zeros, as the format defines)."""
        buf, shift = self._buf, self.shift
        full = n << shift
        if want < full:
            buf[want:full] = self._zero[: full - want]
        zero, hasher = ZERO_PAGE, blake3.blake3
        # Every page of the chunk in one comprehension: the per-page cost on top of read and
        # hash is then a slice, a memcmp and the hash call. This is format.hash_pages
        # inlined (the last block is padded above).
        hashes = [ZERO_HASH if zero.startswith(page) else hasher(page).digest(length=HASH_LEN)
                  for page in (buf[p : p + PAGE_SIZE] for p in range(0, full, PAGE_SIZE))]
        if ZERO_HASH not in hashes:  # the common case: every block holds data
            return array("Q", range(b, b + n)), b"".join(hashes)
        per = self.pages_per_block
        index = array("Q")
        kept: list[bytes] = []
        for k in range(n):
            block = hashes[k * per : (k + 1) * per]
            if block.count(ZERO_HASH) != per:
                index.append(b + k)
                kept += block
        return index, b"".join(kept)

    def _scan_file(self) -> Generator[tuple[int, array, bytes, memoryview | None], None, None]:
        parent = os.getpid()

        def work(group: Rows) -> bytes:
            if os.getpid() != parent and not self._own_fd:
                # The worker reads through its own file description: sharing this one, two
                # processes reading alternate chunks look like random reads to read-ahead.
                self.fd, self._own_fd = sparse.reopen(self.fd), True
            out = []
            for b, n, want in group:
                index, pages = self._read_hash(b, n, want)
                out += [_COUNT.pack(len(index)), index.tobytes(), pages]
            return b"".join(out)

        width = HASH_LEN * self.pages_per_block
        results = share_map(self._groups(), work, pack_rows, lambda d: unpack_rows(d, 3))
        with closing(results):
            for group, payload in results:
                pos = 0
                for b, _, want in group:
                    (k,) = _COUNT.unpack_from(payload, pos)
                    pos += _COUNT.size
                    index = array("Q")
                    index.frombytes(payload[pos : pos + 8 * k])
                    pos += 8 * k
                    yield b, index, payload[pos : pos + width * k], None
                    pos += width * k
                    self._account(want)

    def _account(self, n: int) -> None:
        self.bytes_read += n
        if self.progress:
            self.progress(n)

    def _scan_stream(self) -> Generator[tuple[int, array, bytes, memoryview | None], None, None]:
        shift = self.shift
        bs = 1 << shift
        mv = self._buf
        block = 0
        while True:
            got = 0
            while got < len(mv):
                with io_errors(f"{self.name}: read failed at byte {self.size + got}"):
                    k = os.readv(self.fd, [mv[got:]])
                if k == 0:
                    break
                got += k
            if got == 0:
                return
            self.size += got
            n = (got + bs - 1) >> shift
            index, pages = self._hash(block, n, got)
            yield block, index, pages, mv
            self._account(got)
            block += n
            if got < len(mv):
                return


Chunk = tuple[int, array, bytes, memoryview | None]  # what Scanner.chunks yields
# What differences yields: block, its hash in the signature, its hash in the file, its page
# hashes in the file, its bytes or None.
Difference = tuple[int, bytes | bytearray, bytes, bytes, memoryview | None]


def differences(sig: Signature, chunks: Iterable[Chunk], shift: int) -> Iterator[Difference]:
    """The walk of a scan against a signature (diff's changes, verify's first difference):
    every block where the scanned file differs from sig, ascending, as (block, its hash in
    sig, its hash in the file, its page hashes in the file, its bytes or None). ZERO_HASH
    stands for a hole or zeros on either side (and the page hashes are then all
    ZERO_HASH). The bytes come only from a stream scan, for a block the file holds data
    in, and are valid until the next item."""
    di, dh, dp = sig.data_index, sig.hashes, sig.pages
    width = HASH_LEN << (shift - PAGE_SHIFT)
    gone = bytes(width)
    nd = len(di)
    d = 0
    for first, index, pages, view in chunks:
        n = len(index)
        if not n:
            continue
        # Most chunks are unchanged: the signature holds exactly these blocks and pages.
        e = bisect.bisect_right(di, index[n - 1], d)
        if e - d == n and di[d:e] == index and dp[d * width : e * width] == pages:
            d = e
            continue
        for k, i in enumerate(index):
            found = pages[k * width : (k + 1) * width]
            while d < nd and di[d] < i:
                yield di[d], dh[d * HASH_LEN : (d + 1) * HASH_LEN], ZERO_HASH, gone, None
                d += 1
            base: bytes | bytearray = ZERO_HASH
            if d < nd and di[d] == i:
                base = dh[d * HASH_LEN : (d + 1) * HASH_LEN]
                d += 1
                if dp[(d - 1) * width : d * width] == found:
                    continue
            blk = None if view is None else view[(i - first) << shift : (i - first + 1) << shift]
            yield i, base, tree_hash(found), found, blk
    while d < nd:
        yield di[d], dh[d * HASH_LEN : (d + 1) * HASH_LEN], ZERO_HASH, gone, None
        d += 1


def read_blocks(fd: int, shift: int, size: int, first: int, count: int, name: str) -> bytes:
    """The bytes of blocks first..first+count-1, clipped at size (no padding)."""
    off = first << shift
    want = min(count << shift, size - off)
    buf = bytearray(want)
    with io_errors(f"{name}: read failed at byte {off}"):
        got = sparse.pread_full(fd, memoryview(buf), off)
    if got < want:
        raise SourceChanged(f"{name}: file shrank while being read (at byte {off + got})")
    return bytes(buf)


class SignatureBuilder:
    """Feeds page hashes, in block order, to the canonical encoder. When the size is known
    up front the bytes stream out as blocks come; a stream's size is known only at its end
    while the header comes first, so its page hashes are kept compactly (8 bytes a data
    block and 16 a page) and encoded once the size is known. write may be None: diff wants
    only the identity."""

    def __init__(self, shift: int, size: int | None, write: Callable[[bytes], object] | None = None):
        self.shift = shift
        self.write = write
        self.written = 0
        self.enc: SignatureEncoder | None = None
        self.index, self.pages = array("Q"), bytearray()
        if size is not None:
            self._start(size)

    def _start(self, size: int) -> None:
        self.enc = SignatureEncoder(SigHeader(self.shift, size))
        self._emit(self.enc.start())

    def _emit(self, b: bytes) -> None:
        if b and self.write is not None:
            self.write(b)
            self.written += len(b)

    def add_many(self, index: array, pages: bytes) -> None:
        """One chunk's blocks (Scanner.chunks): their numbers, ascending, and page hashes."""
        if self.enc is not None:
            self._emit(self.enc.data_many(index, pages))
        else:
            self.index.extend(index)
            self.pages += pages

    def finish(self, size: int, mtime_ns: int = 0) -> bytes:
        """Returns the identity."""
        if self.enc is None:
            self._start(size)
            assert self.enc is not None
            self._emit(self.enc.data_many(self.index, self.pages))
            self.index, self.pages = array("Q"), bytearray()
        tail, identity = self.enc.finish(mtime_ns)
        self._emit(tail)
        return identity

    @property
    def data_blocks(self) -> int:
        return self.enc.data_blocks if self.enc is not None else len(self.index)


def scan_into(scan: Scanner, out: SignatureBuilder) -> None:
    """Every block scan reads, into out."""
    with closing(scan.chunks()) as chunks:  # closed at once on error: its worker is reaped
        for _, index, digests, _ in chunks:
            out.add_many(index, digests)


def identity_of(fd: int, shift: int, name: str) -> tuple[int, str]:
    """(size, identity in hex) of what fd holds now, as its signature would give them (a
    zero mtime), with no signature written: apply's checks that a file is a whole base
    or target."""
    scan = Scanner(fd, shift, name)
    out = SignatureBuilder(shift, scan.size if scan.seekable else None)
    scan_into(scan, out)
    return scan.size, out.finish(scan.size).hex()
