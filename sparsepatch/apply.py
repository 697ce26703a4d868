"""Apply: the whole protocol of writing a patch into a destination in place, block by block,
safe to repeat (spec/FORMAT.md, section 9). apply_patch() takes an open patch reader, an open
destination and its journal; api opens them.

For every block a record touches, the destination's current block decides: already the
target, skip; the base, write; inside the window the journal says an interrupted run was
writing, write; anything else, stop before writing. Zeros are never written: they become
holes. Each record is checked whole (CRC, hashes of its decompressed data) before any of
its bytes reach the destination.

A DATA block is assembled from its pages (literal, zero, the same page of the destination,
or a page moved from elsewhere in the base) and checked against its target hash before it is
written. A moved page the patch overwrites before reading it is staged: copied into the
scratch before the first write (section 9.7)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from . import sparse
from .blocks import identity_of
from .destination import Destination
from .errors import (
    ChecksumMismatch,
    FormatError,
    IOFailure,
    SparsePatchError,
    UsageError,
    VerifyMismatch,
    WrongBase,
    io_errors,
)
from .format import (
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
    FrameDecoder,
    PatchHeader,
    PatchReader,
    Record,
    assemble,
    page_hash,
    pages_per_block,
    rule_16_clipped_tail,
)
from .journal import Journal
from .scratch import Scratch
from .staging import Stager
from .undo import SYNC_BATCH, Undo
from .window import PUNCH_COST, WriteWindow

READBACK_BLOCKS = 64  # blocks read back in one call


@dataclass(frozen=True)
class ApplyStats:
    """What an apply did, for --stats and the API: blocks per action and bytes written."""

    target_size: int
    block_size: int
    records: int
    blocks_written: int
    blocks_punched: int
    blocks_copied: int
    blocks_skipped: int
    bytes_written: int
    resumed: bool
    scratch_bytes: int = 0  # bytes of base pages this run staged (0 when resumed)
    moved_pages: int = 0  # pages of the blocks written that came from elsewhere in the base


@dataclass(frozen=True)
class Decision:
    """What one record needs, decided from the destination before any of it is written:
    its decoded data (DATA records), and the runs (first block within the record, count)
    of blocks to write; the others already hold the target."""

    rec: Record
    data: bytes | bytearray | None
    runs: list[tuple[int, int]]
    pins: frozenset[int] = frozenset()  # blocks ahead whose pages it reads in place
    moved: int = 0  # moved pages of the blocks it writes

    @property
    def blocks(self) -> int:
        return sum(m for _, m in self.runs)

    @property
    def first(self) -> int:
        return self.rec.first_block + self.runs[0][0]

    @property
    def end(self) -> int:
        return self.rec.first_block + self.runs[-1][0] + self.runs[-1][1]


class Applier:
    """Owns the record loop of one apply: decide() each record against the destination
    (the same decision for the dry run and the real one), write what it needs inside the
    journal window, count what was done, and drop the journal when a refusal leaves every
    block whole."""

    def __init__(self, h: PatchHeader, dest: Destination, journal: Journal, window: WriteWindow,
                 undo: Undo | None = None, scratch: Scratch | None = None, resumed_pages: int = -1):
        self.h = h
        self.stager = Stager(dest, journal, scratch, resumed_pages)
        self.moved = 0
        # Blocks ahead whose pages written blocks read in place: they must be durable
        # before such a block is overwritten, or a power cut could lose a written block
        # and the page it needs with it.
        self.pinned: set[int] = set()
        self.per = pages_per_block(1 << h.block_shift)
        self.start_size = dest.size()
        self.growth = 0  # bytes the writes will add past the destination's end (dry run)
        self.planning = False
        self.undo = undo
        # With an undo, decisions wait here until the spool holding their blocks' base
        # content is synced: one sync per batch, not one per record.
        self.pending: list[Decision] = []
        self.pending_bytes = 0
        self.dest = dest
        self.journal = journal
        self.window = window
        self.shift = h.block_shift
        self.frames = FrameDecoder(h)  # the literal stream of the reading in progress
        self.written = self.punched = self.copied = self.skipped = self.bytes_written = 0
        # (record, first block within it, count) written since the destination was last
        # synced: read back before the journal window moves past them.
        self.touched: list[tuple[Record, int, int]] = []

    def decide(self, rec: Record) -> Decision:
        """Check rec whole and decide each of its blocks. Raises before any write if the
        payload is bad, a block is neither base nor target, a copy source is wrong, or an
        assembled block is not its target."""
        if rec.kind == REC_STAGE:
            self.stager.add(rec)
            return Decision(rec, None, [])
        if not self.stager.checked:
            self.stager.check_whole()
        if self.planning:
            self.stager.staged.mark_read(rec)
        data: bytearray | None = None
        blocks = None
        current = bytearray()
        write = False
        if rec.kind == REC_DATA:
            data = bytearray(rec.count << self.shift)
            per = self.per

            def fetch(kind: int, page: int, h: bytes) -> bytes | bytearray | memoryview:
                if kind == PAGE_SAME:
                    at = (page % per) << PAGE_SHIFT
                    got: bytes | bytearray | memoryview = memoryview(current)[at : at + PAGE_SIZE]
                else:
                    got = self.stager.page(page, rec)
                if page_hash(got) != h:
                    # The block would fail its target hash too; the page names where.
                    what = "same" if kind == PAGE_SAME else "moved source"
                    raise WrongBase(
                        f"{self.dest.name}: {what} page at byte {page << PAGE_SHIFT} does not "
                        f"hold the base's content (expected page hash {h.hex()}, found "
                        f"{page_hash(got).hex()}): it is not the patch's base ({rec.where()})"
                    )
                return got

            # Every DATA record is decoded, even one whose blocks all hold the target already:
            # the frame's later records need the decoder to have seen it.
            blocks = assemble(self.h, rec, self.frames.decode(rec), fetch, lambda k: write)
        runs: list[tuple[int, int]] = []
        moved = 0
        for b in range(rec.count):
            block = rec.first_block + b
            buf = self.dest.read(block)
            cur = self.dest.hash(buf)
            if self.undo is not None:
                self.undo.see(block, rec.base_hash(b), rec.target_hash(b), cur, buf)
            write = cur != rec.target_hash(b)
            if write and cur != rec.base_hash(b) and not self.window.accepts(block):
                raise WrongBase(
                    f"{self.dest.name}: destination block at byte {block << self.shift} is neither "
                    f"base nor target: it changed after the signature was taken ({rec.where()})"
                )
            if blocks is not None:
                current = buf
                _, made = next(blocks)
                if made is not None:
                    self._check_assembled(rec, b, made)
                    assert data is not None
                    data[b << self.shift : (b + 1) << self.shift] = made
                    moved += rec.page_kinds(b).count(PAGE_MOVED)
            if not write:
                continue
            if rec.kind == REC_COPY:
                self._source(rec, b)
            if runs and runs[-1][0] + runs[-1][1] == b:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((b, 1))
        if runs and rec.kind != REC_ZERO and self.planning:
            lo = max(self.start_size, (rec.first_block + runs[0][0]) << self.shift)
            hi = min((rec.first_block + runs[-1][0] + runs[-1][1]) << self.shift, self.h.target_size)
            self.growth += max(0, hi - lo)
        return Decision(rec, data, runs, self.stager.pins(rec, self.shift) if runs else frozenset(), moved)

    def _check_assembled(self, rec: Record, b: int, made: bytearray) -> None:
        if self.dest.hash(made) == rec.target_hash(b):
            rule_16_clipped_tail(self.h, rec, b, made)
            return
        kinds = rec.page_kinds(b)
        if kinds.count(PAGE_LITERAL) + kinds.count(PAGE_ZERO) == len(kinds):
            # Made of the patch's bytes alone: the patch is at fault, not the destination.
            raise ChecksumMismatch(
                f"{rec.where()}: block {rec.first_block + b} does not match its target hash "
                "after decompression"
            )
        raise WrongBase(
                f"{self.dest.name}: block at byte {(rec.first_block + b) << self.shift} does not "
                f"match its target hash when assembled from its pages: the same or moved pages "
                f"it reads are not the base's ({rec.where()})"
            )

    def _source(self, rec: Record, k: int) -> bytes:
        """The bytes of copy source block k of rec, checked to hold its target content."""
        src = rec.source_block + k
        data = self.dest.read(src)
        if self.dest.hash(data) != rec.target_hash(k):
            raise WrongBase(
                f"{self.dest.name}: copy source block at byte {src << self.shift} does not hold "
                f"the expected content ({rec.where()})"
            )
        rule_16_clipped_tail(self.h, rec, k, data)
        return bytes(data)

    def precheck(self, reader: PatchReader) -> None:
        """A dry run over a first reading of the patch: every CRC, MAC, payload and block
        hash, and every destination block a record would write, checked before the first
        write. A truncated, corrupt or wrong-base patch then leaves the destination as it
        was. The decisions also tell the journal window where the writes will be."""
        self.planning = True
        self.frames = FrameDecoder(self.h)
        for rec in reader.records():
            d = self.decide(rec)
            if d.runs:
                cost = PUNCH_COST if rec.kind == REC_ZERO else d.blocks << self.shift
                self.window.plan(d.first, d.end, cost)
        self.stager.staged.check_read(reader.name)

    def run(self, reader: PatchReader) -> int:
        """Apply every record; returns how many there were."""
        n = at = 0
        self.planning = False
        self.stager.restart()  # the dry run read the STAGE records once already
        self.frames = FrameDecoder(self.h)
        try:
            for rec in reader.records():
                at = rec.first_block
                self._queue(self.decide(rec))
                n += 1
            self._flush()
        except (IOFailure, VerifyMismatch):
            raise  # a failed or lost write may have torn a block: the journal must stay
        except SparsePatchError:
            self.pending = []  # decided, not written: nothing of them to release
            self._release(at)
            raise
        if self.undo is not None:
            # A shrink's tail, recorded and durable before the truncate removes it.
            self.undo.tail(self.dest.read, self._extents, self.dest.size())
            self.undo.sync()
        if self.pinned:
            self.sync()  # the truncate may cut off pages that written blocks were made of
        self.dest.finish(self.h.target_size)
        self.check_touched()
        if self.undo is not None:
            self.undo.finish()  # before the journal goes: a rerun must still find its way
        self.journal.remove()
        self.stager.finish()  # after the journal: a journal without its scratch is stuck
        return n

    def _queue(self, d: Decision) -> None:
        if self.undo is None:
            self._apply(d)
            return
        self.pending.append(d)
        self.pending_bytes += len(d.data) if d.data is not None else 0
        if self.pending_bytes >= SYNC_BATCH or self.undo.unsynced >= SYNC_BATCH or len(self.pending) >= 4096:
            self._flush()

    def _flush(self) -> None:
        """The base content of the pending decisions' blocks is durable in the undo spool:
        now they may be written."""
        if self.undo is None or not self.pending:
            return
        self.undo.sync()
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        for d in pending:
            self._apply(d)

    def _extents(self, start: int, end: int) -> list[tuple[int, int]]:
        with io_errors(f"{self.dest.name}: cannot find its data at byte {start}"):
            return [(a, b) for a, b in sparse.data_extents(self.dest.fd, end, start)]

    def sync(self) -> None:
        """Make the writes durable and check that they read back as the target: storage
        that lies about a write or a punch must not let apply end with a wrong block."""
        self.dest.sync_data()
        self.pinned.clear()
        self.check_touched()

    def check_touched(self) -> None:
        """Read back every block written since the last check (after a sync: from the page
        cache, cheaply). A lied punch gets zeros written; any other difference stops apply."""
        touched, self.touched = self.touched, []
        bad = self._differing(touched)
        if bad and all(rec.kind == REC_ZERO for rec, _, _ in bad):
            for rec, b, _ in bad:
                n = self.dest.write_zeros(rec.first_block + b, 1, self.h.target_size)
                self.dest.punch_lies += 1
                self._wrote(n)
            self.dest.sync_data()
            bad = self._differing(bad)
        if bad:
            rec, b, _ = bad[0]
            off = (rec.first_block + b) << self.shift
            raise VerifyMismatch(
                f"{self.dest.name}: block at byte {off} does not read back as written "
                f"(expected {rec.target_hash(b).hex()}, found "
                f"{self.dest.state(rec.first_block + b, self.h.target_size).hex()}; "
                f"{rec.where()}): the storage did not keep it; the journal stays for a rerun"
            )

    def _differing(self, touched: list[tuple[Record, int, int]]) -> list[tuple[Record, int, int]]:
        """The blocks of touched, one (record, block within it, 1) each, that do not hold
        their target (read as far as the target's end, zero-padded)."""
        bad = []
        for rec, b, m in touched:
            for k0 in range(b, b + m, READBACK_BLOCKS):
                n = min(READBACK_BLOCKS, b + m - k0)
                found = self.dest.states(rec.first_block + k0, n, self.h.target_size)
                bad += [(rec, k0 + i, 1) for i, h in enumerate(found) if h != rec.target_hash(k0 + i)]
        return bad

    def _apply(self, d: Decision) -> None:
        rec = d.rec
        if rec.kind != REC_STAGE:
            self.skipped += rec.count - d.blocks
        if not d.runs:
            return
        if not self.stager.ready:
            self.stager.stage(self.growth)
        self.window.cover(d.first, d.end)
        self.moved += d.moved
        for b, m in d.runs:
            first = rec.first_block + b
            if self.pinned and any(k in self.pinned for k in range(first, first + m)):
                self.sync()
            self.touched.append((rec, b, m))
            if rec.kind == REC_ZERO:
                self.window.wrote(PUNCH_COST)
                self._wrote(self.dest.punch(first, m, max(self.h.target_size, self.dest.size())))
                self.punched += m
            elif rec.kind == REC_DATA:
                assert d.data is not None
                end = min((b + m) << self.shift, self.h.target_size - (rec.first_block << self.shift))
                piece = memoryview(d.data)[b << self.shift : end]
                self._wrote(self.dest.write(first, piece))
                self.written += m
            else:
                for k in range(b, b + m):
                    # Re-read just before writing: an earlier write may have changed the source.
                    data = self._source(rec, k)
                    dst = rec.first_block + k
                    length = min(len(data), self.h.target_size - (dst << self.shift))
                    self._wrote(self.dest.write(dst, data[:length]))
                    self.copied += 1
        self.pinned |= d.pins

    def _wrote(self, n: int) -> None:
        self.bytes_written += n
        self.window.wrote(n)

    def _release(self, at: int) -> None:
        """After a refusal (raised before its record wrote anything), every block written is
        whole, so the journal is not needed, unless an earlier interrupted run's window lies
        ahead, not yet repaired. Keeping it would block the right patch for no reason."""
        if self.journal.scratch_pages:
            # Staged pages may be in the scratch alone now (this run's or an interrupted
            # one's): the journal keeps it for a rerun.
            return
        if not self.window.may_release(at):
            return
        size = self.dest.size()
        if size not in (self.h.base_size, self.h.target_size):
            return  # writes grew the file: only the journal makes its size acceptable now
        if size > self.h.target_size:
            # A shrink not yet truncated: the last target block was written clipped, and with
            # the old bytes after it still there it reads as neither base nor target.
            return
        try:
            self.sync()
        except (IOFailure, VerifyMismatch):
            return  # a block may be wrong: the journal lets a rerun repair it
        self.journal.remove()


def apply_patch(reader: PatchReader, fd: int, name: str, journal: Journal, *, created: bool = False,
                reread: Callable[[], PatchReader] | None = None, discard: bool = False,
                warn: Callable[[str], object] | None = None, undo: Undo | None = None,
                scratch: Scratch | None = None) -> ApplyStats:
    """Apply the patch reader reads to the open, locked destination fd (called name in
    messages), with journal for resuming. With reread (a fresh reader of the same patch
    from its first byte), reader is first read whole as a dry run. created says that this
    run created the destination (a full patch). With undo, the base content of every block
    overwritten goes there first (spec section 9.6). scratch: where staged pages go (9.7)."""
    h = reader.header
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode) and not stat.S_ISBLK(mode):
        # /dev/null would take every write and keep none; its journal would land in /dev.
        raise UsageError(f"{name}: not a regular file or a block device; apply cannot write a "
                         "patch into it")
    dest = Destination(fd, name, h.block_shift, discard)
    slot = journal.load()
    if slot and (slot.base_identity, slot.target_identity) != (h.base_identity, h.target_identity):
        raise WrongBase(
            f"{journal.path}: an interrupted apply of another patch (target "
            f"{slot.target_identity.hex()[:16]}) left this journal; finish that patch "
            "first, or delete the journal if the destination is known to be intact"
        )
    size = dest.size()
    lo, hi = sorted((h.base_size, h.target_size))
    if dest.is_device and size != h.target_size:
        raise UsageError(f"{name}: block device of {size} bytes cannot become {h.target_size} bytes")
    if size not in (h.base_size, h.target_size) and not (slot and lo <= size <= hi):
        raise WrongBase(
            f"{name}: destination is {size} bytes; the patch expects the base size "
            f"{h.base_size} (or the target size {h.target_size} if already applied)"
        )
    if h.full and not created and not slot and size:
        return _full_onto_existing(reader, fd, name)
    if size == h.base_size > h.target_size and not slot:
        _check_cut_off(h, fd, name)
    if h.target_size > size:
        limit = sparse.file_size_limit(sparse.folder_of(fd, name), h.target_size)
        if limit:
            # Found only at the final truncate, it would leave a half-applied destination
            # and a journal that every rerun fails on.
            raise IOFailure(f"{name}: the target is {h.target_size} bytes, more than "
                            f"{limit[1]} allows ({limit[0]} bytes)")
    stale = bool(h.base_mtime_ns) and not slot and os.fstat(fd).st_mtime_ns != h.base_mtime_ns
    accepted = (slot.start_block, slot.end_block) if slot else None
    window = WriteWindow(journal, (h.base_identity, h.target_identity), lambda: applier.sync(),
                         h.block_shift, accepted)
    resumed_pages = -1
    if slot is not None:
        resumed_pages = slot.scratch_pages
        if slot.scratch_pages:
            assert scratch is not None
            scratch.open_existing(slot.scratch_pages)
    applier = Applier(h, dest, journal, window, undo, scratch, resumed_pages)
    if undo is not None:
        undo.load(size)
    if reread is not None:
        applier.precheck(reader)
        if undo is not None:
            undo.checked()
        reader = reread()
        if reader.header != h:
            raise FormatError(f"{reader.name}: the patch changed while apply was reading it")
    if undo is not None:
        undo.begin_run()
    n = applier.run(reader)
    a = applier
    if warn and dest.zero_filled:
        warn(f"{name}: this filesystem cannot leave gaps in a file (FAT, exFAT): "
             f"{dest.zero_filled} bytes of holes were written as zeros, and the image is not sparse")
    if warn and stale and a.written + a.punched + a.copied:
        # Only worth saying when this run changed something: a repeated apply also finds a
        # new mtime, its own.
        warn(f"{name} was modified after the signature was taken (its mtime differs); "
             "blocks the patch touched were checked, others were not: use --verify")
    return ApplyStats(h.target_size, 1 << h.block_shift, n, a.written, a.punched, a.copied,
                      a.skipped, a.bytes_written, accepted is not None, a.stager.scratch_bytes, a.moved)


def _check_cut_off(h: PatchHeader, fd: int, name: str) -> None:
    """A shrink truncates away the blocks past the target size, and the patch has no hash
    for them: only the base identity can say they are the base's. With no journal, a
    destination of the base size has not been written to, so it must be the base whole."""
    _, identity = identity_of(fd, h.block_shift, name)
    if identity != h.base_identity.hex():
        raise WrongBase(
            f"{name}: is not this patch's base (identity {identity[:16]}..., the patch's "
            f"base is {h.base_identity.hex()[:16]}...); the patch would cut off its last "
            f"{h.base_size - h.target_size} bytes unchecked"
        )


def _full_onto_existing(reader: PatchReader, fd: int, name: str) -> ApplyStats:
    """A full patch describes data blocks only, not the holes between them, so it cannot
    check an existing file block by block. Accept it only when the file already is the
    target (a repeated first copy); anything else is refused before writing."""
    h = reader.header
    size, identity = identity_of(fd, h.block_shift, name)
    if size != h.target_size or identity != h.target_identity.hex():
        raise WrongBase(
            f"{name}: exists and is not this patch's target; a full patch only creates a file "
            "(or resumes its interrupted creation): remove it, or update it with a signature"
        )
    n = blocks = 0
    for rec in reader.records():
        n += 1
        blocks += rec.count
    return ApplyStats(h.target_size, h.block_size, n, 0, 0, 0, blocks, 0, False)
