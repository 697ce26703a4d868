"""The patch (spec section 5): header, records, trailer, and the streaming reader. The reader
reads; the section 7 rules it applies on the way are in rules.py."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, fields, replace
from functools import cached_property

from ..errors import AuthenticationError, FormatError, KeyRequired
from .base import (
    COMP_ZSTD,
    CRC,
    FLAG_FULL,
    FLAG_MAC,
    FRAME_START,
    HASH_LEN,
    KNOWN_PATCH_FLAGS,
    MAC_LEN,
    PAGE_LITERAL,
    PAGE_MOVED,
    PAGE_SAME,
    PAGE_SIZE,
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
    VERSION,
    ZERO_HASH,
    Reader,
    blocks_for,
    check_crc,
    crc32c,
    pages_per_block,
    with_crc,
)
from .mac import MacChain
from .rules import (
    PatchRules,
    rule_1_magic_version_flags,
    rule_2_patch_fields,
    rule_3_patch_sizes,
)


@dataclass(frozen=True)
class PatchHeader:
    flags: int
    block_shift: int
    base_size: int
    target_size: int
    base_identity: bytes
    target_identity: bytes
    compression: int = COMP_ZSTD
    base_mtime_ns: int = 0
    window_log: int = 0  # 0: no DATA payload; else every frame's window is <= 2^window_log

    @property
    def authenticated(self) -> bool:
        return bool(self.flags & FLAG_MAC)

    @property
    def block_size(self) -> int:
        return 1 << self.block_shift

    @property
    def full(self) -> bool:
        return bool(self.flags & FLAG_FULL)

    @property
    def target_blocks(self) -> int:
        return blocks_for(self.target_size, self.block_shift)


def encode_patch_header(h: PatchHeader) -> bytes:
    return with_crc(
        PATCH_HEADER.pack(
            PATCH_MAGIC, VERSION, h.flags, h.block_shift, h.compression, h.window_log, 0,
            h.base_size, h.target_size, h.base_mtime_ns, h.base_identity, h.target_identity,
        )
    )


def decode_patch_header(buf: bytes) -> PatchHeader:
    body = buf[: PATCH_HEADER.size]
    (magic, version, flags, shift, comp, window_log, reserved, base_size, target_size, mtime_ns,
     base_id, target_id) = PATCH_HEADER.unpack(body)
    rule_1_magic_version_flags(magic, version, flags, KNOWN_PATCH_FLAGS, "patch")
    check_crc(body, CRC.unpack_from(buf, PATCH_HEADER.size)[0], "patch header", 0)
    rule_2_patch_fields(shift, comp, window_log, reserved)
    rule_3_patch_sizes(flags, base_size, target_size)
    return PatchHeader(flags, shift, base_size, target_size, base_id, target_id, comp, mtime_ns,
                       window_log)


@dataclass(frozen=True)
class Record:
    """One patch record (spec 5.2). meta holds, per block: base hash, then target hash for
    DATA and COPY, then for DATA the kinds of its pages; after the blocks, a DATA record's
    moved-page sources (u64 each), then the page hash of each of its SAME and MOVED pages.
    A STAGE record's meta is one page hash per base page it lists. last is the header's
    last u64: a COPY's source block, a DATA record's moved pages.
    pages: pages per block (block_size / 4096)."""

    kind: int
    first_block: int
    count: int
    meta: bytes
    source_block: int = 0
    payload: bytes = b""
    offset: int = 0  # byte offset of the record in the patch, for messages
    index: int = 0  # record number, for messages
    source: str = "patch"  # name of the patch it came from, for messages
    flags: int = 0  # DATA: FRAME_START, FRAME_END
    pages: int = 1

    @property
    def payload_offset(self) -> int:
        """Where the payload starts in the patch, for messages."""
        return self.offset + RECORD.size + len(self.meta) + CRC.size

    @property
    def meta_width(self) -> int:
        """Meta bytes per block (per page for STAGE), the moved sources aside."""
        if self.kind in (REC_ZERO, REC_STAGE):
            return HASH_LEN
        return 2 * HASH_LEN + (self.pages if self.kind == REC_DATA else 0)

    @property
    def moved_pages(self) -> int:
        return self.source_block if self.kind == REC_DATA else 0

    def base_hash(self, k: int) -> bytes:
        w = self.meta_width
        return self.meta[k * w : k * w + HASH_LEN]

    def target_hash(self, k: int) -> bytes:
        if self.kind == REC_ZERO:
            return ZERO_HASH
        w = self.meta_width
        return self.meta[k * w + HASH_LEN : k * w + 2 * HASH_LEN]

    def page_kinds(self, k: int) -> bytes:
        """The page kinds of DATA block k (PAGE_LITERAL, PAGE_ZERO, PAGE_SAME, PAGE_MOVED)."""
        w = self.meta_width
        return self.meta[k * w + 2 * HASH_LEN : (k + 1) * w]

    @cached_property
    def kinds(self) -> bytes:
        """Every page kind of a DATA record, block by block."""
        if self.kind != REC_DATA:
            return b""
        w, c = self.meta_width, self.count
        if self.pages == 1:
            return self.meta[2 * HASH_LEN : c * w : w]
        return b"".join(self.page_kinds(k) for k in range(c))

    @cached_property
    def sources(self) -> array:
        """A DATA record's moved-page sources: base page numbers, one per MOVED page."""
        out = array("Q")
        at = self.count * self.meta_width
        out.frombytes(self.meta[at : at + 8 * self.moved_pages])
        if sys.byteorder != "little":
            out.byteswap()
        return out

    @property
    def page_hashes(self) -> bytes:
        """A DATA record's hashes of its SAME and MOVED pages, in block then page order."""
        if self.kind != REC_DATA:
            return b""
        return self.meta[self.count * self.meta_width + 8 * self.moved_pages :]

    @property
    def literal_pages(self) -> int:
        return self.kinds.count(PAGE_LITERAL)

    def where(self) -> str:
        return f"{self.source} record {self.index} ({REC_NAMES.get(self.kind, '?')}) at byte {self.offset}"


def meta_length(kind: int, count: int, last: int, pages: int) -> int:
    """Meta bytes of a record from its header: what the reader reads after the header (a
    DATA record's page hashes follow: hashed_pages of its kinds)."""
    if kind in (REC_ZERO, REC_STAGE):
        return count * HASH_LEN
    if kind == REC_COPY:
        return count * 2 * HASH_LEN
    return count * (2 * HASH_LEN + pages) + 8 * last


def hashed_pages(kinds: bytes) -> int:
    """Pages of DATA page kinds whose hash the meta carries: the SAME and MOVED ones."""
    return kinds.count(PAGE_SAME) + kinds.count(PAGE_MOVED)


def data_meta(blocks: list[tuple[bytes, bytes, bytes]], sources: list[int] | array,
              hashes: bytes = b"") -> bytes:
    """A DATA record's meta from (base hash, target hash, page kinds) per block, the
    moved-page sources and the hashes of the SAME and MOVED pages."""
    src = array("Q", sources)
    if sys.byteorder != "little":
        src.byteswap()
    return b"".join(b + t + k for b, t, k in blocks) + src.tobytes() + hashes


def encode_record(rec: Record) -> bytes:
    head = RECORD.pack(rec.kind, rec.flags, rec.first_block, rec.count, len(rec.payload),
                       rec.source_block)
    return head + rec.meta + CRC.pack(crc32c(rec.meta, crc32c(head))) + rec.payload


@dataclass(frozen=True)
class PatchTrailer:
    records: int
    data_blocks: int
    zero_blocks: int
    copy_blocks: int
    payload_bytes: int
    body_bytes: int


def encode_patch_trailer(t: PatchTrailer) -> bytes:
    return with_crc(
        PATCH_TRAILER.pack(REC_END, t.records, t.data_blocks, t.zero_blocks, t.copy_blocks,
                           t.payload_bytes, t.body_bytes)
    )


def raw_length(header: PatchHeader, rec: Record) -> int:
    """Literal bytes a DATA record's payload decodes to: 4096 per LITERAL page (spec 5.2)."""
    return PAGE_SIZE * rec.literal_pages if rec.kind == REC_DATA else 0


class PatchReader:
    """Streams a patch: header, then records in order, then the trailer, checking each
    field against the spec's limits (rules.py) before reading what it announces.

    With a key, every Tag is checked and a patch without the MAC flag is refused. Without
    one, the Tags of a MAC patch are read unchecked if unauthenticated_ok, else the patch
    is refused with KeyRequired (the caller knows how its user supplies a key)."""

    def __init__(self, read: Callable[[int], bytes], name: str = "patch", key: bytes | None = None,
                 unauthenticated_ok: bool = False):
        self.r = Reader(read, name)
        self.name = name
        head = self.r.header(PATCH_HEADER.size + CRC.size, "patch")
        try:
            self.header = decode_patch_header(head)
        except FormatError as e:
            raise type(e)(f"{name}: {e}") from None
        self.mac: MacChain | None = None
        if self.header.authenticated:
            if key is None and not unauthenticated_ok:
                raise KeyRequired(
                    f"{name}: patch is authenticated (MAC flag at byte 10) but no key was given"
                )
            self.mac = MacChain(key) if key is not None else None
            self._tag(f"{name} header", head)
        elif key is not None:
            raise AuthenticationError(
                f"{name}: patch is not authenticated (no MAC flag at byte 10) but a key was given"
            )
        self.trailer: PatchTrailer | None = None
        self.counts = {REC_DATA: 0, REC_ZERO: 0, REC_COPY: 0, REC_STAGE: 0}
        self.payload_bytes = 0
        self.frames = 0  # frames opened so far (FRAME_START records)

    def _tag(self, where: str, *element: bytes) -> None:
        """Read the tag after an element; check it when a key is known."""
        if not self.header.authenticated:
            return
        at = self.r.pos
        tag = self.r.exact(MAC_LEN, f"MAC tag after {where}")
        if self.mac is None:
            return
        import hmac  # only authenticated patches need it

        if not hmac.compare_digest(tag, self.mac.next(*element)):
            raise AuthenticationError(
                f"{where}: MAC mismatch at byte {at}: the patch was altered or the key is wrong"
            )

    def records(self) -> Iterator[Record]:
        h = self.header
        r = self.r
        rules = PatchRules(h.block_shift, h.base_size, h.target_size, h.full, h.window_log)
        self.rules = rules
        pages = pages_per_block(1 << h.block_shift)
        n = 0
        while True:
            at = r.pos
            kind = r.exact(1, f"record {n} kind")
            if kind[0] == REC_END:
                self._finish(kind, at, n)
                return
            rest = r.exact(RECORD.size - 1, f"record {n} header")
            k, flags, first, count, payload_len, source = RECORD.unpack(kind + rest)
            where = rules.record_header(f"{self.name} record {n}", at, k, flags, rest[1:3],
                                        first, count, payload_len, source)
            meta = r.exact(meta_length(k, count, source, pages), f"record {n} meta")
            if k == REC_DATA:
                # At most count * P hashes (one per page): bounded by rule 9 like the rest.
                hashed = hashed_pages(Record(k, first, count, meta, source, pages=pages).kinds)
                if hashed:
                    meta += r.exact(hashed * HASH_LEN, f"record {n} page hashes")
            crc = CRC.unpack(r.exact(CRC.size, f"record {n} CRC"))[0]
            check_crc(kind + rest + meta, crc, where, at)
            rec = Record(k, first, count, meta, source, b"", at, n, self.name, flags, pages)
            rules.rule_14_meta(where, rec)
            rules.rule_11_literal(where, rec, payload_len)
            payload = r.exact(payload_len, f"record {n} payload") if payload_len else b""
            self._tag(where, kind, rest, meta, CRC.pack(crc), payload)
            rules.accept(rec, where)
            self.counts[k] += count
            self.payload_bytes += payload_len
            self.frames += flags & FRAME_START
            yield replace(rec, payload=payload) if payload else rec
            n += 1

    def _finish(self, kind: bytes, at: int, n: int) -> None:
        where = f"{self.name} trailer at byte {at}"
        rest = self.r.exact(PATCH_TRAILER.size - 1 + CRC.size, "trailer")
        body = kind + rest[: -CRC.size]
        check_crc(body, CRC.unpack(rest[-CRC.size :])[0], f"{self.name} trailer", at)
        self._tag(where, kind, rest)
        t = PatchTrailer(*PATCH_TRAILER.unpack(body)[1:])
        seen = PatchTrailer(n, self.counts[REC_DATA], self.counts[REC_ZERO], self.counts[REC_COPY],
                            self.payload_bytes, at)
        self.rules.rule_15_frames_closed(where)
        PatchRules.rule_15_trailer(where, body[1:4], astuple(t), astuple(seen),
                                   tuple(f.name for f in fields(PatchTrailer)))
        if not self.r.at_eof():
            raise FormatError(f"{self.name}: unexpected bytes after the trailer at byte {self.r.pos}")
        self.trailer = t
