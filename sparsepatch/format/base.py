"""What every structure of the format shares: constants, Struct layouts, CRC-32C, the block
hash, magic and version checks, and a reader that names what a short read was reading."""

from __future__ import annotations

import struct
from collections.abc import Callable

import blake3
import crcmod.predefined

from ..errors import BadMagic, ChecksumMismatch, FormatError, Truncated, UsageError

VERSION = 2  # of the signature, the patch and the journal alike
SIG_MAGIC = b"\x89SPSIG\r\n"
PATCH_MAGIC = b"\x89SPPAT\r\n"
JOURNAL_MAGIC = b"\x89SPJNL\r\n"

HASH_LEN = 16
ZERO_HASH = bytes(HASH_LEN)  # the hash of a hole or an all-zero page or block, by definition
MIN_SHIFT = 12  # 4 KiB
MAX_SHIFT = 24  # 16 MiB
PAGE_SHIFT = 12  # the unit of page hashes, whatever the block size
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_FILE_SIZE = 1 << 60  # 1 EiB: refuse absurd sizes before doing arithmetic with them

MAX_SIG_DATA_RUN = 4096  # page hashes per signature DATA run (64 KiB of hashes)
MAX_SIG_HOLE_RUN = 0xFFFFFFFF
MAX_RECORD_DATA = 8 << 20  # uncompressed bytes a DATA record may cover (or one block if larger)
MAX_RECORD_BLOCKS = 32768  # blocks a ZERO or COPY record may cover
MAX_STAGE_PAGES = 16384  # pages a STAGE record may list (256 KiB of hashes)

SIG_HOLE, SIG_DATA, SIG_END = 1, 2, 0xFF
REC_DATA, REC_ZERO, REC_COPY, REC_STAGE, REC_END = 1, 2, 3, 4, 0xFF
REC_NAMES = {REC_DATA: "data", REC_ZERO: "zero", REC_COPY: "copy", REC_STAGE: "stage"}
# Page kinds of a DATA block (spec 5.2): where each 4 KiB page of the target block comes from.
PAGE_LITERAL, PAGE_ZERO, PAGE_SAME, PAGE_MOVED = 0, 1, 2, 3

FLAG_FULL = 0x0001  # made without a signature: the base is the empty file
FLAG_MAC = 0x0002  # every element is followed by a keyed BLAKE3 tag chained over the patch
KNOWN_PATCH_FLAGS = FLAG_FULL | FLAG_MAC
MAC_LEN = 32
MAC_CONTEXT = "sparsepatch 2026-11-26 patch MAC key v1"
MIN_KEY_FILE = 16
COMP_ZSTD = 1

# The literal stream (spec section 5.2): DATA payloads form zstd frames across records.
FRAME_START = 0x01  # DATA record flags: the record opens a frame
FRAME_END = 0x02  # the record closes its frame
KNOWN_DATA_FLAGS = FRAME_START | FRAME_END
MIN_WINDOW_LOG = 10  # zstd's smallest window
MAX_WINDOW_LOG = 27  # 128 MiB: the decoder memory a reader agrees to spend
MAX_FRAME_RAW = 1 << 30  # raw literal bytes in one frame
MAX_FRAME_HEADER = 18  # zstd frame header: magic 4, descriptor 1, window 1, dictionary 4, size 8
ZSTD_BLOCK_MAX = 128 << 10  # RFC 8878 Block_Maximum_Size: the most one block decodes to

# Struct constants are named after the records in spec/FORMAT.md; the CRC is not in the struct.
SIG_HEADER = struct.Struct("<8sHHBBBBQ")  # magic version flags block_shift hash_len page_shift
#                                           reserved file_size
SIG_RUN = struct.Struct("<B3xQI")  # kind first_block count
SIG_TRAILER = struct.Struct("<B3xQQQ32s")  # kind block_count data_blocks mtime_ns identity
PATCH_HEADER = struct.Struct("<8sHHBBBBQQQ32s32s")  # ... window_log reserved base_size target_size mtime ids
RECORD = struct.Struct("<BB2xQIIQ")  # kind flags first_block count payload_len source_block/moved_pages
PATCH_TRAILER = struct.Struct("<B3xQQQQQQ")  # kind records data zero copy payload_bytes body_bytes
JOURNAL_SLOT = struct.Struct("<8sHHI32s32sQQQ")  # ... seq base target start end scratch_pages
CRC = struct.Struct("<I")
JOURNAL_SLOT_SIZE = 128

_crc32c = crcmod.predefined.mkPredefinedCrcFun("crc-32c")


def crc32c(data: bytes | memoryview, crc: int = 0) -> int:
    return int(_crc32c(data, crc))


ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_HASHES = bytes(HASH_LEN << (MAX_SHIFT - PAGE_SHIFT))  # a 16 MiB block's page hashes


def sig_run_limit(block_shift: int) -> int:
    """Blocks a signature DATA run may hold: at most MAX_SIG_DATA_RUN page hashes, and one
    block whatever its size."""
    return max(1, MAX_SIG_DATA_RUN >> (block_shift - PAGE_SHIFT))


def hash_pages(block: bytes | bytearray | memoryview, block_size: int) -> bytes:
    """The page hashes of spec section 1, block_size // PAGE_SIZE of them: block (at most
    block_size bytes; a short last block of a file) is padded with zeros to block_size,
    and a page of zeros is ZERO_HASH."""
    view = memoryview(block)
    zero, hasher = ZERO_PAGE, blake3.blake3
    out = []
    for pos in range(0, block_size, PAGE_SIZE):
        page = view[pos : pos + PAGE_SIZE]
        if zero.startswith(page):  # also a page wholly or partly past the end
            out.append(ZERO_HASH)
        elif len(page) < PAGE_SIZE:
            h = hasher(page)
            h.update(zero[len(page) :])
            out.append(h.digest(length=HASH_LEN))
        else:
            out.append(hasher(page).digest(length=HASH_LEN))
    return b"".join(out)


def tree_hash(pages: bytes | bytearray | memoryview) -> bytes:
    """The block hash from its page hashes: ZERO_HASH for a block of zero pages, else
    BLAKE3 of the concatenated page hashes, truncated to 128 bits."""
    if _ZERO_HASHES.startswith(pages):
        return ZERO_HASH
    digest: bytes = blake3.blake3(pages).digest(length=HASH_LEN)
    return digest


def hash_block(block: bytes | bytearray | memoryview, block_size: int) -> bytes:
    """The block hash of spec section 1 (the tree hash of its page hashes): block (at most
    block_size bytes) is padded with zeros to block_size, and a block of zeros is ZERO_HASH."""
    return tree_hash(hash_pages(block, block_size))


def pages_per_block(block_size: int) -> int:
    return block_size >> PAGE_SHIFT


def page_hash(page: bytes | bytearray | memoryview) -> bytes:
    """The hash of one whole 4 KiB page (spec section 1): BLAKE3 truncated to 128 bits,
    ZERO_HASH for zeros."""
    if ZERO_PAGE == page:
        return ZERO_HASH
    digest: bytes = blake3.blake3(page).digest(length=HASH_LEN)
    return digest


def identity_hasher() -> blake3.blake3:
    return blake3.blake3()


def blocks_for(size: int, shift: int) -> int:
    return (size + (1 << shift) - 1) >> shift


def valid_shift(shift: int) -> bool:
    return MIN_SHIFT <= shift <= MAX_SHIFT


def shift_for_block_size(block_size: int) -> int:
    """block_shift for a block size a caller asks for: a power of two from 4 KiB to 16 MiB."""
    shift = block_size.bit_length() - 1
    if block_size <= 0 or 1 << shift != block_size or not valid_shift(shift):
        raise UsageError(f"block size {block_size} must be a power of two from 4 KiB to 16 MiB")
    return shift


def check_shift(shift: int, where: str) -> None:
    if not valid_shift(shift):
        raise FormatError(
            f"{where}: block size 2^{shift} is outside 4 KiB..16 MiB (block_shift 12..24)"
        )


def check_size(size: int, field: str, where: str) -> None:
    if size > MAX_FILE_SIZE:
        raise FormatError(f"{where}: {field} {size} exceeds the limit of 2^60 bytes")


def data_record_max_blocks(shift: int) -> int:
    return max(1, MAX_RECORD_DATA >> shift)


def payload_limit(raw_len: int, frame_start: bool = False) -> int:
    """Largest compressed payload accepted for raw_len bytes (zstd's bound plus block slack),
    plus the frame header on the record that opens a frame."""
    return raw_len + (raw_len >> 7) + 1024 + (MAX_FRAME_HEADER if frame_start else 0)


def with_crc(body: bytes) -> bytes:
    return body + CRC.pack(crc32c(body))


def check_crc(body: bytes | memoryview, stored: int, what: str, where: int) -> None:
    found = crc32c(body)
    if found != stored:
        raise ChecksumMismatch(
            f"{what} at byte {where}: CRC-32C mismatch (expected {stored:08x}, found {found:08x})"
        )


class Reader:
    """Counts bytes taken from a read callable, feeds them to an identity hasher, and
    turns a short read into Truncated naming what was being read and where."""

    def __init__(self, read: Callable[[int], bytes], name: str, hasher: blake3.blake3 | None = None):
        self._read = read
        self.name = name
        self.pos = 0
        self.hasher = hasher

    def exact(self, n: int, what: str) -> bytes:
        parts = []
        got = 0
        while got < n:
            chunk = self._read(n - got)
            if not chunk:
                raise Truncated(
                    f"{self.name} is truncated: {what} at byte {self.pos} needs {n} bytes, "
                    f"found {got}"
                )
            parts.append(chunk)
            got += len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if self.hasher is not None:
            self.hasher.update(data)
        self.pos += n
        return data

    def at_eof(self) -> bool:
        return not self._read(1)

    def header(self, size: int, kind: str) -> bytes:
        """The fixed header: its magic is judged first, so that a short or foreign input is
        named for what it is rather than reported as a truncated header."""
        parts, got = [], 0
        while got < 8:
            chunk = self._read(8 - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        magic = b"".join(parts)
        if not magic:
            raise Truncated(f"{self.name} is empty: expected a sparsepatch {kind}")
        if len(magic) < 8 and not (SIG_MAGIC.startswith(magic) or PATCH_MAGIC.startswith(magic)):
            raise BadMagic(f"{self.name}: unknown magic {magic.hex()} at byte 0: not a sparsepatch {kind}")
        if len(magic) == 8:
            check_magic(magic, kind, self.name)
        if self.hasher is not None:
            self.hasher.update(magic)
        self.pos += len(magic)
        return magic + self.exact(size - len(magic), "header")


def sniff(magic: bytes, name: str = "input") -> str:
    """'signature' or 'patch' from the first 8 bytes, else BadMagic."""
    if magic == SIG_MAGIC:
        return "signature"
    if magic == PATCH_MAGIC:
        return "patch"
    if not magic:
        raise Truncated(f"{name} is empty: not a sparsepatch signature or patch")
    if len(magic) < 8 and (SIG_MAGIC.startswith(magic) or PATCH_MAGIC.startswith(magic)):
        raise Truncated(f"{name} is truncated: magic at byte 0 needs 8 bytes, found {len(magic)}")
    raise BadMagic(
        f"{name}: unknown magic {magic[:8].hex()} at byte 0: not a sparsepatch signature or patch"
    )


def check_magic(magic: bytes, kind: str, name: str) -> None:
    if magic not in (SIG_MAGIC, PATCH_MAGIC):
        raise BadMagic(f"{name}: unknown magic {magic.hex()} at byte 0: not a sparsepatch {kind}")
    found = sniff(magic)
    if found != kind:
        raise BadMagic(f"{name}: expected a {kind}, found a {found} (magic at byte 0)")
