"""Apply: write a patch into a destination in place, block by block, safe to repeat.

For every block a record touches, the destination's current block decides: already the
target, skip; the base, write; inside the window the journal says an interrupted run was
writing, write; anything else, stop before writing. Zeros are never written: they become
holes. Each record is checked whole (CRC, hashes of its decompressed data) before any of
its bytes reach the destination."""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass

from . import sparse
from .errors import IOFailure, SparsePatchError, WrongBase
from .format import (
    REC_COPY,
    REC_DATA,
    REC_ZERO,
    ZERO_HASH,
    PatchReader,
    Record,
    block_hash,
    decode_data,
)
from .journal import Journal

WRITE_STEP = 1 << 20  # bytes reserved and written at once
SYNC_BUDGET = 64 << 20  # bytes written between two fdatasyncs of the destination
JOURNAL_LOOKAHEAD = 64 << 20  # without a plan, how far past a write a journal window reaches


@dataclass(frozen=True)
class ApplyStats:
    target_size: int
    block_size: int
    records: int
    blocks_written: int
    blocks_punched: int
    blocks_copied: int
    blocks_skipped: int
    bytes_written: int
    resumed: bool


class Applier:
    def __init__(self, reader: PatchReader, fd: int, name: str, journal: Journal,
                 accepted: tuple[int, int] | None, discard: bool = False):
        self.discard = discard
        self.reader = reader
        self.h = reader.header
        self.fd = fd
        self.name = name
        self.journal = journal
        self.accepted = accepted or (0, 0)
        self.window = (0, 0)
        self.unsynced = 0  # bytes written since the last fdatasync
        # From the pre-read, the write span of each record that writes: (first, end, bytes).
        self.plan_first, self.plan_end, self.plan_bytes = array("Q"), array("Q"), array("Q")
        self.shift = self.h.block_shift
        self.bs = 1 << self.shift
        self._buf = bytearray(self.bs)
        self._zero = bytes(self.bs)
        self.written = self.punched = self.copied = self.skipped = self.bytes_written = 0
        self.punch_ok = True
        self.is_device = sparse.is_block_device(fd)

    # -- destination access

    def _state(self, block: int) -> bytes:
        view = memoryview(self._buf)
        try:
            got = sparse.pread_full(self.fd, view, block << self.shift)
        except OSError as e:
            raise IOFailure(f"{self.name}: read failed at byte {block << self.shift}: {e.strerror}") from None
        if got < self.bs:
            view[got:] = self._zero[: self.bs - got]
        if self._zero.startswith(view):
            return ZERO_HASH
        return block_hash(view)

    def _cover(self, first: int, end: int) -> None:
        """Make sure the journal names [first, end) before anything there is written.

        The window must hold every block written since the last fdatasync (those may be torn
        or lost). So it starts at the first such write, and moves on only after a sync, once
        SYNC_BUDGET bytes were written; its end reaches as far as the writes the budget will
        allow, read from the plan when the pre-read made one. Windows then change once per
        budget, not once per scattered record (each change costs a journal fsync)."""
        if self.window[0] <= first and end <= self.window[1]:
            return
        start = self.window[0] if self.window[1] else first
        if not self.window[1] and self.accepted[1] and self.accepted[1] <= first:
            # This run's first window would drop the interrupted run's, whose writes may not
            # be durable yet (its blocks read as target from the page cache): sync them first.
            try:
                sparse.sync_data(self.fd)
            except OSError as e:
                raise IOFailure(f"{self.name}: fdatasync failed: {e.strerror}") from None
        if self.unsynced >= SYNC_BUDGET:
            try:
                sparse.sync_data(self.fd)  # durable before the window stops covering it
            except OSError as e:
                raise IOFailure(f"{self.name}: fdatasync failed: {e.strerror}") from None
            self.unsynced = 0
            start = first
        end = max(end, self._horizon(first))
        a0, a1 = self.accepted
        if a1 > first:
            # Part of an interrupted run's window is still ahead of us: keep accepting it if
            # this run is interrupted too, or its torn blocks would be refused next time.
            start, end = min(start, a0), max(end, a1)
        self.window = (start, end)
        self.journal.write(self.h.base_identity, self.h.target_identity, start, end)

    def _horizon(self, first: int) -> int:
        """End of the writes, from first on, that fit in what is left of the sync budget."""
        if not self.plan_first:
            return first + (JOURNAL_LOOKAHEAD >> self.shift)
        k = bisect.bisect_left(self.plan_first, first)
        budget = SYNC_BUDGET - self.unsynced
        end = first + 1
        while k < len(self.plan_first) and budget > 0:
            end = max(end, self.plan_end[k])
            budget -= self.plan_bytes[k]
            k += 1
        return end

    def _write(self, block: int, data: bytes | memoryview) -> None:
        """Write whole blocks from block on, in steps of at least 1 MiB, each reserved first:
        a full disk then stops apply between blocks, never inside one."""
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
                raise IOFailure(f"{self.name}: write failed at byte {off}: {e.strerror}") from None
            self.bytes_written += len(piece)
            self.unsynced += len(piece)

    def _punch(self, first: int, count: int) -> None:
        off = first << self.shift
        end = max(self.h.target_size, self._size())
        if not self.is_device:
            # To the end of the last block, past EOF: a punch that stops inside a page
            # (a shrink already truncated, resumed) zeroes it but leaves it allocated.
            end = -(-end >> self.shift) << self.shift
        length = min(count << self.shift, end - off)
        if length <= 0:
            return
        self.unsynced += 4096  # a punch is metadata: cheap, but not free to make durable
        try:
            ok = self.punch_ok and sparse.punch_hole(self.fd, off, length, self.discard)
        except OSError as e:
            raise IOFailure(f"{self.name}: cannot punch a hole at byte {off}: {e.strerror}") from None
        if not ok:
            # The filesystem cannot deallocate: zeros are the only way to get the content right.
            self.punch_ok = False
            for b in range(count):
                end = min(self.bs, self.h.target_size - ((first + b) << self.shift))
                self._write(first + b, self._zero[:end])

    def _size(self) -> int:
        return sparse.file_size(self.fd)

    # -- records

    def _needs_write(self, rec: Record) -> list[bool]:
        """Per block: True to write, False when already the target. Raises before any write
        if a block is neither base nor target."""
        out = []
        a0, a1 = self.accepted
        for b in range(rec.count):
            block = rec.first_block + b
            cur = self._state(block)
            if cur == rec.target_hash(b):
                out.append(False)
            elif cur == rec.base_hash(b) or a0 <= block < a1:
                out.append(True)
            else:
                raise WrongBase(
                    f"{self.name}: destination block at byte {block << self.shift} is neither base "
                    f"nor target: it changed after the signature was taken ({rec.where()})"
                )
        return out

    def _runs(self, need: list[bool]) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for b, w in enumerate(need):
            if not w:
                continue
            if runs and runs[-1][0] + runs[-1][1] == b:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((b, 1))
        return runs

    def record(self, rec: Record) -> None:
        data = decode_data(self.h, rec) if rec.kind == REC_DATA else None
        need = self._needs_write(rec)
        runs = self._runs(need)
        self.skipped += rec.count - sum(need)
        if not runs:
            return
        self._cover(rec.first_block + runs[0][0], rec.first_block + runs[-1][0] + runs[-1][1])
        for b, m in runs:
            first = rec.first_block + b
            if rec.kind == REC_ZERO:
                self._punch(first, m)
                self.punched += m
            elif rec.kind == REC_DATA:
                assert data is not None
                self._write(first, memoryview(data)[b << self.shift : (b + m) << self.shift])
                self.written += m
            else:
                self._copy(rec, b, m)

    def _check_source(self, rec: Record, k: int) -> None:
        src = rec.source_block + k
        if self._state(src) != rec.target_hash(k):
            raise WrongBase(
                f"{self.name}: copy source block at byte {src << self.shift} does not hold "
                f"the expected content ({rec.where()})"
            )

    def _copy(self, rec: Record, b: int, m: int) -> None:
        for k in range(b, b + m):
            self._check_source(rec, k)  # leaves the source block in self._buf
            dst = rec.first_block + k
            length = min(self.bs, self.h.target_size - (dst << self.shift))
            self._write(dst, memoryview(self._buf)[:length])
            self.copied += 1

    def _release(self, at: int) -> None:
        """After a refusal (raised before its record wrote anything), every block written is
        whole, so the journal is not needed, unless an earlier interrupted run's window lies
        ahead, not yet repaired. Keeping it would block the right patch for no reason."""
        if self.accepted[1] > at or self.journal.fd is None and self.accepted == (0, 0):
            return
        size = self._size()
        if size not in (self.h.base_size, self.h.target_size):
            return  # writes grew the file: only the journal makes its size acceptable now
        if size > self.h.target_size:
            # A shrink not yet truncated: the last target block was written clipped, and with
            # the old bytes after it still there it reads as neither base nor target.
            return
        try:
            sparse.sync_data(self.fd)
        except OSError:
            return
        self.journal.remove()

    def precheck(self, reader: PatchReader) -> None:
        """A dry run over a second reading of the patch: every CRC, MAC, payload and block
        hash, and every destination block a record would write, checked before the first
        write. A truncated, corrupt or wrong-base patch then leaves the destination as it was."""
        for rec in reader.records():
            if rec.kind == REC_DATA:
                decode_data(self.h, rec)
            need = self._needs_write(rec)
            if rec.kind == REC_COPY:
                for k, w in enumerate(need):
                    if w:
                        self._check_source(rec, k)
            runs = self._runs(need)
            if runs:
                self.plan_first.append(rec.first_block + runs[0][0])
                self.plan_end.append(rec.first_block + runs[-1][0] + runs[-1][1])
                written = sum(m for _, m in runs)
                self.plan_bytes.append(4096 if rec.kind == REC_ZERO else written << self.shift)

    def run(self) -> ApplyStats:
        n = 0
        at = 0
        try:
            for rec in self.reader.records():
                at = rec.first_block
                self.record(rec)
                n += 1
        except IOFailure:
            raise  # a failed write may have torn a block: the journal must stay
        except SparsePatchError:
            self._release(at)
            raise
        try:
            sparse.set_size(self.fd, self.h.target_size)
            sparse.sync(self.fd)
        except OSError as e:
            raise IOFailure(f"{self.name}: cannot finish (truncate/fsync): {e.strerror}") from None
        self.journal.remove()
        return ApplyStats(self.h.target_size, self.bs, n, self.written, self.punched, self.copied,
                          self.skipped, self.bytes_written, self.accepted != (0, 0))

