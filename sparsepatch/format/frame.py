"""The literal stream (spec section 5.2 and section 7 rule 16): DATA payloads form zstd frames
across records. FrameDecoder follows one pass over a patch's records, checks every frame
piece byte by byte (frame header, block headers, checksum) and decodes it one zstd block at
a time, so that no record can make it hold more than the window and one record's bytes. The
decoded bytes are a DATA record's LITERAL pages: assemble() builds its target blocks from
them and its other pages (zero, same, moved), which are then checked against their target
hashes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ChecksumMismatch, FormatError
from .base import (
    FRAME_END,
    FRAME_START,
    HASH_LEN,
    MAX_FRAME_RAW,
    PAGE_LITERAL,
    PAGE_MOVED,
    PAGE_SAME,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGE_ZERO,
    REC_DATA,
    ZERO_HASH,
    ZSTD_BLOCK_MAX,
    page_hash,
    tree_hash,
)
from .patch import PatchHeader, Record, raw_length

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_RAW, _RLE, _COMPRESSED, _RESERVED = 0, 1, 2, 3


def _is_skippable(p: bytes) -> bool:
    # RFC 8878 3.1.2: magic 0x184D2A50..0x184D2A5F
    return len(p) >= 4 and p[1:4] == b"\x2a\x4d\x18" and p[0] & 0xF0 == 0x50


def _corrupt(e: Exception, where: str) -> FormatError | ChecksumMismatch:
    # libzstd names a failed content checksum "Restored data doesn't match checksum".
    if "checksum" in str(e):
        return ChecksumMismatch(f"{where}: the frame's zstd content checksum does not match its "
                                f"decompressed bytes ({e})")
    return FormatError(f"{where}: corrupt zstd data ({e})")


class FrameDecoder:
    """The literal stream of one reading of a patch: give it every DATA record in stream
    order (a new decoder for each reading: the dry run and the write pass decode from the
    start). One zstd decompressor per frame, its window limited to 2^window_log.

    What the record header says about frames (opened in order, closed before the trailer)
    is checked by the reader (rules 7, 11, 15); the payload bytes are checked here."""

    def __init__(self, header: PatchHeader):
        self.h = header
        self.dobj: Any = None  # the open frame's decompressor (a zstandard decompressobj)
        self.declared = 0  # the open frame's content size
        self.seen = 0  # raw bytes of the open frame decoded so far
        self.opened = ""  # the record that opened it, for messages

    def decode(self, rec: Record) -> bytes:
        """The record's literal bytes: exactly raw_length of them, or FormatError /
        ChecksumMismatch naming the record and the byte. (A payload that does not end at a
        block boundary is corrupt, not truncated: the reader read all payload_len bytes.)"""
        raw = raw_length(self.h, rec)
        # Records come from PatchReader, whose rule 11 (rules.rule_11_literal) refused flags
        # or a payload without literal, and a frame opened or continued out of turn.
        if raw == 0:
            assert not rec.payload and not rec.flags
            return b""
        p = rec.payload
        where = rec.where()
        pos = 0
        if rec.flags & FRAME_START:
            assert self.dobj is None
            pos = self._open(rec)
        else:
            assert self.dobj is not None
        end = bool(rec.flags & FRAME_END)
        out: list[bytes] = []
        got = 0
        base = rec.payload_offset
        while True:
            if pos == len(p) and not end:
                break
            at = base + pos
            if pos + 3 > len(p):
                raise FormatError(f"{where}: payload ends inside a zstd block header at byte {at}")
            head = int.from_bytes(p[pos : pos + 3], "little")
            last, kind, size = head & 1, (head >> 1) & 3, head >> 3
            if kind == _RESERVED:
                raise FormatError(f"{where}: zstd block at byte {at} has the reserved block type")
            if size > ZSTD_BLOCK_MAX:
                raise FormatError(f"{where}: zstd block at byte {at} is {size} bytes, more than "
                                  f"{ZSTD_BLOCK_MAX}")
            stop = pos + 3 + (1 if kind == _RLE else size)
            if stop > len(p):
                raise FormatError(f"{where}: payload ends inside the zstd block at byte {at}")
            if last and not end:
                raise FormatError(f"{where}: zstd block at byte {at} is the frame's last, but the "
                                  "record does not close the frame (no FRAME_END)")
            # Raw and RLE blocks say what they decode to: refuse a bomb before decoding it.
            if kind != _COMPRESSED and got + size > raw:
                raise FormatError(f"{where}: zstd block at byte {at} decodes past the record's "
                                  f"{raw} bytes of literal")
            if last:
                stop += 4  # the content checksum (its flag is required)
                if stop != len(p):
                    raise FormatError(
                        f"{where}: the frame's last block and checksum end at byte {base + stop}, "
                        f"the payload at byte {base + len(p)}"
                    )
            piece = self._feed(p[pos:stop], where, at)
            got += len(piece)
            if got > raw:
                raise FormatError(f"{where}: zstd block at byte {at} decodes past the record's "
                                  f"{raw} bytes of literal")
            out.append(piece)
            pos = stop
            if last:
                break
        if got != raw:
            raise FormatError(f"{where}: payload decodes to {got} bytes, the record carries {raw}")
        self.seen += raw
        if self.seen > self.declared:
            raise FormatError(f"{where}: the frame opened by {self.opened} declares "
                              f"{self.declared} bytes, its records carry more")
        if end:
            if self.seen != self.declared:
                raise FormatError(f"{where}: the frame opened by {self.opened} declares "
                                  f"{self.declared} bytes, its records carry {self.seen}")
            dobj: Any = self.dobj
            if not dobj.eof:
                raise FormatError(f"{where}: the frame does not end where its last block says")
            self.dobj = None
        return out[0] if len(out) == 1 else b"".join(out)

    def _open(self, rec: Record) -> int:
        """Check the frame header at the start of rec's payload and make its decompressor;
        returns the header's length."""
        import zstandard  # imported where used: a signature never needs it

        p = rec.payload
        where = rec.where()
        at = rec.payload_offset
        if p[:4] != ZSTD_MAGIC:
            if _is_skippable(p):
                raise FormatError(f"{where}: payload at byte {at} is a skippable frame, not a zstd "
                                  "data frame")
            raise FormatError(f"{where}: payload at byte {at} is not a zstd frame "
                              f"(magic {p[:4].hex()})")
        try:
            declared = zstandard.frame_content_size(p)
            params = zstandard.get_frame_parameters(p)
            size = zstandard.frame_header_size(p)
        except zstandard.ZstdError as e:
            raise FormatError(f"{where}: payload at byte {at} is not a zstd frame header ({e})") from None
        if declared < 0:
            raise FormatError(f"{where}: frame header at byte {at} has no content size")
        if declared > MAX_FRAME_RAW:
            raise FormatError(f"{where}: frame header at byte {at} declares {declared} bytes, "
                              f"more than a frame may hold ({MAX_FRAME_RAW})")
        raw = raw_length(self.h, rec)
        if declared < raw or rec.flags & FRAME_END and declared != raw:
            raise FormatError(f"{where}: frame header at byte {at} declares {declared} bytes, "
                              f"the record alone carries {raw}")
        if params.dict_id:
            raise FormatError(f"{where}: frame header at byte {at} names dictionary "
                              f"{params.dict_id}; none is allowed")
        window = 1 << self.h.window_log
        if params.window_size > window:
            raise FormatError(
                f"{where}: frame header at byte {at} asks for a window of {params.window_size} "
                f"bytes, more than the patch header's 2^{self.h.window_log}"
            )
        if not params.has_checksum:
            raise FormatError(f"{where}: frame header at byte {at} has no content checksum")
        dctx = zstandard.ZstdDecompressor(max_window_size=window)
        self.dobj = dctx.decompressobj(write_size=ZSTD_BLOCK_MAX)
        self.declared, self.seen, self.opened = declared, 0, where
        try:
            self.dobj.decompress(p[:size])  # the header alone gives no output
        except zstandard.ZstdError as e:
            raise _corrupt(e, f"{where}, frame header at byte {at}") from None
        return size

    def _feed(self, block: bytes, where: str, at: int) -> bytes:
        import zstandard

        try:
            out: bytes = self.dobj.decompress(block)
        except zstandard.ZstdError as e:
            raise _corrupt(e, f"{where}, zstd block at byte {at}") from None
        return out


PageSource = Callable[[int, int, bytes], bytes | bytearray | memoryview]


def assemble(header: PatchHeader, rec: Record, literal: bytes | memoryview,
             fetch: PageSource | None, want: Callable[[int], bool] | None = None
             ) -> Iterator[tuple[int, bytearray | None]]:
    """A DATA record's target blocks from its pages, in order: (k, block k's bytes, a whole
    block). fetch(kind, page, hash) gives a PAGE_SAME page (page: its number in the target)
    or a PAGE_MOVED one (page: its source in the base); hash is the page hash the record
    carries for it. Blocks for which want(k) is false, or that need fetch when it is None,
    are (k, None): skipped, not read."""
    lit = memoryview(literal)
    hashes = rec.page_hashes
    pos = 0
    moved = 0
    hashed = 0
    sources = rec.sources
    per = rec.pages
    for k in range(rec.count):
        kinds = rec.page_kinds(k)
        literal_here = kinds.count(PAGE_LITERAL)
        moved_here = kinds.count(PAGE_MOVED)
        needs_fetch = literal_here + kinds.count(PAGE_ZERO) != per
        if (want is not None and not want(k)) or (fetch is None and needs_fetch):
            pos += literal_here << PAGE_SHIFT
            moved += moved_here
            hashed += moved_here + kinds.count(PAGE_SAME)
            yield k, None
            continue
        block = bytearray(per << PAGE_SHIFT)
        page0 = (rec.first_block + k) * per
        for p, kind in enumerate(kinds):
            at = p << PAGE_SHIFT
            if kind == PAGE_LITERAL:
                block[at : at + PAGE_SIZE] = lit[pos : pos + PAGE_SIZE]
                pos += PAGE_SIZE
            elif kind == PAGE_ZERO:
                continue
            else:
                assert fetch is not None
                h = hashes[hashed * HASH_LEN : (hashed + 1) * HASH_LEN]
                hashed += 1
                if kind == PAGE_SAME:
                    page = fetch(PAGE_SAME, page0 + p, h)
                else:
                    page = fetch(PAGE_MOVED, sources[moved], h)
                    moved += 1
                block[at : at + PAGE_SIZE] = page
        yield k, block


def page_hash_list(rec: Record, literal: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
    """(k, the page hashes of DATA block k), from the record alone: its literal pages
    hashed, ZERO_HASH for zero pages, and the hashes it carries for SAME and MOVED pages."""
    lit = memoryview(literal)
    hashes = rec.page_hashes
    pos = hashed = 0
    for k in range(rec.count):
        out = []
        for kind in rec.page_kinds(k):
            if kind == PAGE_LITERAL:
                out.append(page_hash(lit[pos : pos + PAGE_SIZE]))
                pos += PAGE_SIZE
            elif kind == PAGE_ZERO:
                out.append(ZERO_HASH)
            else:
                out.append(hashes[hashed * HASH_LEN : (hashed + 1) * HASH_LEN])
                hashed += 1
        yield k, b"".join(out)


def checked_page_hashes(rec: Record, literal: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
    """page_hash_list, each block's tree hash checked against its target hash first (rule
    16 without a destination: verify, merge)."""
    for k, pages in page_hash_list(rec, literal):
        if tree_hash(pages) != rec.target_hash(k):
            raise ChecksumMismatch(
                f"{rec.where()}: block {rec.first_block + k} does not match its target hash "
                "after decompression"
            )
        yield k, pages


def decode_data(decoder: FrameDecoder, rec: Record) -> bytes:
    """A DATA record's literal bytes, decoded, and every block checked against its target
    hash: the tree hash of its page hashes, from its literal and the hashes the record
    carries for its SAME and MOVED pages (apply checks those pages against them)."""
    assert rec.kind == REC_DATA
    data = decoder.decode(rec)
    for _ in checked_page_hashes(rec, data):
        pass
    bs, size = decoder.h.block_size, decoder.h.target_size
    last = (size - 1) // bs if size else -1
    if rec.first_block <= last < rec.first_block + rec.count and size % bs:
        k = last - rec.first_block
        block = dict(assemble(decoder.h, rec, data, None, want=lambda j: j == k)).get(k)
        if block is not None:
            rule_16_clipped_tail(decoder.h, rec, k, block)
    return data


def rule_16_clipped_tail(header: PatchHeader, rec: Record, k: int, block: bytes | bytearray) -> None:
    """Block k of rec, whole: a target hash is that of the zero-padded block, and the
    partial last block is written clipped at target_size, so bytes past it that are not
    zeros could never read back as the target (a patch that would fail every rerun)."""
    end = header.target_size - ((rec.first_block + k) << header.block_shift)
    if end < len(block) and block.count(0, end) != len(block) - end:
        raise FormatError(
            f"{rec.where()}: block {rec.first_block + k} holds non-zero bytes past the "
            f"target's end (byte {header.target_size}), where its target hash says zeros"
        )
