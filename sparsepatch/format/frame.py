"""DATA payloads (spec section 5.2 and section 7 rule 16): the one zstd frame a DATA record
carries, checked byte by byte before it is decompressed; and the target blocks assembled from
its pages (literal, zero, same, moved) and checked against their target hashes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..errors import ChecksumMismatch, FormatError, Truncated
from .base import PAGE_LITERAL, PAGE_MOVED, PAGE_SAME, PAGE_SHIFT, PAGE_SIZE, PAGE_ZERO, hash_block
from .patch import PatchHeader, Record, raw_length

ZERO_PAGE = bytes(PAGE_SIZE)

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_WINDOW = 1 << 24  # the largest block: no record needs a larger window to decode


def _is_skippable(p: bytes) -> bool:
    # RFC 8878 3.1.2: magic 0x184D2A50..0x184D2A5F
    return len(p) >= 4 and p[1:4] == b"\x2a\x4d\x18" and p[0] & 0xF0 == 0x50


def rule_16_frame(rec: Record, raw: int) -> None:
    """The payload is exactly one zstd frame that decodes to raw bytes and carries a content
    checksum: its header fields are checked and its block headers walked (RFC 8878,
    3.1.1.2) so no byte of the payload goes unchecked and output is bounded before any
    decoding."""
    import zstandard  # imported where used: a signature never needs it

    p = rec.payload
    where = rec.where()
    if p[:4] != ZSTD_MAGIC:
        if _is_skippable(p):
            raise FormatError(f"{where}: payload is a skippable frame, not a zstd data frame")
        raise FormatError(f"{where}: payload is not a zstd frame (magic {p[:4].hex()})")
    try:
        declared = zstandard.frame_content_size(p)
        params = zstandard.get_frame_parameters(p)
        pos = zstandard.frame_header_size(p)
    except zstandard.ZstdError as e:
        raise FormatError(f"{where}: payload is not a zstd frame ({e})") from None
    if declared != raw:
        raise FormatError(f"{where}: payload declares {declared} bytes, record covers {raw}")
    if params.dict_id:
        raise FormatError(f"{where}: payload frame names dictionary {params.dict_id}; none is allowed")
    if params.window_size > MAX_WINDOW:
        raise FormatError(
            f"{where}: payload frame window is {params.window_size} bytes, more than {MAX_WINDOW}"
        )
    if not params.has_checksum:
        raise FormatError(f"{where}: payload frame has no content checksum")
    while True:
        if pos + 3 > len(p):
            raise Truncated(f"{where}: payload frame ends inside a block header")
        head = int.from_bytes(p[pos : pos + 3], "little")
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        if kind == 3:
            raise FormatError(f"{where}: payload frame has a reserved block type")
        pos += 3 + (1 if kind == 1 else size)
        if last:
            break
    pos += 4  # content checksum
    if pos != len(p):
        raise FormatError(f"{where}: payload frame is {pos} bytes, the record says {len(p)}")


def decode_payload(header: PatchHeader, rec: Record) -> bytes:
    """Decompress a DATA record's payload after rule 16, refusing any frame whose declared
    size is not exactly the record's length, so output is bounded by the record."""
    import zstandard

    raw = raw_length(header, rec)
    if not raw:
        return b""  # no literal page: no payload (rule 11)
    rule_16_frame(rec, raw)
    try:
        out = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompress(
            rec.payload, max_output_size=raw)
    except zstandard.ZstdError as e:
        # libzstd names a failed content checksum "Restored data doesn't match checksum".
        if "checksum" in str(e):
            raise ChecksumMismatch(
                f"{rec.where()}: payload's zstd content checksum does not match its "
                f"decompressed bytes ({e})"
            ) from None
        raise FormatError(f"{rec.where()}: payload is a corrupt zstd frame ({e})") from None
    if len(out) != raw:
        raise FormatError(f"{rec.where()}: payload gave {len(out)} bytes, expected {raw}")
    return out


PageSource = Callable[[int, int], bytes | bytearray | memoryview]


def assemble(header: PatchHeader, rec: Record, literal: bytes | memoryview,
             fetch: PageSource | None, want: Callable[[int], bool] | None = None
             ) -> Iterator[tuple[int, bytearray | None]]:
    """A DATA record's target blocks from its pages, in order: (k, block k's bytes, a whole
    block). fetch(kind, page) gives a PAGE_SAME page (page: its number in the target) or a
    PAGE_MOVED one (page: its source in the base). Blocks for which want(k) is false, or
    that need fetch when it is None, are (k, None): skipped, not read."""
    lit = memoryview(literal)
    pos = 0
    moved = 0
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
                if kind == PAGE_SAME:
                    page = fetch(PAGE_SAME, page0 + p)
                else:
                    page = fetch(PAGE_MOVED, sources[moved])
                    moved += 1
                block[at : at + PAGE_SIZE] = page
        yield k, block


def decode_data(header: PatchHeader, rec: Record) -> bytes:
    """A DATA record's literal bytes, decompressed, and every block made of literal and
    zero pages alone checked against its target hash (a block with same or moved pages
    needs the base: apply checks it)."""
    data = decode_payload(header, rec)
    bs = header.block_size
    for k, block in assemble(header, rec, data, None):
        if block is not None and hash_block(block, bs) != rec.target_hash(k):
            raise ChecksumMismatch(
                f"{rec.where()}: block {rec.first_block + k} does not match its target hash "
                "after decompression"
            )
    return data
