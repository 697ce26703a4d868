"""The signature (spec section 4): its header, the canonical encoder, and the reader.
A signature holds the page hashes of each data block; its block hashes (tree hashes) are
derived from them when it is read."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass

import blake3

from ..errors import FormatError
from .base import (
    CRC,
    HASH_LEN,
    MAX_SIG_HOLE_RUN,
    PAGE_SHIFT,
    SIG_DATA,
    SIG_END,
    SIG_HEADER,
    SIG_HOLE,
    SIG_MAGIC,
    SIG_RUN,
    SIG_TRAILER,
    VERSION,
    Reader,
    blocks_for,
    check_crc,
    crc32c,
    identity_hasher,
    sig_run_limit,
    with_crc,
)
from .rules import (
    SignatureRules,
    rule_1_magic_version_flags,
    rule_2_sig_fields,
    rule_3_sig_size,
)


@dataclass(frozen=True)
class SigHeader:
    block_shift: int
    file_size: int

    @property
    def block_size(self) -> int:
        return 1 << self.block_shift

    @property
    def block_count(self) -> int:
        return blocks_for(self.file_size, self.block_shift)

    @property
    def pages_per_block(self) -> int:
        return 1 << (self.block_shift - PAGE_SHIFT)


def encode_sig_header(h: SigHeader) -> bytes:
    return with_crc(SIG_HEADER.pack(SIG_MAGIC, VERSION, 0, h.block_shift, HASH_LEN, PAGE_SHIFT, 0,
                                    h.file_size))


def decode_sig_header(buf: bytes) -> SigHeader:
    body = buf[: SIG_HEADER.size]
    magic, version, flags, shift, hash_len, page_shift, reserved, size = SIG_HEADER.unpack(body)
    rule_1_magic_version_flags(magic, version, flags, 0, "signature")
    check_crc(body, CRC.unpack_from(buf, SIG_HEADER.size)[0], "signature header", 0)
    rule_2_sig_fields(shift, hash_len, page_shift, reserved)
    rule_3_sig_size(size)
    return SigHeader(shift, size)


class SignatureEncoder:
    """Builds the canonical signature byte stream block by block, from page hashes.

    Canonical means: maximal hole runs, data runs cut only at the run limit
    (sig_run_limit: 64 KiB of page hashes). The same block states therefore always give
    the same bytes, which is what lets diff compute the target identity without writing
    the target's signature.
    """

    def __init__(self, header: SigHeader):
        self.header = header
        self.hasher = identity_hasher()
        self.block = 0
        self.data_blocks = 0
        self.width = HASH_LEN * header.pages_per_block  # page hash bytes of one block
        self.max_run = sig_run_limit(header.block_shift)
        self._hole = 0
        self._pages = bytearray()  # page hashes of the data run being built
        self._count = 0  # blocks in it

    def start(self) -> bytes:
        out = encode_sig_header(self.header)
        self.hasher.update(out)
        return out

    def _emit(self, kind: int, first: int, count: int, payload: bytes) -> bytes:
        head = SIG_RUN.pack(kind, first, count)
        out = head + payload + CRC.pack(crc32c(payload, crc32c(head)))
        self.hasher.update(out)
        return out

    def _flush_hole(self) -> bytes:
        out = b""
        while self._hole:
            n = min(self._hole, MAX_SIG_HOLE_RUN)
            out += self._emit(SIG_HOLE, self.block, n, b"")
            self.block += n
            self._hole -= n
        return out

    def _flush_data(self) -> bytes:
        if not self._count:
            return b""
        n = self._count
        out = self._emit(SIG_DATA, self.block, n, bytes(self._pages))
        self.block += n
        self.data_blocks += n
        self._pages = bytearray()
        self._count = 0
        return out

    def hole(self, count: int) -> bytes:
        out = self._flush_data() if self._count else b""
        self._hole += count
        return out

    @property
    def position(self) -> int:
        """Number of blocks described so far."""
        return self.block + self._hole + self._count

    def data_many(self, index: array, pages: bytes | bytearray) -> bytes:
        """Describe blocks index (ascending, past those described so far) as data with
        their page hashes (pages_per_block hashes of HASH_LEN bytes a block, block by
        block, not all ZERO_HASH in any block); blocks skipped are holes. Consecutive
        blocks are taken as one slice, without a Python call per block."""
        n = len(index)
        if not n:
            return b""
        width, max_run = self.width, self.max_run
        parts: list[bytes] = []
        k = 0
        while k < n:
            first = index[k]
            j = n if index[n - 1] - first == n - 1 - k else k + 1
            while j < n and index[j] == first + (j - k):
                j += 1
            gap = first - self.position
            if gap:
                parts.append(self.hole(gap))
            if self._hole:
                parts.append(self._flush_hole())
            pos = k * width
            while k < j:
                take = min(j - k, max_run - self._count)
                self._pages += pages[pos : pos + take * width]
                self._count += take
                k += take
                pos += take * width
                if self._count == max_run:
                    parts.append(self._flush_data())
        return b"".join(parts)

    def finish(self, mtime_ns: int = 0) -> tuple[bytes, bytes]:
        """Close the stream; returns (remaining bytes, identity). Pads with a hole to block_count.
        mtime_ns (0: unknown) lives in the trailer, outside the identity, so the identity
        depends on content alone."""
        out = self._flush_data()
        pending = self.block + self._hole
        if pending > self.header.block_count:
            raise AssertionError("signature encoder got more blocks than the file holds")
        self._hole += self.header.block_count - pending
        out += self._flush_hole()
        identity = self.hasher.digest()
        out += with_crc(SIG_TRAILER.pack(SIG_END, self.block, self.data_blocks, mtime_ns, identity))
        return out, identity


@dataclass
class Signature:
    """A decoded signature held compactly: one sorted array of data block numbers, their
    block hashes in one buffer and their page hashes in another (16 + 16 * pages a block,
    plus 8 for the index), no object per block."""

    header: SigHeader
    data_index: array  # array('Q') of block numbers holding data, ascending
    hashes: bytearray  # HASH_LEN bytes (the block's tree hash) per entry of data_index
    identity: bytes
    runs: int
    mtime_ns: int = 0
    # HASH_LEN * pages_per_block bytes per entry of data_index. A bytearray grown run by run:
    # joining a list of runs would hold the pages twice at the end.
    pages: bytes | bytearray = b""

    @property
    def block_size(self) -> int:
        return self.header.block_size

    @property
    def pages_per_block(self) -> int:
        return self.header.pages_per_block

    @property
    def hole_blocks(self) -> int:
        return self.header.block_count - len(self.data_index)


def tree_hashes(pages: bytes | bytearray, width: int) -> bytes:
    """The block hashes of consecutive data blocks' page hashes (width bytes a block). A
    data block has a page hash other than ZERO_HASH (rule 5, checked first), so its tree
    hash is never ZERO_HASH: one BLAKE3 call a block, no zero test."""
    view, hasher = memoryview(pages), blake3.blake3
    return b"".join([hasher(view[p : p + width]).digest(length=HASH_LEN)
                     for p in range(0, len(view), width)])


def read_signature(read: Callable[[int], bytes], name: str = "signature") -> Signature:
    hasher = identity_hasher()
    r = Reader(read, name, hasher)
    head = r.header(SIG_HEADER.size + CRC.size, "signature")
    try:
        header = decode_sig_header(head)
    except FormatError as e:
        raise type(e)(f"{name}: {e}") from None
    rules = SignatureRules(header.block_count, header.block_shift)
    width = rules.page_bytes
    index = array("Q")
    hashes = bytearray()
    pages = bytearray()
    runs = 0
    while True:
        at = r.pos
        hasher_before = hasher.copy()
        kind_b = r.exact(1, f"run {runs} kind")
        if kind_b[0] == SIG_END:
            rest = r.exact(SIG_TRAILER.size - 1 + CRC.size, "trailer")
            body = kind_b + rest[: -CRC.size]
            where = f"{name} trailer at byte {at}"
            check_crc(body, CRC.unpack(rest[-CRC.size :])[0], f"{name} trailer", at)
            _, count, data_blocks, mtime_ns, identity = SIG_TRAILER.unpack(body)
            rules.rule_6_trailer(where, body[1:4], identity, hasher_before.digest(), count,
                                 data_blocks)
            if not r.at_eof():
                raise FormatError(f"{name}: unexpected bytes after the trailer at byte {r.pos}")
            return Signature(header, index, hashes, identity, runs, mtime_ns, pages)
        rest = r.exact(SIG_RUN.size - 1, f"run {runs} header")
        kind, first, count = SIG_RUN.unpack(kind_b + rest)
        where = f"{name} run {runs} at byte {at}"
        rules.rule_4_run_header(where, kind, first, count)
        rules.rule_5_canonical(where, kind, rest[:3])
        payload = r.exact(count * width, f"run {runs} page hashes") if kind == SIG_DATA else b""
        crc = CRC.unpack(r.exact(CRC.size, f"run {runs} CRC"))[0]
        check_crc(kind_b + rest + payload, crc, where, at)
        if kind == SIG_DATA:
            rules.rule_5_hashes(where, first, payload)
            index.extend(range(first, first + count))
            pages += payload
            hashes += tree_hashes(payload, width)
        rules.accept(kind, count)
        runs += 1
