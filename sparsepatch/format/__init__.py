"""Pure codec for the signature, patch and journal formats (spec/FORMAT.md is the contract).

Encoders return bytes; decoders take bytes or a ``read(n)`` callable and check every
length, count and offset against the limits in the spec before allocating anything.
This package never opens a file. Its modules, by structure:

- base: constants, Struct layouts, CRC-32C, page and block (tree) hashes, magic, the counting
  reader
- rules: spec section 7, rules 1-15, one function or method per rule
- signature, patch, journal: one module per file format
- mac: the patch MAC key and tag chain
- frame: the literal stream, DATA payloads as zstd frames across records (rule 16)
"""

from .base import (
    COMP_ZSTD,
    CRC,
    FLAG_FULL,
    FLAG_MAC,
    FRAME_END,
    FRAME_START,
    HASH_LEN,
    JOURNAL_MAGIC,
    JOURNAL_SLOT,
    JOURNAL_SLOT_SIZE,
    KNOWN_PATCH_FLAGS,
    MAC_CONTEXT,
    MAC_LEN,
    MAX_FILE_SIZE,
    MAX_FRAME_RAW,
    MAX_RECORD_BLOCKS,
    MAX_RECORD_DATA,
    MAX_SHIFT,
    MAX_SIG_DATA_RUN,
    MAX_SIG_HOLE_RUN,
    MAX_STAGE_PAGES,
    MAX_WINDOW_LOG,
    MIN_KEY_FILE,
    MIN_SHIFT,
    MIN_WINDOW_LOG,
    PAGE_LITERAL,
    PAGE_MOVED,
    PAGE_SAME,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGE_ZERO,
    PATCH_HEADER,
    PATCH_MAGIC,
    PATCH_TRAILER,
    REC_COPY,
    REC_DATA,
    REC_END,
    REC_NAMES,
    REC_STAGE,
    REC_ZERO,
    RECORD,
    SIG_DATA,
    SIG_END,
    SIG_HEADER,
    SIG_HOLE,
    SIG_MAGIC,
    SIG_RUN,
    SIG_TRAILER,
    VERSION,
    ZERO_HASH,
    ZERO_PAGE,
    Reader,
    blocks_for,
    check_shift,
    check_size,
    crc32c,
    data_record_max_blocks,
    hash_block,
    hash_pages,
    identity_hasher,
    page_hash,
    pages_per_block,
    payload_limit,
    shift_for_block_size,
    sig_run_limit,
    sniff,
    tree_hash,
    valid_shift,
)
from .frame import FrameDecoder, assemble, checked_page_hashes, decode_data, rule_16_clipped_tail
from .journal import JournalSlot, decode_journal, decode_journal_slot, encode_journal_slot, newer_slot
from .mac import MacChain, derive_mac_key
from .patch import (
    PatchHeader,
    PatchReader,
    PatchTrailer,
    Record,
    data_meta,
    decode_patch_header,
    encode_patch_header,
    encode_patch_trailer,
    encode_record,
    hashed_pages,
    meta_length,
    raw_length,
)
from .rules import CopySources, PatchRules, RangeSet, SignatureRules
from .signature import (
    SigHeader,
    Signature,
    SignatureEncoder,
    decode_sig_header,
    encode_sig_header,
    read_signature,
    tree_hashes,
)

__all__ = [
    "COMP_ZSTD", "CRC", "FLAG_FULL", "FLAG_MAC", "FRAME_END", "FRAME_START", "HASH_LEN",
    "JOURNAL_MAGIC", "JOURNAL_SLOT", "JOURNAL_SLOT_SIZE", "KNOWN_PATCH_FLAGS", "MAC_CONTEXT",
    "MAC_LEN", "MAX_FILE_SIZE", "MAX_FRAME_RAW", "MAX_RECORD_BLOCKS", "MAX_RECORD_DATA",
    "MAX_SHIFT", "MAX_SIG_DATA_RUN", "MAX_SIG_HOLE_RUN", "MAX_WINDOW_LOG", "MIN_KEY_FILE",
    "MIN_SHIFT", "MIN_WINDOW_LOG", "PAGE_SHIFT", "PAGE_SIZE", "PATCH_HEADER", "PATCH_MAGIC",
    "PATCH_TRAILER", "RECORD", "REC_COPY", "REC_DATA", "REC_END", "REC_NAMES", "REC_ZERO",
    "SIG_DATA", "SIG_END", "SIG_HEADER", "SIG_HOLE", "SIG_MAGIC", "SIG_RUN", "SIG_TRAILER",
    "VERSION", "ZERO_HASH", "CopySources", "FrameDecoder", "JournalSlot", "MacChain", "PatchHeader",
    "PatchReader", "PatchRules", "PatchTrailer", "RangeSet", "Reader", "Record", "SigHeader",
    "Signature", "SignatureEncoder", "SignatureRules", "blocks_for", "check_shift",
    "check_size", "checked_page_hashes", "crc32c", "data_record_max_blocks", "decode_data", "decode_journal",
    "decode_journal_slot", "decode_patch_header", "decode_sig_header", "derive_mac_key",
    "encode_journal_slot", "encode_patch_header", "encode_patch_trailer", "encode_record",
    "encode_sig_header", "hash_block", "hash_pages", "identity_hasher", "newer_slot",
    "payload_limit", "raw_length", "read_signature", "rule_16_clipped_tail", "shift_for_block_size",
    "sig_run_limit", "sniff", "tree_hash", "tree_hashes", "valid_shift",
    "MAX_STAGE_PAGES", "PAGE_LITERAL", "PAGE_MOVED", "PAGE_SAME",
    "PAGE_ZERO", "REC_STAGE", "ZERO_PAGE", "assemble", "data_meta", "hashed_pages", "meta_length",
    "page_hash",
    "pages_per_block",
]
