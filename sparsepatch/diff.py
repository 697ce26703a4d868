"""Diff: compare a source with a destination's signature and write a patch.

Two phases. The first reads the source's data extents once, hashes every block and keeps
the changed blocks (24-40 bytes each, in compact arrays). Only then is it known which
destination blocks stay unchanged, and so which may serve as copy sources: a copy may only
read a block the patch leaves alone, which keeps apply order-free and resumable. The second
phase writes the header (which carries the target identity found in the first) and the
records in offset order, reading the changed data again from the source (or from a spool
when the source is a stream). The DATA records' literal is compressed as one zstd stream
per frame of up to 1 GiB (spec section 5.2), in order, while a thread reads ahead."""

from __future__ import annotations

import bisect
import os
from array import array
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any

from .blocks import Chunk, Scanner, SignatureBuilder, Stamp, differences, read_blocks
from .errors import SourceChanged, io_errors
from .format import (
    FLAG_FULL,
    FLAG_MAC,
    HASH_LEN,
    MAX_RECORD_BLOCKS,
    MAX_STAGE_PAGES,
    MAX_WINDOW_LOG,
    PAGE_LITERAL,
    PAGE_MOVED,
    PAGE_SAME,
    PAGE_SIZE,
    REC_COPY,
    REC_DATA,
    REC_ZERO,
    ZERO_HASH,
    PatchHeader,
    Signature,
    blocks_for,
    data_meta,
    data_record_max_blocks,
    hash_block,
    pages_per_block,
)
from .moves import PagePlan, classify, find_sources
from .writer import PatchWriter, frame_sizes, window_log_for

DEFAULT_LEVEL = 3
BATCH_BYTES = 1 << 20  # data per batch of records (the unit handed from the reading thread)
MAX_BATCH = 800  # records per batch


@dataclass(frozen=True)
class DiffStats:
    base_size: int
    target_size: int
    block_size: int
    target_blocks: int
    data_blocks: int
    zero_blocks: int
    copy_blocks: int
    records: int
    bytes_read: int
    data_bytes: int
    payload_bytes: int
    patch_bytes: int
    base_identity: str
    target_identity: str
    full: bool
    holes_skipped: bool  # False: every byte was read (a stream, a device, no hole map)
    frames: int = 0  # zstd frames of the literal stream
    window_log: int = 0  # the patch header's window_log
    moved_pages: int = 0  # pages of DATA blocks copied from elsewhere in the base
    stage_pages: int = 0  # of their sources, the base pages apply stages before writing


@dataclass
class Changes:
    """Blocks whose target differs from the base, ascending, one entry per block."""

    index: array  # array('Q')
    base: bytearray  # HASH_LEN per entry
    target: bytearray  # HASH_LEN per entry; ZERO_HASH where the target block is zeros
    pages: bytearray = field(default_factory=bytearray)  # the target's page hashes, P per entry

    def add(self, i: int, base: bytes | bytearray, target: bytes, pages: bytes = b"") -> None:
        self.index.append(i)
        self.base += base
        self.target += target
        self.pages += pages

    def changed(self, block: int) -> bool:
        c = bisect.bisect_left(self.index, block)
        return c < len(self.index) and self.index[c] == block

    def hashes(self, k: int) -> tuple[bytes, bytes]:
        a, b = k * HASH_LEN, (k + 1) * HASH_LEN
        return bytes(self.base[a:b]), bytes(self.target[a:b])

    def target_hash(self, k: int) -> bytes:
        return bytes(self.target[k * HASH_LEN : (k + 1) * HASH_LEN])


class _Spool:
    """Changed blocks of a stream source, kept in a temporary file for the second phase."""

    WHERE = "spool file for the source stream"

    def __init__(self, shift: int):
        import tempfile  # only a stream source needs it

        self.shift = shift
        self.file = tempfile.TemporaryFile(prefix="sparsepatch-spool-")

    def add(self, blk: memoryview) -> None:
        with io_errors(self.WHERE):
            self.file.write(blk)

    def finish(self) -> None:
        with io_errors(self.WHERE):
            self.file.flush()

    def read(self, k: int, count: int) -> bytes:
        return os.pread(self.file.fileno(), count << self.shift, k << self.shift)


def _scan(sig: Signature, scan: Scanner, spool: _Spool | None, target: SignatureBuilder) -> Changes:
    """Phase one: the changes against sig; the target's blocks go to target (its identity)."""
    changes = Changes(array("Q"), bytearray(), bytearray())

    def fed(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            target.add_many(chunk[1], chunk[2])
            yield chunk

    with closing(scan.chunks()) as chunks:  # closed at once on error: its worker is reaped
        for i, base, digest, pages, blk in differences(sig, fed(chunks), scan.shift):
            changes.add(i, base, digest, pages)
            if spool and blk is not None:  # only a stream scan hands out block contents
                spool.add(blk)
    return changes


def _copy_sources(sig: Signature, changes: Changes, target_blocks: int) -> dict[bytes, int]:
    """For each changed target hash, the lowest destination block holding it that the
    patch leaves unchanged (and that survives the final truncate)."""
    wanted: dict[bytes, int] = {}
    if not len(sig.data_index):
        return {}  # nothing to copy from (a full patch): spare the dict of every target hash
    for k in range(len(changes.index)):
        t = changes.target_hash(k)
        if t != ZERO_HASH:
            wanted[t] = -1
    if not wanted:
        return {}
    # The loop runs once per signature block (a profile's hot spot at 16 KiB blocks), so
    # it only slices and looks up; whether a hit is itself changed is asked per hit.
    ci = changes.index
    dh, di = bytes(sig.hashes), sig.data_index
    limit = bisect.bisect_left(di, target_blocks)
    left = len(wanted)
    for d, pos in enumerate(range(0, limit * HASH_LEN, HASH_LEN)):
        h = dh[pos : pos + HASH_LEN]
        if h in wanted and wanted[h] < 0:
            j = di[d]
            c = bisect.bisect_left(ci, j)
            if c < len(ci) and ci[c] == j:
                continue  # the patch changes this block: it cannot be a source
            wanted[h] = j
            left -= 1
            if not left:
                break
    return {h: j for h, j in wanted.items() if j >= 0}


def _page_plan(sig: Signature, changes: Changes, sources: dict[bytes, int],
               target_blocks: int) -> PagePlan:
    """Kinds of the pages of every DATA block, and their moved sources (moves.py)."""
    shift = sig.header.block_shift
    per = pages_per_block(1 << shift)
    width = per * HASH_LEN
    data = [k for k in range(len(changes.index))
            if changes.index[k] < target_blocks and changes.target_hash(k) != ZERO_HASH
            and changes.target_hash(k) not in sources]
    di, dp = sig.data_index, sig.pages  # not copied: at 8 GiB of data they are 32 MiB
    zero_pages = bytes(width)

    def base_pages(block: int) -> bytes:
        d = bisect.bisect_left(di, block)
        return bytes(dp[d * width : (d + 1) * width]) if d < len(di) and di[d] == block else zero_pages

    wanted: set[bytes] = set()
    for k in data:
        same = base_pages(changes.index[k])
        pages = changes.pages[k * width : (k + 1) * width]
        for p in range(0, width, HASH_LEN):
            h = bytes(pages[p : p + HASH_LEN])
            if h != ZERO_HASH and h != same[p : p + HASH_LEN]:
                wanted.add(h)

    def changed(block: int) -> bool:
        return block < target_blocks and changes.changed(block)

    def wanted_base_pages() -> Iterator[tuple[int, bytes]]:
        """(page number, hash) of the base's pages whose hash is wanted, ascending. The
        signature's hashes are tested in slices of bytes, in a comprehension: once a page,
        a generator step per page cost more than the whole test (0.17 s per 2 GiB)."""
        step = 1 << 16  # pages per slice: 1 MiB of hashes at a time
        total = len(di) * per
        for a in range(0, total, step):
            chunk = bytes(dp[a * HASH_LEN : min(total, a + step) * HASH_LEN])
            for at in [i for i in range(0, len(chunk), HASH_LEN) if chunk[i : i + HASH_LEN] in wanted]:
                j = a + at // HASH_LEN
                yield di[j // per] * per + j % per, chunk[at : at + HASH_LEN]

    found = find_sources(wanted, wanted_base_pages(), changed, shift) if wanted else {}
    plan = PagePlan()
    for k in data:
        block = changes.index[k]
        classify(plan, block, bytes(changes.pages[k * width : (k + 1) * width]), base_pages(block),
                 found, changed, shift)
    return plan


def _plan(changes: Changes, sources: dict[bytes, int], target_blocks: int,
          max_data: int, ahead: dict[int, set[int]] | None = None) -> Iterator[tuple[int, int, int, int]]:
    """Group changes into records: (kind, first change k, count, copy source block). A
    record goes on over the next block while that block is of the same kind (and, for a
    COPY, its source is the next block of the destination), up to the kind's limit. ahead:
    per DATA block, the blocks after it whose pages it reads in place; a DATA record stops
    before such a block, which no record may change before (or while) it is read."""
    ahead = ahead or {}

    def kind_of(k: int) -> tuple[int, int]:
        """The one place a change's record kind is decided: (kind, copy source block)."""
        target = changes.target_hash(k)
        if target == ZERO_HASH:
            return REC_ZERO, 0
        src = sources.get(target)
        return (REC_DATA, 0) if src is None else (REC_COPY, src)

    ci = changes.index
    n = len(ci)
    k = 0
    while k < n and ci[k] < target_blocks:
        kind, src = kind_of(k)
        limit = max_data if kind == REC_DATA else MAX_RECORD_BLOCKS
        m = 1
        read: set[int] = set(ahead.get(ci[k], ()))
        while (k + m < n and m < limit and ci[k + m] == ci[k] + m and ci[k + m] < target_blocks
               and kind_of(k + m) == (kind, src + m if kind == REC_COPY else 0)
               and ci[k + m] not in read):
            read.update(ahead.get(ci[k + m], ()))
            m += 1
        yield kind, k, m, src
        k += m


def _recheck(raw: bytes, changes: Changes, k: int, m: int, shift: int, first: int, name: str) -> None:
    """The first phase chose these blocks by their hashes; a source that changed since
    would otherwise put data in the patch that its own hashes do not describe."""
    bs = 1 << shift
    view = memoryview(raw)
    for b in range(m):
        if hash_block(view[b << shift : (b + 1) << shift], bs) != changes.target_hash(k + b):
            raise SourceChanged(
                f"{name}: block at byte {(first + b) << shift} changed while diff was reading it"
            )


def _literal_pages(raw: bytes | bytearray, kinds: list[bytes]) -> bytes:
    """The LITERAL pages of blocks of target bytes (clipped at the target's end): whole
    pages, the last one zero-padded."""
    pages = sum(len(k) for k in kinds)
    if all(kind == PAGE_LITERAL for k in kinds for kind in k):
        # The common case (every page new): no copy page by page, only the padding.
        return bytes(raw) + bytes(pages * PAGE_SIZE - len(raw))
    view = memoryview(raw)
    parts = []
    at = 0
    for k in kinds:
        for kind in k:
            if kind == PAGE_LITERAL:
                page = view[at : at + PAGE_SIZE]
                parts.append(page if len(page) == PAGE_SIZE else bytes(page).ljust(PAGE_SIZE, b"\0"))
            at += PAGE_SIZE
    return b"".join(parts)


def write_patch(sig: Signature, fd: int, name: str, write: Callable[[bytes], object], *,
                full: bool = False, level: int = DEFAULT_LEVEL, key: bytes | None = None,
                progress: Callable[[int], None] | None = None, source_check: str = "mtime",
                warn: Callable[[str], object] | None = None,
                next_signature: Callable[[bytes], object] | None = None,
                since: list[tuple[int, int]] | None = None,
                window_log: int = MAX_WINDOW_LOG) -> DiffStats:
    shift = sig.header.block_shift
    bs = 1 << shift
    # A regular file that changes while diff runs changes its mtime, ctime or size: one
    # stat before and after covers the blocks read once. The DATA blocks, read twice, are
    # hashed again too: a write through a shared mmap changes no timestamp. With
    # source_check "content" (for a file whose mtime is always new) only the size is
    # compared, and the second reading's hashes are the check.
    stamp = Stamp(fd, source_check)
    # since: the byte ranges that may differ from the signature's state (diff --since); the
    # other blocks are what the signature says, read from it and not from the source.
    scan = Scanner(fd, shift, name, progress=progress, warn=warn, only=since, known=sig)
    spool = None if scan.seekable else _Spool(shift)
    # The target's canonical signature: its identity goes into the header, and with
    # next_signature its bytes are the signature the destination will have once the patch
    # is applied (mtime unknown: 0), so the next diff needs nothing from the destination.
    target = SignatureBuilder(shift, scan.size if scan.seekable else None, next_signature)
    changes = _scan(sig, scan, spool, target)
    size = scan.size
    target_blocks = blocks_for(size, shift)
    flags = (FLAG_FULL if full else 0) | (FLAG_MAC if key is not None else 0)
    header = PatchHeader(flags, shift, sig.header.file_size, size, sig.identity,
                         target.finish(size),
                         base_mtime_ns=sig.mtime_ns)
    sources = _copy_sources(sig, changes, target_blocks)
    max_data = data_record_max_blocks(shift)

    pages = _page_plan(sig, changes, sources, target_blocks)
    # The page hashes (16 bytes per 4 KiB of base data) are not needed past the plan: let
    # them go before the compressor takes its window, so the two never add up.
    sig.pages = bytearray()
    per = pages_per_block(bs)

    def plan() -> Iterator[tuple[int, int, int, int]]:
        return _plan(changes, sources, target_blocks, max_data, pages.ahead)

    def literal(k: int, m: int) -> int:
        """Bytes of LITERAL pages of the DATA record of changes k..k+m-1."""
        first = changes.index[k]
        return PAGE_SIZE * sum(pages.kinds[first + b].count(PAGE_LITERAL) for b in range(m))

    # The header names the window of the largest frame, so the frames are known first.
    frames = frame_sizes(plan(), literal)
    if frames:
        header = replace(header, window_log=window_log_for(max(frames), window_log))

    out = PatchWriter(write, key)
    out.header(header)
    # Before every other record: apply copies these pages aside before its first write.
    out.stage(pages.stage_runs(MAX_STAGE_PAGES), per)
    if spool:
        spool.finish()

    def read(kind: int, k: int, m: int, src: int, spooled: int) -> _Planned:
        """One record without its payload, and the literal it carries: read and re-checked."""
        first = changes.index[k]
        metas = []
        for b in range(m):
            base, target = changes.hashes(k + b)
            metas.append(base if kind == REC_ZERO else base + target)
        if kind != REC_DATA:
            return kind, first, m, b"".join(metas), src, b""
        if spool:
            raw = spool.read(spooled, m)[: min(m << shift, size - (first << shift))]
        else:
            raw = read_blocks(fd, shift, size, first, m, name)
        _recheck(raw, changes, k, m, shift, first, name)
        kinds = [pages.kinds[first + b] for b in range(m)]
        moved = array("Q")
        hashes = []
        width = per * HASH_LEN
        for b in range(m):
            moved.extend(pages.sources.get(first + b, ()))
            target_pages = changes.pages[(k + b) * width : (k + b + 1) * width]
            hashes += [bytes(target_pages[p * HASH_LEN : (p + 1) * HASH_LEN])
                       for p, pk in enumerate(kinds[b]) if pk in (PAGE_SAME, PAGE_MOVED)]
        meta = data_meta([(metas[b][:HASH_LEN], metas[b][HASH_LEN:], kinds[b]) for b in range(m)],
                         moved, b"".join(hashes))
        return kind, first, m, meta, len(moved), _literal_pages(raw, kinds)

    def batches() -> Iterator[list[_Planned]]:
        """Records in groups of about BATCH_BYTES of data: a hand-off per record would cost
        more than a small record's work."""
        spooled = 0
        batch: list[_Planned] = []
        weight = 0
        for kind, k, m, src in plan():
            batch.append(read(kind, k, m, src, spooled))
            if kind != REC_ZERO:
                spooled += m
            # DATA weighs its data; ZERO and COPY their hashes (16 or 32 bytes a block).
            weight += (m << shift) if kind == REC_DATA else m * 2 * HASH_LEN
            if weight >= BATCH_BYTES or len(batch) >= MAX_BATCH:
                yield batch
                batch, weight = [], 0
        if batch:
            yield batch

    # The literal is one stream per frame, so it is compressed in order, here; a thread
    # reads and re-checks the records ahead of it (zstd and the reads release the GIL).
    out.frames(frames, level, window_log)
    with _ReadAhead(batches()) as ahead:
        for batch in ahead:
            for kind, first, count, meta, src, raw in batch:
                out.record(kind, first, count, meta, src, raw, per)
    stamp.verify(name, "diff")
    written = out.finish()
    c = out.counts
    return DiffStats(sig.header.file_size, size, bs, target_blocks, c[REC_DATA],
                     c[REC_ZERO], c[REC_COPY], out.records, scan.bytes_read, out.data_bytes,
                     out.payload_bytes, written, sig.identity.hex(), header.target_identity.hex(),
                     full, scan.holes_skipped, len(frames), header.window_log, pages.moved,
                     len(pages.stage))


_Planned = tuple[int, int, int, bytes, int, bytes]  # kind first count meta source literal


class _ReadAhead:
    """Runs an iterator in a thread, up to AHEAD items ahead of the consumer; its errors
    are raised to the consumer in order. Leaving the with block (an error of the
    consumer's, Ctrl-C) stops the thread before returning."""

    AHEAD = 2  # batches: a record is at most 8 MiB (16 at 16 MiB blocks); each held costs that

    def __init__(self, items: Iterator[list[_Planned]]):
        import queue
        import threading

        self.items = items
        self.queue: queue.Queue[tuple[int, Any]] = queue.Queue(self.AHEAD)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sparsepatch-read", daemon=True)

    def _run(self) -> None:
        import queue

        try:
            for item in self.items:
                msg: tuple[int, Any] = (0, item)
                while not self._put(msg, queue):
                    if self.stop.is_set():
                        return
            msg = (1, None)
        except BaseException as e:  # handed to the consumer, which raises it
            msg = (2, e)
        while not self._put(msg, queue) and not self.stop.is_set():
            pass

    def _put(self, msg: tuple[int, Any], queue: Any) -> bool:
        try:
            self.queue.put(msg, timeout=0.1)
        except queue.Full:
            return False
        return True

    def __enter__(self) -> Iterator[list[_Planned]]:
        self.thread.start()
        return self._get()

    def _get(self) -> Iterator[list[_Planned]]:
        while True:
            kind, value = self.queue.get()
            if kind == 1:
                return
            if kind == 2:
                raise value
            yield value

    def __exit__(self, *exc: object) -> None:
        import queue

        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)  # make room: the thread may wait to put
            except queue.Empty:
                pass
        self.thread.join()
