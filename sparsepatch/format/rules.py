"""The validity rules of spec/FORMAT.md section 7, one function or method per rule, numbered
as in the spec. Decoders call them in the order the spec lists them, each before reading or
allocating what the fields it checks announce. Rule 16 (the payload frame) is in frame.py,
because only a reader that uses a payload checks it."""

from __future__ import annotations

import bisect
import heapq
from array import array
from typing import TYPE_CHECKING

from ..errors import ChecksumMismatch, FormatError, UnsupportedVersion
from .base import (
    COMP_ZSTD,
    FLAG_FULL,
    FRAME_END,
    FRAME_START,
    HASH_LEN,
    KNOWN_DATA_FLAGS,
    MAX_RECORD_BLOCKS,
    MAX_SIG_HOLE_RUN,
    MAX_STAGE_PAGES,
    MAX_WINDOW_LOG,
    MIN_WINDOW_LOG,
    PAGE_MOVED,
    PAGE_SAME,
    PAGE_SHIFT,
    PAGE_ZERO,
    REC_COPY,
    REC_DATA,
    REC_NAMES,
    REC_STAGE,
    REC_ZERO,
    SIG_DATA,
    SIG_HOLE,
    VERSION,
    ZERO_HASH,
    blocks_for,
    check_magic,
    check_shift,
    check_size,
    data_record_max_blocks,
    pages_per_block,
    payload_limit,
    sig_run_limit,
)

if TYPE_CHECKING:
    from .patch import Record

# ---------------------------------------------------------------- headers (rules 1-3)


def rule_1_magic_version_flags(magic: bytes, version: int, flags: int, known_flags: int,
                               kind: str) -> None:
    """The header CRC, also rule 1, is checked right after this by the caller."""
    check_magic(magic, kind, kind)
    if version != VERSION:
        if version < VERSION:
            again = ("make the signature again" if kind == "signature"
                     else "make the patch again from a new signature")
        else:
            again = "a newer sparsepatch made it"
        raise UnsupportedVersion(
            f"{kind} format version {version} is not supported "
            f"(this sparsepatch reads version {VERSION}); {again}"
        )
    if flags & ~known_flags:
        raise UnsupportedVersion(f"{kind} flags {flags:#06x} at byte 10 has unknown bits set")


def rule_2_sig_fields(shift: int, hash_len: int, page_shift: int, reserved: int) -> None:
    check_shift(shift, "signature header at byte 12")
    if hash_len != HASH_LEN:
        raise FormatError(f"signature header at byte 13: hash length {hash_len}, expected {HASH_LEN}")
    if page_shift != PAGE_SHIFT:
        raise FormatError(
            f"signature header at byte 14: page size 2^{page_shift}, expected 2^{PAGE_SHIFT} (4 KiB)"
        )
    if reserved:
        raise FormatError("signature header at byte 15: reserved byte is not zero")


def rule_2_patch_fields(shift: int, compression: int, window_log: int, reserved: int) -> None:
    check_shift(shift, "patch header at byte 12")
    if compression != COMP_ZSTD:
        raise UnsupportedVersion(f"patch header at byte 13: unknown compression {compression}")
    # Checked here, before any decoder exists: the window is the memory a decoder takes.
    if window_log and not MIN_WINDOW_LOG <= window_log <= MAX_WINDOW_LOG:
        raise FormatError(
            f"patch header at byte 14: window_log {window_log} is outside 0 or "
            f"{MIN_WINDOW_LOG}..{MAX_WINDOW_LOG} (a decoder window of at most 128 MiB)"
        )
    if reserved:
        raise FormatError("patch header at byte 15: reserved field is not zero")


def rule_3_sig_size(file_size: int) -> None:
    check_size(file_size, "file size", "signature header at byte 16")


def rule_3_patch_sizes(flags: int, base_size: int, target_size: int) -> None:
    check_size(base_size, "base size", "patch header at byte 16")
    check_size(target_size, "target size", "patch header at byte 24")
    if flags & FLAG_FULL and base_size:
        raise FormatError("patch header at byte 16: a full patch must have base size 0")


# ---------------------------------------------------------------- signature runs (rules 4-6)


class SignatureRules:
    """Rules 4-6 over the runs of one signature, in stream order."""

    def __init__(self, block_count: int, block_shift: int):
        self.block_count = block_count
        self.page_bytes = HASH_LEN << (block_shift - PAGE_SHIFT)  # page hashes of a block
        self.max_data = sig_run_limit(block_shift)
        self.block = 0  # blocks the runs so far describe
        self.data_blocks = 0
        self.prev_kind = 0
        self.prev_count = 0

    def rule_4_run_header(self, where: str, kind: int, first: int, count: int) -> None:
        if kind not in (SIG_HOLE, SIG_DATA):
            raise FormatError(f"{where}: unknown run kind {kind}")
        if first != self.block:
            raise FormatError(f"{where}: starts at block {first}, expected {self.block}")
        if count == 0 or count > self.block_count - self.block:
            raise FormatError(
                f"{where}: block count {count} is outside 1..{self.block_count - self.block}"
            )
        if kind == SIG_DATA and count > self.max_data:
            raise FormatError(
                f"{where}: {count} blocks exceed the data run limit of {self.max_data}"
            )

    def rule_5_canonical(self, where: str, kind: int, reserved: bytes) -> None:
        """Reserved bytes, and section 4.4 rules 2 and 3: canonical runs are what make the
        identity a function of content alone. The run CRC follows, then rule_5_hashes."""
        if reserved != b"\0\0\0":
            raise FormatError(f"{where}: reserved bytes are not zero")
        if kind == SIG_HOLE and self.prev_kind == SIG_HOLE and self.prev_count != MAX_SIG_HOLE_RUN:
            raise FormatError(f"{where}: hole run follows a short hole run (not canonical)")
        if kind == SIG_DATA and self.prev_kind == SIG_DATA and self.prev_count != self.max_data:
            raise FormatError(f"{where}: data run follows a short data run (not canonical)")

    def rule_5_hashes(self, where: str, first: int, pages: bytes) -> None:
        """A data block has a page that is not zeros: a block of zero pages is a hole."""
        width = self.page_bytes
        zero = bytes(width)
        zero_at = pages.find(zero)  # a search, not a Python loop per block
        while zero_at >= 0:
            if zero_at % width == 0:
                raise FormatError(
                    f"{where}: block {first + zero_at // width} has only zero page hashes "
                    f"in a data run"
                )
            zero_at = pages.find(zero, (zero_at // width + 1) * width)

    def accept(self, kind: int, count: int) -> None:
        self.block += count
        if kind == SIG_DATA:
            self.data_blocks += count
        self.prev_kind, self.prev_count = kind, count

    def rule_6_trailer(self, where: str, reserved: bytes, identity: bytes, expected: bytes,
                       block_count: int, data_blocks: int) -> None:
        """After the trailer CRC; end of input is checked last, by the reader."""
        if reserved != b"\0\0\0":
            raise FormatError(f"{where}: reserved bytes are not zero")
        if identity != expected:
            raise ChecksumMismatch(
                f"{where}: identity mismatch "
                f"(expected {identity.hex()[:16]}..., found {expected.hex()[:16]}...)"
            )
        total = self.block_count
        if self.block != total or block_count != total or data_blocks != self.data_blocks:
            raise FormatError(
                f"{where}: counts {block_count} blocks/{data_blocks} data disagree with the runs "
                f"({self.block} blocks/{self.data_blocks} data, header says {total})"
            )


# ---------------------------------------------------------------- patch records (rules 7-15)


class RangeSet:
    """Disjoint block ranges kept merged and sorted, to ask whether a range meets any.
    16 bytes a range; ranges added in ascending order (as records come) are appended."""

    def __init__(self) -> None:
        self.starts = array("Q")
        self.ends = array("Q")

    def add(self, start: int, end: int) -> None:
        if not self.ends or start > self.ends[-1]:
            self.starts.append(start)
            self.ends.append(end)
            return
        if start == self.ends[-1]:
            self.ends[-1] = max(end, self.ends[-1])
            return
        lo = bisect.bisect_left(self.ends, start)  # first range ending at or after start
        hi = bisect.bisect_right(self.starts, end)  # ranges lo..hi-1 touch [start, end)
        if lo < hi:
            start = min(start, self.starts[lo])
            end = max(end, self.ends[hi - 1])
        self.starts[lo:hi] = array("Q", [start])
        self.ends[lo:hi] = array("Q", [end])

    def meets(self, start: int, end: int) -> bool:
        k = bisect.bisect_left(self.starts, end)
        return k > 0 and self.ends[k - 1] > start


class CopySources:
    """Block ranges that copy records read, asked only whether a later record's range
    meets one. Records ascend, so a source ending at or before a record's first block can
    never meet a later record: it is dropped. Among the rest, a range [first, end) meets
    one exactly when the smallest start is below end. A heap by start, with ranges that
    ended dropped from its top, answers in O(log n) (a sorted insert would be quadratic
    for a crafted patch whose sources descend)."""

    def __init__(self) -> None:
        self.heap: list[tuple[int, int]] = []

    def add(self, start: int, end: int) -> None:
        heapq.heappush(self.heap, (start, end))

    def meets(self, first: int, end: int) -> bool:
        heap = self.heap
        while heap and heap[0][1] <= first:
            heapq.heappop(heap)
        return bool(heap) and heap[0][0] < end


class PatchRules:
    """Rules 7-15 over the records and trailer of one patch, in stream order.

    target_blocks and base_blocks are the block counts of target_size and base_size at the
    patch's block size, base_pages and target_pages their counts of 4 KiB pages (spec
    section 7)."""

    def __init__(self, block_shift: int, base_size: int, target_size: int, full: bool = False,
                 window_log: int = 0):
        self.shift = block_shift
        self.window_log = window_log
        self.frame_open: str | None = None  # where the record that opened the open frame is
        self.target_size = target_size
        self.full = full
        self.target_blocks = blocks_for(target_size, block_shift)
        self.base_blocks = blocks_for(base_size, block_shift)
        self.pages = pages_per_block(1 << block_shift)
        self.base_pages = blocks_for(base_size, PAGE_SHIFT)
        self.target_pages = blocks_for(target_size, PAGE_SHIFT)
        self.max_data = data_record_max_blocks(block_shift)
        self.next_block = 0
        self.next_page = 0  # end of the last STAGE record's pages
        self.staging = True  # no record but STAGE so far
        # A copy must read a block no record changes, or the result would depend on the
        # order records are applied in and a resumed apply could read half-written data.
        self.changed = RangeSet()
        self.copied_from = CopySources()
        self.staged = RangeSet()  # base pages the STAGE records list

    def record_header(self, what: str, at: int, kind: int, flags: int, reserved: bytes, first: int,
                      count: int, payload_len: int, source: int) -> str:
        """Rules 7-13, on the fixed part alone, of the record named what (at byte at); returns
        how messages name it from then on."""
        self.rule_7_kind(f"{what} at byte {at}", kind)
        where = f"{what} ({REC_NAMES[kind]}) at byte {at}"
        self.rule_7_reserved(where, kind, flags, reserved)
        self.rule_8_order(where, kind, first)
        self.rule_9_count(where, kind, count)
        self.rule_10_range(where, kind, first, count)
        self.rule_11_payload(where, kind, flags, count, payload_len)
        self.rule_12_copy_source(where, kind, first, count, source)
        self.rule_13_copy_independence(where, kind, first, count, source)
        return where

    def rule_7_kind(self, where: str, kind: int) -> None:
        if kind not in REC_NAMES:
            raise FormatError(f"{where}: unknown record kind {kind}")

    def rule_7_reserved(self, where: str, kind: int, flags: int, reserved: bytes) -> None:
        known = KNOWN_DATA_FLAGS if kind == REC_DATA else 0
        if flags & ~known:
            raise FormatError(f"{where}: flags {flags:#04x} at byte 1 of the record has unknown bits set")
        if reserved != b"\0\0":
            raise FormatError(f"{where}: reserved bytes are not zero")

    def rule_8_order(self, where: str, kind: int, first: int) -> None:
        if kind == REC_STAGE:
            if self.full:
                raise FormatError(f"{where}: a full patch has no base to stage pages of")
            if not self.staging:
                raise FormatError(f"{where}: STAGE records must precede every other record")
            if first < self.next_page:
                raise FormatError(
                    f"{where}: stages from page {first}, before the end of the previous STAGE "
                    f"record (page {self.next_page}): pages overlap or are out of order"
                )
            return
        if first < self.next_block:
            raise FormatError(
                f"{where}: starts at block {first}, before the end of the previous record "
                f"(block {self.next_block}): records overlap or are out of order"
            )

    def rule_9_count(self, where: str, kind: int, count: int) -> None:
        limit = {REC_DATA: self.max_data, REC_STAGE: MAX_STAGE_PAGES}.get(kind, MAX_RECORD_BLOCKS)
        if count == 0 or count > limit:
            unit = "page" if kind == REC_STAGE else "block"
            raise FormatError(f"{where}: {unit} count {count} is outside 1..{limit}")

    def rule_10_range(self, where: str, kind: int, first: int, count: int) -> None:
        if kind == REC_STAGE:
            if first >= self.base_pages or count > self.base_pages - first:
                raise FormatError(
                    f"{where}: pages {first}..{first + count - 1} lie beyond the base "
                    f"({self.base_pages} pages)"
                )
            return
        total = self.target_blocks
        if first >= total or count > total - first:
            raise FormatError(
                f"{where}: blocks {first}..{first + count - 1} lie beyond the target "
                f"({total} blocks, {self.target_size} bytes)"
            )

    def rule_11_payload(self, where: str, kind: int, flags: int, count: int, payload_len: int) -> None:
        """On the header: a bound from the block count (the record's frame header included
        when it opens a frame). The exact bound, and the record's place in the frames of the
        literal stream, need the page kinds: rule_11_literal, after the meta."""
        if kind == REC_DATA:
            most = payload_limit(count * self.pages << PAGE_SHIFT, bool(flags & FRAME_START))
            if payload_len > most:
                raise FormatError(
                    f"{where}: payload length {payload_len} is outside 0..{most} for {count} "
                    "blocks of data"
                )
        elif payload_len:
            raise FormatError(f"{where}: payload length {payload_len}, expected 0")

    def rule_11_literal(self, where: str, rec: Record, payload_len: int) -> None:
        """The payload's length for the record's literal pages, and its place in the frames:
        a frame is opened only when none is open, and continued only while one is."""
        raw = rec.literal_pages << PAGE_SHIFT
        flags = rec.flags
        if raw == 0:
            if flags:
                raise FormatError(f"{where}: carries no literal but has frame flags {flags:#04x}")
            if payload_len:
                raise FormatError(f"{where}: payload length {payload_len}, expected 0: no page "
                                  "is literal")
            return
        start = bool(flags & FRAME_START)
        limit = payload_limit(raw, start)
        if payload_len == 0 or payload_len > limit:
            raise FormatError(
                f"{where}: payload length {payload_len} is outside 1..{limit} for {raw} bytes of "
                "literal pages"
            )
        if not self.window_log:
            raise FormatError(f"{where}: carries literal, but the patch header's window_log "
                              "(byte 14) is 0: no frame may be opened")
        if start and self.frame_open:
            raise FormatError(f"{where}: opens a frame while the frame opened by "
                              f"{self.frame_open} is not closed")
        if not start and not self.frame_open:
            raise FormatError(f"{where}: continues a frame, but no frame is open "
                              "(no FRAME_START before it)")

    def rule_12_copy_source(self, where: str, kind: int, first: int, count: int, source: int) -> None:
        if kind == REC_DATA:
            if source > count * self.pages:
                raise FormatError(
                    f"{where}: {source} moved pages, more than its {count * self.pages} pages"
                )
            return
        if kind != REC_COPY:
            if source:
                raise FormatError(f"{where}: source block {source}, expected 0")
            return
        # Sources must survive the final truncate, or a resumed apply would find them gone;
        # so they lie within both the base and the target.
        limit = min(self.base_blocks, self.target_blocks)
        if source > limit or count > limit - source:
            raise FormatError(
                f"{where}: copy source blocks {source}..{source + count - 1} lie beyond "
                f"the base or the target ({limit} blocks in both)"
            )
        if source < first + count and first < source + count:
            raise FormatError(f"{where}: copy source overlaps its own destination")

    def rule_13_copy_independence(self, where: str, kind: int, first: int, count: int,
                                  source: int) -> None:
        if kind == REC_STAGE:
            return
        if self.copied_from.meets(first, first + count):
            raise FormatError(f"{where}: changes a block an earlier copy record reads from")
        if kind == REC_COPY and self.changed.meets(source, source + count):
            raise FormatError(f"{where}: copies from a block an earlier record changes")

    def rule_14_meta(self, where: str, rec: Record) -> None:
        """After the record CRC: every block named must change, and into something other
        than zeros unless the record is ZERO; a STAGE record lists no zero page; a DATA
        record's page kinds and moved sources are what apply can assemble."""
        kind, first, count, meta = rec.kind, rec.first_block, rec.count, rec.meta
        if kind in (REC_ZERO, REC_STAGE):
            for b in range(count):
                if meta[b * HASH_LEN : (b + 1) * HASH_LEN] == ZERO_HASH:
                    if kind == REC_STAGE:
                        raise FormatError(f"{where}: page {first + b} has the zero hash: "
                                          "a zero page is never staged")
                    raise FormatError(f"{where}: block {first + b} is zeros in base and target")
            return
        for b in range(count):
            base, target = rec.base_hash(b), rec.target_hash(b)
            if target == ZERO_HASH:
                raise FormatError(f"{where}: block {first + b} has the zero hash as target")
            if base == target:
                raise FormatError(
                    f"{where}: block {first + b} has the same base and target hash: it does not change"
                )
        if kind == REC_DATA:
            self._rule_14_pages(where, rec)

    def _rule_14_pages(self, where: str, rec: Record) -> None:
        kinds = rec.kinds
        if kinds.translate(None, bytes(range(PAGE_MOVED + 1))):
            bad = next(i for i, k in enumerate(kinds) if k > PAGE_MOVED)
            raise FormatError(f"{where}: page {bad} of the record has unknown kind {kinds[bad]}")
        if kinds.count(PAGE_MOVED) != rec.moved_pages:
            raise FormatError(f"{where}: {kinds.count(PAGE_MOVED)} pages are moved, the header "
                              f"says {rec.moved_pages}")
        hashes = rec.page_hashes
        zero_at = hashes.find(ZERO_HASH)
        while zero_at >= 0:
            if zero_at % HASH_LEN == 0:
                raise FormatError(f"{where}: the hash of same or moved page {zero_at // HASH_LEN} "
                                  "of the record is the zero hash: a zero page is ZERO")
            zero_at = hashes.find(ZERO_HASH, (zero_at // HASH_LEN + 1) * HASH_LEN)
        first_page = rec.first_block * self.pages
        past = kinds[max(0, self.target_pages - first_page) :]
        if past.count(PAGE_ZERO) != len(past):
            raise FormatError(f"{where}: a page past the target's end is not a zero page")
        # A SAME page is the base's page at its own offset, equal in the target: past the
        # base's end the base holds zeros there, and a zero page is ZERO, never SAME.
        skip = max(0, self.base_pages - first_page)
        if PAGE_SAME in kinds[skip:]:
            at = first_page + kinds.index(PAGE_SAME, skip)
            raise FormatError(f"{where}: same page {at} (byte {at << PAGE_SHIFT}) lies beyond the "
                              f"base ({self.base_pages} pages), where the base holds zeros")
        sources = rec.sources
        if not sources:
            return
        if max(sources) >= self.base_pages:
            raise FormatError(f"{where}: moved source page {max(sources)} lies beyond the base "
                              f"({self.base_pages} pages)")
        ps = PAGE_SHIFT
        lo, hi = rec.first_block, rec.first_block + rec.count
        for s in sources:
            if self.staged.meets(s, s + 1):
                continue
            block = s >> (self.shift - ps)
            if lo <= block < hi or self.changed.meets(block, block + 1):
                # Apply reads such a page in place: it must still be the base's when read.
                raise FormatError(
                    f"{where}: moved source page {s} (byte {s << ps}) lies in block {block}, "
                    "which this or an earlier record changes, and is not staged"
                )

    def accept(self, rec: Record, where: str = "") -> None:
        """Record a record that passed rules 7-14 as state for the next ones."""
        kind, first, count = rec.kind, rec.first_block, rec.count
        if rec.flags & FRAME_START:
            self.frame_open = where or f"the record at block {first}"
        if rec.flags & FRAME_END:
            self.frame_open = None
        if kind == REC_STAGE:
            self.staged.add(first, first + count)
            self.next_page = first + count
            return
        self.staging = False
        if kind == REC_COPY:
            self.copied_from.add(rec.source_block, rec.source_block + count)
        self.changed.add(first, first + count)
        self.next_block = first + count

    def rule_15_frames_closed(self, where: str) -> None:
        if self.frame_open:
            raise FormatError(f"{where}: the frame opened by {self.frame_open} is not closed "
                              "(no FRAME_END before the trailer)")

    @staticmethod
    def rule_15_trailer(where: str, reserved: bytes, found: tuple[int, ...],
                        counted: tuple[int, ...], fields: tuple[str, ...]) -> None:
        """After the trailer CRC and Tag; end of input is checked last, by the reader."""
        if reserved != b"\0\0\0":
            raise FormatError(f"{where}: reserved bytes are not zero")
        if found != counted:
            wrong = ", ".join(
                f"{f}={a} (the records give {b})"
                for f, a, b in zip(fields, found, counted, strict=True)
                if a != b
            )
            raise FormatError(f"{where}: counts disagree with the records read: {wrong}")
