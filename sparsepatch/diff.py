"""Diff: compare a source with a destination's signature and write a patch.

Two phases. The first reads the source's data extents once, hashes every block and keeps
the changed blocks (24-40 bytes each, in compact arrays). Only then is it known which
destination blocks stay unchanged, and so which may serve as copy sources: a copy may only
read a block the patch leaves alone, which keeps apply order-free and resumable. The second
phase writes the header (which carries the target identity found in the first) and the
records in offset order, reading the changed data again from the source (or from a spool
when the source is a stream)."""

from __future__ import annotations

import bisect
import os
from array import array
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .blocks import Chunk, Scanner, SignatureBuilder, Stamp, differences, read_blocks
from .errors import SourceChanged, io_errors
from .fork import Rows, pack_rows, share_map, unpack_rows
from .format import (
    CRC,
    FLAG_FULL,
    FLAG_MAC,
    HASH_LEN,
    MAX_RECORD_BLOCKS,
    MAX_STAGE_PAGES,
    PAGE_LITERAL,
    PAGE_SIZE,
    REC_COPY,
    REC_DATA,
    REC_STAGE,
    REC_ZERO,
    RECORD,
    ZERO_HASH,
    MacChain,
    PatchHeader,
    PatchTrailer,
    Record,
    Signature,
    blocks_for,
    data_meta,
    data_record_max_blocks,
    encode_patch_header,
    encode_patch_trailer,
    encode_record,
    hash_block,
    meta_length,
    pages_per_block,
    raw_length,
)
from .moves import PagePlan, classify, find_sources

if TYPE_CHECKING:
    import zstandard

DEFAULT_LEVEL = 3
BATCH_BYTES = 1 << 20  # data per batch of records (the unit shared with the worker process)
MAX_BATCH = 800  # records per batch: its description (40 bytes a record) stays within fork.MAX_COMMAND


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
    di, dp = sig.data_index, bytes(sig.pages)
    zero_pages = bytes(width)

    def base_pages(block: int) -> bytes:
        d = bisect.bisect_left(di, block)
        return dp[d * width : (d + 1) * width] if d < len(di) and di[d] == block else zero_pages

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

    def every_base_page() -> Iterator[tuple[int, bytes]]:
        for d, block in enumerate(di):
            for p in range(per):
                at = (d * per + p) * HASH_LEN
                yield block * per + p, dp[at : at + HASH_LEN]

    found = find_sources(wanted, every_base_page(), changed, shift) if wanted else {}
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


class _Compressor:
    """The zstd context of this process, made on first use (a signature never needs zstd)."""

    def __init__(self, level: int):
        self.level = level
        self.c: zstandard.ZstdCompressor | None = None

    def compress(self, raw: bytes | bytearray) -> bytes:
        if self.c is None:
            import zstandard

            self.c = zstandard.ZstdCompressor(level=self.level, write_checksum=True,
                                              write_content_size=True)
        return self.c.compress(raw)


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
    parts = []
    at = 0
    for k in kinds:
        for kind in k:
            if kind == PAGE_LITERAL:
                parts.append(bytes(raw[at : at + PAGE_SIZE]).ljust(PAGE_SIZE, b"\0"))
            at += PAGE_SIZE
    return b"".join(parts)


def write_patch(sig: Signature, fd: int, name: str, write: Callable[[bytes], object], *,
                full: bool = False, level: int = DEFAULT_LEVEL, key: bytes | None = None,
                progress: Callable[[int], None] | None = None, source_check: str = "mtime",
                warn: Callable[[str], object] | None = None,
                next_signature: Callable[[bytes], object] | None = None,
                since: list[tuple[int, int]] | None = None) -> DiffStats:
    shift = sig.header.block_shift
    bs = 1 << shift
    # A regular file that changes while diff runs changes its mtime, ctime or size: one
    # stat before and after covers the blocks read once. The DATA blocks, read twice, are
    # hashed again too: a write through a shared mmap changes no timestamp. With
    # source_check "content" (for a file whose mtime is always new) only the size is
    # compared, and the second reading's hashes are the check.
    per = pages_per_block(1 << shift)
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

    written = 0
    mac = MacChain(key) if key is not None else None

    def emit(b: bytes) -> None:
        """Write one element of the patch, followed by its tag when authenticating."""
        nonlocal written
        write(b)
        written += len(b)
        if mac is not None:
            tag = mac.next(b)
            write(tag)
            written += len(tag)

    plan = _page_plan(sig, changes, sources, target_blocks)
    emit(encode_patch_header(header))
    counts = {REC_DATA: 0, REC_ZERO: 0, REC_COPY: 0}
    records = payload_bytes = data_bytes = 0
    # Before every other record: apply copies these pages aside before its first write.
    for first, count, hashes in plan.stage_runs(MAX_STAGE_PAGES):
        emit(encode_record(Record(REC_STAGE, first, count, hashes, pages=per)))
        records += 1
    if spool:
        spool.finish()

    def build(kind: int, k: int, m: int, src: int, spooled: int) -> Record:
        """One record with its payload: read, re-check and compress. Each payload is its
        own frame, so the bytes do not depend on which process made them."""
        first = changes.index[k]
        metas = []
        for b in range(m):
            base, target = changes.hashes(k + b)
            metas.append(base if kind == REC_ZERO else base + target)
        if kind != REC_DATA:
            return Record(kind, first, m, b"".join(metas), src, pages=per)
        if spool:
            raw = spool.read(spooled, m)[: min(m << shift, size - (first << shift))]
        else:
            raw = read_blocks(fd, shift, size, first, m, name)
        _recheck(raw, changes, k, m, shift, first, name)
        kinds = [plan.kinds[first + b] for b in range(m)]
        moved = array("Q")
        for b in range(m):
            moved.extend(plan.sources.get(first + b, ()))
        literal = _literal_pages(raw, kinds)
        meta = data_meta([(metas[b][:HASH_LEN], metas[b][HASH_LEN:], kinds[b]) for b in range(m)], moved)
        payload = cctx.compress(literal) if literal else b""
        return Record(kind, first, m, meta, len(moved), payload, pages=per)

    def build_batch(batch: Rows) -> bytes:
        """A batch's records, encoded: what the forked worker sends back."""
        return b"".join(encode_record(build(*plan)) for plan in batch)

    def batches() -> Iterator[Rows]:
        """Records in groups of about BATCH_BYTES of data: a task per record made the
        workers wait on the hand-off more than they compressed (2,000 records of 40 KiB)."""
        spooled = 0
        batch: Rows = []
        weight = 0
        for kind, k, m, src in _plan(changes, sources, target_blocks, data_record_max_blocks(shift),
                                     plan.ahead):
            batch.append((kind, k, m, src, spooled))
            if kind != REC_ZERO:
                spooled += m
            # DATA weighs its data; ZERO and COPY their hashes (16 or 32 bytes a block).
            weight += (m << shift) if kind == REC_DATA else m * 2 * HASH_LEN
            if weight >= BATCH_BYTES or len(batch) >= MAX_BATCH:
                yield batch
                batch, weight = [], 0
        if batch:
            yield batch

    # The records are built (read, re-checked, compressed) by this process and a forked
    # worker, batches shared out as they come, and written here in order.
    cctx = _Compressor(level)
    with closing(share_map(batches(), build_batch, pack_rows, lambda d: unpack_rows(d, 5))) as built:
        for _, payload in built:
            view, pos = memoryview(payload), 0
            while pos < len(view):
                # The encoded record's own header says what the stats need.
                kind, first, count, payload_len, last = RECORD.unpack_from(view, pos)
                meta_len = meta_length(kind, count, last, per)
                end = pos + RECORD.size + meta_len + CRC.size + payload_len
                if kind == REC_DATA:
                    meta = bytes(view[pos + RECORD.size : pos + RECORD.size + meta_len])
                    data_bytes += raw_length(header, Record(kind, first, count, meta, last, pages=per))
                emit(bytes(view[pos:end]))
                pos = end
                counts[kind] += count
                records += 1
                payload_bytes += payload_len
    stamp.verify(name, "diff")
    emit(encode_patch_trailer(PatchTrailer(records, counts[REC_DATA], counts[REC_ZERO],
                                           counts[REC_COPY], payload_bytes, written)))
    return DiffStats(sig.header.file_size, size, bs, target_blocks, counts[REC_DATA],
                     counts[REC_ZERO], counts[REC_COPY], records, scan.bytes_read, data_bytes,
                     payload_bytes, written, sig.identity.hex(), header.target_identity.hex(), full,
                     scan.holes_skipped, plan.moved, len(plan.stage))
