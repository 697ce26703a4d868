"""The codec of moved content (spec 5.2 STAGE records and DATA page kinds, rules 8-14): hand-built
patches with every CRC right and one thing wrong, each refused with a message naming it."""

from __future__ import annotations

import dataclasses
import io

import pytest
import zstandard

from sparsepatch.errors import ChecksumMismatch, FormatError
from sparsepatch.format import (
    FLAG_FULL,
    FRAME_END,
    FRAME_START,
    PAGE_LITERAL,
    PAGE_MOVED,
    PAGE_SAME,
    PAGE_SIZE,
    PAGE_ZERO,
    REC_DATA,
    REC_NAMES,
    REC_STAGE,
    REC_ZERO,
    ZERO_HASH,
    FrameDecoder,
    PatchHeader,
    PatchReader,
    PatchTrailer,
    Record,
    data_meta,
    decode_data,
    encode_patch_header,
    encode_patch_trailer,
    encode_record,
    page_hash,
    raw_length,
    tree_hash,
)

SHIFT = 14  # 16 KiB blocks: 4 pages each
P = 4
BLOCKS = 8
SIZE = BLOCKS << SHIFT
H = PatchHeader(0, SHIFT, SIZE, SIZE, b"\1" * 32, b"\2" * 32, window_log=20)


def hsh(n: int) -> bytes:
    return bytes([n]) * 16


def stage(first: int, count: int, hashes: bytes | None = None) -> Record:
    return Record(REC_STAGE, first, count, hashes if hashes is not None else hsh(9) * count, pages=P)


def data(first: int, kinds: list[bytes], sources: tuple[int, ...] | list[int] = (),
         literal: bytes | None = None,
         payload: bytes | None = None) -> Record:
    hashed = sum(k.count(PAGE_SAME) + k.count(PAGE_MOVED) for k in kinds)
    meta = data_meta([(hsh(3), hsh(4 + b), k) for b, k in enumerate(kinds)], list(sources),
                     hsh(8) * hashed)
    lit = sum(k.count(PAGE_LITERAL) for k in kinds)
    if payload is None:
        raw = literal if literal is not None else b"\x55" * (lit * PAGE_SIZE)
        z = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)
        payload = z.compress(raw) if raw else b""
    # Each record a frame of its own (FRAME_START | FRAME_END), as an undo writes them.
    flags = FRAME_START | FRAME_END if payload else 0
    return Record(REC_DATA, first, len(kinds), meta, len(sources), payload, flags=flags, pages=P)


def zero(first: int) -> Record:
    return Record(REC_ZERO, first, 1, hsh(3), pages=P)


def patch(records: list[Record], header: PatchHeader = H) -> bytes:
    body = encode_patch_header(header) + b"".join(encode_record(r) for r in records)
    counts = {k: sum(r.count for r in records if r.kind == k) for k in REC_NAMES}
    t = PatchTrailer(len(records), counts[REC_DATA], counts[REC_ZERO], 0,
                     sum(len(r.payload) for r in records), len(body))
    return body + encode_patch_trailer(t)


def read(blob: bytes) -> list[Record]:
    return list(PatchReader(io.BytesIO(blob).read).records())


LIT = bytes([PAGE_LITERAL] * P)
MOVED1 = bytes([PAGE_MOVED, PAGE_LITERAL, PAGE_SAME, PAGE_ZERO])


def test_a_patch_with_stage_and_moved_pages_reads_back() -> None:
    recs = read(patch([stage(0, 2), stage(5, 1), data(0, [MOVED1, LIT], [1]), data(3, [MOVED1], [30])]))
    assert [r.kind for r in recs] == [REC_STAGE, REC_STAGE, REC_DATA, REC_DATA]
    d = recs[2]
    assert d.moved_pages == 1 and list(d.sources) == [1]
    assert d.page_kinds(0) == MOVED1 and d.page_kinds(1) == LIT
    assert raw_length(H, d) == 5 * PAGE_SIZE  # literal pages only
    assert recs[0].meta == hsh(9) * 2


@pytest.mark.parametrize("records, fragment", [
    ([data(0, [LIT]), stage(0, 1)], "STAGE records must precede every other record"),
    ([stage(4, 2), stage(5, 1)], "before the end of the previous STAGE record (page 6)"),
    ([stage(4, 2), stage(1, 1)], "before the end of the previous STAGE record"),
    ([stage(30, 3)], "pages 30..32 lie beyond the base (32 pages)"),
    ([stage(0, 2, hsh(9) + ZERO_HASH)], "page 1 has the zero hash"),
    ([data(0, [bytes([PAGE_LITERAL, 7, 0, 0])])], "has unknown kind 7"),
    ([data(1, [MOVED1], [32])], "moved source page 32 lies beyond the base (32 pages)"),
    # Read in place from a block this record or an earlier one changes, and not staged.
    ([data(1, [MOVED1], [5])], "moved source page 5 (byte 20480) lies in block 1"),
    ([zero(0), data(1, [MOVED1], [2])], "lies in block 0, which this or an earlier record changes"),
    ([stage(2, 1), zero(0), data(1, [MOVED1], [3])], "moved source page 3"),
])
def test_hostile_stage_and_moves_are_refused(records: list[Record], fragment: str) -> None:
    with pytest.raises(FormatError) as e:
        read(patch(records))
    assert fragment in str(e.value), str(e.value)


def test_staged_and_forward_sources_are_accepted() -> None:
    # Staged: read from the scratch. Forward: block 5 is changed only after block 1 is written.
    read(patch([stage(2, 1), zero(0), data(1, [MOVED1], [2])]))
    read(patch([data(1, [MOVED1], [21]), zero(5)]))


def test_moved_count_must_match_the_header() -> None:
    rec = data(1, [MOVED1], [3])
    with pytest.raises(FormatError, match="1 pages are moved, the header says 0"):
        read(patch([Record(REC_DATA, 1, 1, rec.meta[:-8], 0, rec.payload, flags=rec.flags, pages=P)]))
    with pytest.raises(FormatError, match="5 moved pages, more than its 4 pages"):
        read(patch([Record(REC_DATA, 1, 1, rec.meta + bytes(32), 5, rec.payload, flags=rec.flags,
                           pages=P)]))


def test_pages_past_the_target_are_zero_pages() -> None:
    short = PatchHeader(0, SHIFT, SIZE, SIZE - 3 * PAGE_SIZE, b"\1" * 32, b"\2" * 32, window_log=20)
    ok = bytes([PAGE_LITERAL, PAGE_ZERO, PAGE_ZERO, PAGE_ZERO])
    read(patch([data(7, [ok])], short))
    with pytest.raises(FormatError, match="a page past the target's end is not a zero page"):
        read(patch([data(7, [bytes([PAGE_LITERAL, PAGE_ZERO, PAGE_SAME, PAGE_ZERO])])], short))


def test_same_pages_past_the_base_are_refused() -> None:
    """A SAME page is the base's page at its own offset: past the base's end the base holds
    zeros there, so the patch is malformed (exit 4), not a wrong base."""
    grown = PatchHeader(0, SHIFT, SIZE - 2 * PAGE_SIZE, SIZE, b"\1" * 32, b"\2" * 32, window_log=20)
    read(patch([data(7, [bytes([PAGE_SAME, PAGE_SAME, PAGE_LITERAL, PAGE_LITERAL])])], grown))
    with pytest.raises(FormatError, match=r"same page 30 \(byte 122880\) lies beyond the base \(30 pages\)"):
        read(patch([data(7, [bytes([PAGE_SAME, PAGE_LITERAL, PAGE_SAME, PAGE_LITERAL])])], grown))


def test_payload_only_for_literal_pages() -> None:
    no_literal = bytes([PAGE_ZERO, PAGE_SAME, PAGE_MOVED, PAGE_ZERO])
    read(patch([data(1, [no_literal], [30])]))
    with pytest.raises(FormatError, match="payload length 30, expected 0: no page is literal"):
        read(patch([dataclasses.replace(data(1, [no_literal], [30]), payload=b"\0" * 30)]))
    with pytest.raises(FormatError, match="payload length 0 is outside 1.."):
        read(patch([data(1, [LIT], payload=b"")]))


def test_no_stage_in_a_full_patch() -> None:
    full = PatchHeader(FLAG_FULL, SHIFT, 0, SIZE, b"\1" * 32, b"\2" * 32, window_log=20)
    with pytest.raises(FormatError, match="a full patch has no base to stage pages of"):
        read(patch([stage(0, 1)], full))


def test_same_and_moved_pages_carry_their_page_hashes() -> None:
    rec = read(patch([data(1, [MOVED1, LIT], [30])]))[0]
    assert rec.page_hashes == hsh(8) * 2  # one MOVED, one SAME page, in page order
    assert list(rec.sources) == [30]
    zeroed = dataclasses.replace(rec, meta=rec.meta[: -32] + ZERO_HASH + hsh(8))
    with pytest.raises(FormatError, match="same or moved page 0 of the record is the zero hash"):
        read(patch([zeroed]))


def test_verify_checks_a_block_with_same_pages_from_the_patch_alone() -> None:
    # Block: a literal page, a page the base keeps (SAME), two zero pages.
    kinds = bytes([PAGE_LITERAL, PAGE_SAME, PAGE_ZERO, PAGE_ZERO])
    lit, same = b"\x55" * PAGE_SIZE, b"\x66" * PAGE_SIZE
    pages = page_hash(lit) + page_hash(same) + ZERO_HASH * 2

    def record(carried: bytes) -> Record:
        meta = data_meta([(hsh(3), tree_hash(pages), kinds)], [], carried)
        payload = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(lit)
        return Record(REC_DATA, 1, 1, meta, 0, payload, flags=FRAME_START | FRAME_END, pages=P)

    good = read(patch([record(page_hash(same))]))[0]
    assert decode_data(FrameDecoder(H), good) == lit
    bad = read(patch([record(page_hash(b"\x67" * PAGE_SIZE))]))[0]
    with pytest.raises(ChecksumMismatch, match="block 1 does not match its target hash"):
        decode_data(FrameDecoder(H), bad)
