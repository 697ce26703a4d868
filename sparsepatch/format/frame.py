"""DATA payloads (spec section 5.2 and section 7 rule 16): the one zstd frame a DATA record
carries, checked byte by byte before it is decompressed, and the decoded blocks checked
against their target hashes."""

from __future__ import annotations

from ..errors import ChecksumMismatch, FormatError, Truncated
from .base import hash_block
from .patch import PatchHeader, Record, raw_length

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

    raw = raw_length(header, rec.first_block, rec.count)
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


def decode_data(header: PatchHeader, rec: Record) -> bytes:
    """A DATA record's target bytes, each block checked against its target hash."""
    data = decode_payload(header, rec)
    shift = header.block_shift
    bs = 1 << shift
    view = memoryview(data)
    for b in range(rec.count):
        if hash_block(view[b << shift : (b + 1) << shift], bs) != rec.target_hash(b):
            raise ChecksumMismatch(
                f"{rec.where()}: block {rec.first_block + b} does not match its target hash "
                "after decompression"
            )
    return data
