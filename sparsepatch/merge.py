"""Merge: one patch from the first patch's base to the last one's target, made from the
patches alone (spec/FORMAT.md 5.6).

The patches are read in order, and every block some patch touches is kept as what it holds
now, page by page: a zero page, a page of some patch's literal (spooled to a temporary file)
or a page of the original base (the first patch's base, "A"), with its page hash. A patch's
SAME and MOVED pages, and its COPY records, read the state before that patch: its records
never see each other's writes, so a patch's blocks are committed only after all of them are
resolved. Every reference is checked against the page hash the patch carries for it.

Then each touched block below the last target's end that does not hold A's content again is
written as one record of a new patch: ZERO, COPY (a whole block of A that the merged patch
leaves unchanged) or DATA, whose pages are LITERAL, ZERO, SAME (A's page at the same offset)
or MOVED (another page of A, staged when the merged patch changes its block at or before the
block that reads it), through the writer diff uses. Literal that a later patch replaced is
dropped, which is why the merged patch is smaller than the patches together."""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import UsageError, WrongBase, io_errors
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
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGE_ZERO,
    REC_COPY,
    REC_DATA,
    REC_STAGE,
    REC_ZERO,
    ZERO_HASH,
    FrameDecoder,
    PatchHeader,
    PatchReader,
    Record,
    blocks_for,
    checked_page_hashes,
    data_meta,
    data_record_max_blocks,
    pages_per_block,
    tree_hash,
)
from .moves import PagePlan
from .writer import PatchWriter, frame_sizes, window_log_for

# A page of the state: None for zeros, (LIT, spool offset, hash) or (BASE, page of A, hash).
LIT, BASE = 0, 1
Page = tuple[int, int, bytes] | None


@dataclass(frozen=True)
class CopyOf:
    """A block that holds block `source` of A whole (a COPY record), page hashes unknown."""

    source: int


@dataclass
class Block:
    hash: bytes  # its block hash now
    pages: list[Page] | CopyOf


@dataclass(frozen=True)
class MergeStats:
    patches: int
    input_bytes: int
    patch_bytes: int
    records: int
    data_blocks: int
    zero_blocks: int
    copy_blocks: int
    data_bytes: int
    payload_bytes: int
    moved_pages: int
    stage_pages: int
    base_identity: str
    target_identity: str


def _short(h: bytes) -> str:
    return h.hex()[:16] + "..."


def check_chain(readers: list[PatchReader]) -> None:
    """Same block size everywhere, and each patch starts where the one before it leads."""
    first = readers[0]
    for prev, cur in zip(readers, readers[1:], strict=False):
        a, b = prev.header, cur.header
        if b.block_shift != first.header.block_shift:
            raise UsageError(
                f"merge: {cur.name} has {b.block_size}-byte blocks, {first.name} "
                f"{first.header.block_size}-byte blocks: patches of one chain share a block size"
            )
        if b.full:
            raise UsageError(f"merge: {cur.name} is a full patch: it replaces everything before "
                             "it, so merge from it on")
        if a.target_identity != b.base_identity or a.target_size != b.base_size:
            raise WrongBase(
                f"merge: {cur.name} does not follow {prev.name}: {prev.name} leads to "
                f"{_short(a.target_identity)} ({a.target_size} bytes), {cur.name} starts from "
                f"{_short(b.base_identity)} ({b.base_size} bytes)"
            )


class _Spool:
    """The literal pages of every patch, in a temporary file: read back for the pages the
    merged patch keeps."""

    WHERE = "spool file for merged literal"

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="sparsepatch-merge-")
        self.size = 0

    def add(self, data: bytes) -> int:
        at = self.size
        with io_errors(self.WHERE):
            self.file.write(data)
        self.size += len(data)
        return at

    def finish(self) -> None:
        with io_errors(self.WHERE):
            self.file.flush()

    def read(self, offsets: list[int]) -> bytes:
        """The pages at offsets, in order: runs of consecutive pages are read at once."""
        out = []
        k = 0
        fd = self.file.fileno()
        with io_errors(self.WHERE):
            while k < len(offsets):
                m = 1
                while k + m < len(offsets) and offsets[k + m] == offsets[k] + m * PAGE_SIZE:
                    m += 1
                out.append(os.pread(fd, m * PAGE_SIZE, offsets[k]))
                k += m
        return b"".join(out)

    def close(self) -> None:
        self.file.close()


class Chain:
    """The state of the touched blocks after each patch (module docstring)."""

    def __init__(self, first: PatchHeader, spool: _Spool):
        self.shift = first.block_shift
        self.per = pages_per_block(first.block_size)
        self.base_size = first.base_size
        self.base_blocks = blocks_for(first.base_size, self.shift)
        # Blocks at or past this hold zeros unless touched: past A's end, or cut off by a
        # shrink (and grown again with zeros).
        self.zero_from = self.base_blocks
        self.blocks: dict[int, Block] = {}
        self.first_base: dict[int, bytes | None] = {}  # A's hash of each touched block; None: unknown
        self.spool = spool
        self.all_zero: list[Page] = [None] * self.per
        self.pending: dict[int, bytes | None] = {}  # first_base of blocks the patch touches first
        # Page hashes of A's pages that some patch gave (a SAME or MOVED page, a STAGE
        # record): what lets a copy of a block of A that the merged patch changes be
        # written as moved pages.
        self.known: dict[int, bytes] = {}
        self.zero_from_before_last = self.zero_from

    def page(self, q: int) -> Page | CopyOf:
        """What page q holds now: a Page (None for zeros), or for a page of a block that
        copies A's block s, CopyOf(the page of A)."""
        b, i = divmod(q, self.per)
        st = self.blocks.get(b)
        if st is None:
            return None if b >= self.zero_from else CopyOf(q)
        if isinstance(st.pages, CopyOf):
            return CopyOf(st.pages.source * self.per + i)
        return st.pages[i]

    def resolve(self, q: int, h: bytes, where: str, what: str) -> Page:
        """Page q of the state before the patch being read, which the patch says has hash h."""
        p = self.page(q)
        if isinstance(p, CopyOf):
            # A page of A: the patch tells its hash, which must agree with what others said.
            if self.known.setdefault(p.source, h) != h:
                raise WrongBase(
                    f"merge: {where}: {what} page at byte {q << PAGE_SHIFT} has page hash "
                    f"{h.hex()} in this patch, an earlier patch gave the base's page "
                    f"{self.known[p.source].hex()}"
                )
            return (BASE, p.source, h)
        if p is None or p[2] != h:
            found = "zeros" if p is None else f"page hash {p[2].hex()}"
            raise WrongBase(
                f"merge: {where}: {what} page at byte {q << PAGE_SHIFT} has page hash {h.hex()} "
                f"in this patch, the patches before it leave {found} there"
            )
        return p

    def read(self, reader: PatchReader) -> None:
        """One patch's records, resolved against the state before it, then committed."""
        h = reader.header
        per = self.per
        new: dict[int, Block] = {}
        decoder = FrameDecoder(h)
        for rec in reader.records():
            if rec.kind == REC_STAGE:
                for i in range(rec.count):
                    p = self.page(rec.first_block + i)
                    if isinstance(p, CopyOf):
                        self.known.setdefault(p.source, rec.meta[i * HASH_LEN : (i + 1) * HASH_LEN])
                continue
            where = rec.where()
            for k in range(rec.count):
                self._check_base(rec, k, where)
            if rec.kind == REC_ZERO:
                for k in range(rec.count):
                    new[rec.first_block + k] = Block(ZERO_HASH, self.all_zero)
            elif rec.kind == REC_COPY:
                for k in range(rec.count):
                    new[rec.first_block + k] = self._copy(rec, k, where)
            else:
                self._data(rec, decoder, new, where, per)
        for b in new:
            if b not in self.first_base:
                self.first_base[b] = self.pending[b]
        self.blocks.update(new)
        self.pending = {}
        # A shrink cuts blocks off; growing again brings back zeros.
        end = h.target_blocks
        for b in [b for b in self.blocks if b >= end]:
            self.blocks[b] = Block(ZERO_HASH, self.all_zero)
        self.zero_from = min(self.zero_from, end)

    def _check_base(self, rec: Record, k: int, where: str) -> None:
        """The record's base hash is what the patches before it leave in the block."""
        b = rec.first_block + k
        st = self.blocks.get(b)
        if st is not None:
            cur = st.hash
        elif b < self.zero_from:
            self.pending[b] = rec.base_hash(k)  # untouched: A's block, which this hash describes
            return
        else:
            # Untouched zeros: past A's end (where A's hash is zeros too) or cut off by a
            # shrink (where no patch said what A held).
            cur = ZERO_HASH
            self.pending[b] = ZERO_HASH if b >= self.base_blocks else None
        if cur != rec.base_hash(k):
            raise WrongBase(
                f"merge: {where}: block {b} has base hash {_short(rec.base_hash(k))}, the "
                f"patches before it leave {_short(cur)} there"
            )

    def _copy(self, rec: Record, k: int, where: str) -> Block:
        s = rec.source_block + k
        target = rec.target_hash(k)
        st = self.blocks.get(s)
        if st is None:
            if s >= self.zero_from:
                raise WrongBase(f"merge: {where}: copy source block {s} holds zeros after the "
                                f"patches before it, the record expects {_short(target)}")
            return Block(target, CopyOf(s))
        if st.hash != target:
            raise WrongBase(f"merge: {where}: copy source block {s} has hash {_short(st.hash)}, "
                            f"the record expects {_short(target)}")
        return Block(target, st.pages)

    def _data(self, rec: Record, decoder: FrameDecoder, new: dict[int, Block], where: str,
              per: int) -> None:
        literal = decoder.decode(rec)
        at = self.spool.add(literal)
        sources = iter(rec.sources)
        lit = 0
        for k, hashes in checked_page_hashes(rec, literal):
            target = rec.target_hash(k)
            pages: list[Page] = []
            q0 = (rec.first_block + k) * per
            for i, kind in enumerate(rec.page_kinds(k)):
                h = hashes[i * HASH_LEN : (i + 1) * HASH_LEN]
                if kind == PAGE_LITERAL:
                    pages.append((LIT, at + lit * PAGE_SIZE, h))
                    lit += 1
                elif kind == PAGE_ZERO:
                    pages.append(None)
                elif kind == PAGE_SAME:
                    pages.append(self.resolve(q0 + i, h, where, "same"))
                else:
                    pages.append(self.resolve(next(sources), h, where, "moved source"))
            new[rec.first_block + k] = Block(target, pages)


@dataclass(frozen=True)
class _DataBlock:
    kinds: bytes
    sources: array
    hashes: list[bytes]
    literal: list[int]


@dataclass
class _Item:
    """A merged record before it is written."""

    kind: int
    first: int
    count: int
    metas: list[bytes]  # per block: base hash (+ target hash, + kinds for DATA)
    source: int = 0  # COPY
    sources: array | None = None  # DATA: moved sources
    hashes: list[bytes] | None = None  # DATA: SAME and MOVED page hashes
    literal: list[int] | None = None  # DATA: spool offsets of its LITERAL pages


def _cannot(what: str) -> UsageError:
    return UsageError(f"merge: {what}; the merged patch cannot say this: apply the patches in turn")


def plan(chain: Chain, last: PatchHeader) -> tuple[list[_Item], PagePlan]:
    """The merged patch's records, ascending, and its staged pages."""
    per, shift = chain.per, chain.shift
    end = last.target_blocks
    target_pages = blocks_for(last.target_size, PAGE_SHIFT)
    # Blocks of A cut off by a shrink and grown back, never touched: A's hash is in no patch.
    low, high = chain.zero_from_before_last, min(chain.base_blocks, end)
    if low < high and sum(1 for b in chain.first_base if low <= b < high) < high - low:
        raise _cannot(f"blocks from byte {low << shift} were cut off by a shrink and grown back "
                      "without any patch saying what the base held there")
    changed: list[int] = []
    for b in sorted(chain.blocks):
        if b >= end:
            break
        first = chain.first_base[b]
        if first is None:
            raise _cannot(f"block at byte {b << shift} was cut off by a shrink before any patch "
                          "said what the base held there")
        if chain.blocks[b].hash != first:
            changed.append(b)
    is_changed = set(changed)
    pages = PagePlan()
    blocks: list[tuple[int, int, int | _DataBlock | None]] = []  # (block, kind, detail)
    for b in changed:
        st = chain.blocks[b]
        pagelist = st.pages
        if isinstance(pagelist, CopyOf):
            s = pagelist.source
            if s not in is_changed and s < min(chain.base_blocks, end):
                blocks.append((b, REC_COPY, s))
                continue
            # The source changes: the block's pages move from A, if every one's hash is known.
            known = [chain.known.get(s * per + i) for i in range(per)]
            if None in known:
                raise _cannot(f"block at byte {b << shift} is a copy of the base's block at byte "
                              f"{s << shift}, which the merged patch changes or cuts off, and "
                              "no patch gives the hashes of all its pages")
            pagelist = [(BASE, s * per + i, h) for i, h in enumerate(known) if h is not None]
        if all(p is None for p in pagelist):
            blocks.append((b, REC_ZERO, None))
            continue
        kinds = bytearray(per)
        src = array("Q")
        hashes: list[bytes] = []
        lits: list[int] = []
        tree = []
        for i, p in enumerate(pagelist):
            q = b * per + i
            tree.append(ZERO_HASH if p is None or q >= target_pages else p[2])
            if p is None or q >= target_pages:
                kinds[i] = PAGE_ZERO
            elif p[0] == LIT:
                kinds[i] = PAGE_LITERAL
                lits.append(p[1])
            else:
                u, h = p[1], p[2]
                hashes.append(h)
                if u == q:
                    kinds[i] = PAGE_SAME
                    continue
                kinds[i] = PAGE_MOVED
                src.append(u)
                pages.moved += 1
                ub = u // per
                if ub in is_changed:
                    if ub <= b:
                        pages.stage[u] = h
                    else:
                        pages.ahead.setdefault(b, set()).add(ub)
        if tree_hash(b"".join(tree)) != st.hash:
            # Every page was checked against the patches' hashes: only contradicting inputs
            # (or a bug) get here, and apply would refuse the block.
            raise WrongBase(f"merge: block at byte {b << shift}: its merged pages do not hash to "
                            f"the target hash {_short(st.hash)} the patches give it")
        blocks.append((b, REC_DATA, _DataBlock(bytes(kinds), src, hashes, lits)))
    return _group(chain, blocks, pages), pages


def _group(chain: Chain, blocks: list[tuple[int, int, int | _DataBlock | None]],
           pages: PagePlan) -> list[_Item]:
    """Consecutive blocks of one kind into records, within the limits of spec section 7;
    a DATA record ends before a block one of its blocks reads in place."""
    max_data = data_record_max_blocks(chain.shift)
    items: list[_Item] = []
    read: set[int] = set()
    for b, kind, detail in blocks:
        st = chain.blocks[b]
        base = chain.first_base[b]
        assert base is not None
        cur = items[-1] if items else None
        limit = max_data if kind == REC_DATA else MAX_RECORD_BLOCKS
        joins = (cur is not None and cur.kind == kind and cur.first + cur.count == b
                 and cur.count < limit)
        if joins and kind == REC_COPY:
            assert cur is not None
            joins = detail == cur.source + cur.count
        if joins and kind == REC_DATA:
            joins = b not in read
        if not joins:
            cur = _Item(kind, b, 0, [])
            if kind == REC_COPY:
                assert isinstance(detail, int)
                cur.source = detail
            elif kind == REC_DATA:
                cur.sources, cur.hashes, cur.literal = array("Q"), [], []
                read = set()
            items.append(cur)
        assert cur is not None
        cur.count += 1
        if kind == REC_ZERO:
            cur.metas.append(base)
        elif kind == REC_COPY:
            cur.metas.append(base + st.hash)
        else:
            assert isinstance(detail, _DataBlock)
            cur.metas.append(base + st.hash + detail.kinds)
            assert cur.sources is not None and cur.hashes is not None and cur.literal is not None
            cur.sources.extend(detail.sources)
            cur.hashes += detail.hashes
            cur.literal += detail.literal
            read |= pages.ahead.get(b, set())
    return items


def merge_patches(readers: list[PatchReader], write: Callable[[bytes], object], *,
                  key: bytes | None = None, level: int = 3,
                  window_log: int = MAX_WINDOW_LOG, opened: Callable[[], None] | None = None,
                  input_bytes: int = 0) -> MergeStats:
    """Read every patch (in chain order) and write the merged patch through write. opened()
    is called after every input was read and checked, before the first byte is written:
    the caller opens its output only then, so a refused chain leaves none."""
    check_chain(readers)
    first, last = readers[0].header, readers[-1].header
    spool = _Spool()
    try:
        chain = Chain(first, spool)
        for k, reader in enumerate(readers):
            if k == len(readers) - 1:
                chain.zero_from_before_last = chain.zero_from
            chain.read(reader)
        spool.finish()
        items, pages = plan(chain, last)
        return _write(chain, items, pages, first, last, write, key, level, window_log, opened,
                      len(readers), input_bytes)
    finally:
        spool.close()


def _write(chain: Chain, items: list[_Item], pages: PagePlan, first: PatchHeader,
           last: PatchHeader, write: Callable[[bytes], object], key: bytes | None, level: int,
           window_log: int, opened: Callable[[], None] | None, n: int,
           input_bytes: int) -> MergeStats:
    per = chain.per

    def sizes() -> Iterator[tuple[int, int, int, int]]:
        for k, it in enumerate(items):
            yield it.kind, k, 1, 0

    frames = frame_sizes(sizes(), lambda k, m: PAGE_SIZE * len(items[k].literal or ()))
    flags = (first.flags & FLAG_FULL) | (FLAG_MAC if key is not None else 0)
    header = PatchHeader(flags, first.block_shift, first.base_size, last.target_size,
                         first.base_identity, last.target_identity,
                         base_mtime_ns=first.base_mtime_ns,
                         window_log=window_log_for(max(frames), window_log) if frames else 0)
    if opened is not None:
        opened()
    out = PatchWriter(write, key)
    out.header(header)
    out.stage(pages.stage_runs(MAX_STAGE_PAGES), per)
    out.frames(frames, level, window_log)
    for it in items:
        if it.kind == REC_DATA:
            assert it.sources is not None and it.hashes is not None and it.literal is not None
            meta = data_meta([(m[:HASH_LEN], m[HASH_LEN : 2 * HASH_LEN], m[2 * HASH_LEN :])
                              for m in it.metas], it.sources, b"".join(it.hashes))
            out.record(REC_DATA, it.first, it.count, meta, len(it.sources),
                       chain.spool.read(it.literal), per)
        else:
            out.record(it.kind, it.first, it.count, b"".join(it.metas), it.source, b"", per)
    written = out.finish()
    c = out.counts
    return MergeStats(n, input_bytes, written, out.records, c[REC_DATA], c[REC_ZERO],
                      c[REC_COPY], out.data_bytes, out.payload_bytes, pages.moved,
                      len(pages.stage), first.base_identity.hex(), last.target_identity.hex())
