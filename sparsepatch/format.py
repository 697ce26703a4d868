"""Pure codec for the signature, patch and journal formats (spec/FORMAT.md is the contract).

Encoders return bytes; decoders take bytes or a ``read(n)`` callable and check every
length, count and offset against the limits in the spec before allocating anything.
This module never opens a file.
"""

from __future__ import annotations

import bisect
import heapq
import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import blake3
import crcmod.predefined

from .errors import (
    AuthenticationError,
    BadMagic,
    ChecksumMismatch,
    FormatError,
    Truncated,
    UnsupportedVersion,
)

VERSION = 1
SIG_MAGIC = b"\x89SPSIG\r\n"
PATCH_MAGIC = b"\x89SPPAT\r\n"
JOURNAL_MAGIC = b"\x89SPJNL\r\n"

HASH_LEN = 16
ZERO_HASH = bytes(HASH_LEN)  # the hash of a hole or an all-zero block, by definition
MIN_SHIFT = 12  # 4 KiB
MAX_SHIFT = 24  # 16 MiB
MAX_FILE_SIZE = 1 << 60  # 1 EiB: refuse absurd sizes before doing arithmetic with them

MAX_SIG_DATA_RUN = 4096  # hashes per signature DATA run (64 KiB of hashes)
MAX_SIG_HOLE_RUN = 0xFFFFFFFF
MAX_RECORD_DATA = 8 << 20  # uncompressed bytes a DATA record may cover (or one block if larger)
MAX_RECORD_BLOCKS = 32768  # blocks a ZERO or COPY record may cover

SIG_HOLE, SIG_DATA, SIG_END = 1, 2, 0xFF
REC_DATA, REC_ZERO, REC_COPY, REC_END = 1, 2, 3, 0xFF
REC_NAMES = {REC_DATA: "data", REC_ZERO: "zero", REC_COPY: "copy"}

FLAG_FULL = 0x0001  # made without a signature: the base is the empty file
FLAG_MAC = 0x0002  # every element is followed by a keyed BLAKE3 tag chained over the patch
KNOWN_PATCH_FLAGS = FLAG_FULL | FLAG_MAC
MAC_LEN = 32
MAC_CONTEXT = "sparsepatch 2026-11-26 patch MAC key v1"
MIN_KEY_FILE = 16
COMP_ZSTD = 1

# Struct constants are named after the records in spec/FORMAT.md; the CRC is not in the struct.
SIG_HEADER = struct.Struct("<8sHHBBHQ")  # magic version flags block_shift hash_len reserved file_size
SIG_RUN = struct.Struct("<B3xQI")  # kind first_block count
SIG_TRAILER = struct.Struct("<B3xQQQ32s")  # kind block_count data_blocks mtime_ns identity
PATCH_HEADER = struct.Struct("<8sHHBBHQQQ32s32s")  # ... base_size target_size base_mtime_ns ids
RECORD = struct.Struct("<B3xQIIQ")  # kind first_block count payload_len source_block
PATCH_TRAILER = struct.Struct("<B3xQQQQQQ")  # kind records data zero copy payload_bytes body_bytes
JOURNAL_SLOT = struct.Struct("<8sHHI32s32sQQ")  # magic version reserved seq base target start end
CRC = struct.Struct("<I")
JOURNAL_SLOT_SIZE = 128

_crc32c = crcmod.predefined.mkPredefinedCrcFun("crc-32c")


def crc32c(data: bytes | memoryview, crc: int = 0) -> int:
    return int(_crc32c(data, crc))


def block_hash(block: bytes | memoryview) -> bytes:
    """BLAKE3 of a full (zero-padded) block, truncated to 128 bits. Callers use ZERO_HASH
    instead for a block of zeros, which they detect before hashing."""
    digest: bytes = blake3.blake3(block).digest(length=HASH_LEN)
    return digest


def identity_hasher() -> blake3.blake3:
    return blake3.blake3()


def derive_mac_key(material: bytes) -> bytes:
    """The 32-byte MAC key from a key file's bytes (any length >= MIN_KEY_FILE)."""
    if len(material) < MIN_KEY_FILE:
        raise FormatError(f"key file holds {len(material)} bytes; at least {MIN_KEY_FILE} are needed")
    key: bytes = blake3.blake3(material, derive_key_context=MAC_CONTEXT).digest()
    return key


class MacChain:
    """tag_0 = MAC(K, header); tag_i = MAC(K, tag_{i-1} || element_i): each tag authenticates
    its element and everything before it, so nothing can be dropped, reordered or spliced."""

    def __init__(self, key: bytes):
        self.key = key
        self.tag = b""

    def hasher(self) -> blake3.blake3:
        return blake3.blake3(self.tag, key=self.key)

    def next(self, *parts: bytes) -> bytes:
        h = self.hasher()
        for part in parts:
            h.update(part)
        self.tag = h.digest()
        return self.tag


def blocks_for(size: int, shift: int) -> int:
    return (size + (1 << shift) - 1) >> shift


def check_shift(shift: int, where: str) -> None:
    if not MIN_SHIFT <= shift <= MAX_SHIFT:
        raise FormatError(
            f"{where}: block size 2^{shift} is outside 4 KiB..16 MiB (block_shift 12..24)"
        )


def check_size(size: int, field: str, where: str) -> None:
    if size > MAX_FILE_SIZE:
        raise FormatError(f"{where}: {field} {size} exceeds the limit of 2^60 bytes")


def data_record_max_blocks(shift: int) -> int:
    return max(1, MAX_RECORD_DATA >> shift)


def payload_limit(raw_len: int) -> int:
    """Largest compressed payload accepted for raw_len bytes (zstd's bound plus frame slack)."""
    return raw_len + (raw_len >> 7) + 1024


def _with_crc(body: bytes) -> bytes:
    return body + CRC.pack(crc32c(body))


def _check_crc(body: bytes | memoryview, stored: int, what: str, where: int) -> None:
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
            _check_magic(magic, kind, self.name)
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


def _check_magic(magic: bytes, kind: str, name: str) -> None:
    if magic not in (SIG_MAGIC, PATCH_MAGIC):
        raise BadMagic(f"{name}: unknown magic {magic.hex()} at byte 0: not a sparsepatch {kind}")
    found = sniff(magic)
    if found != kind:
        raise BadMagic(f"{name}: expected a {kind}, found a {found} (magic at byte 0)")


def _check_magic_version(magic: bytes, version: int, flags: int, known_flags: int, kind: str) -> None:
    _check_magic(magic, kind, kind)
    if version != VERSION:
        raise UnsupportedVersion(
            f"{kind} format version {version} at byte 8 is not supported (this build reads {VERSION})"
        )
    if flags & ~known_flags:
        raise UnsupportedVersion(f"{kind} flags {flags:#06x} at byte 10 has unknown bits set")


# ---------------------------------------------------------------- signature


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


def encode_sig_header(h: SigHeader) -> bytes:
    return _with_crc(SIG_HEADER.pack(SIG_MAGIC, VERSION, 0, h.block_shift, HASH_LEN, 0, h.file_size))


def decode_sig_header(buf: bytes) -> SigHeader:
    body = buf[: SIG_HEADER.size]
    magic, version, flags, shift, hash_len, reserved, size = SIG_HEADER.unpack(body)
    _check_magic_version(magic, version, flags, 0, "signature")
    _check_crc(body, CRC.unpack_from(buf, SIG_HEADER.size)[0], "signature header", 0)
    check_shift(shift, "signature header at byte 12")
    if hash_len != HASH_LEN:
        raise FormatError(f"signature header at byte 13: hash length {hash_len}, expected {HASH_LEN}")
    if reserved:
        raise FormatError("signature header at byte 14: reserved field is not zero")
    check_size(size, "file size", "signature header at byte 16")
    return SigHeader(shift, size)


class SignatureEncoder:
    """Builds the canonical signature byte stream block by block.

    Canonical means: maximal hole runs, data runs cut at MAX_SIG_DATA_RUN. The same
    block states therefore always give the same bytes, which is what lets diff compute
    the target identity without writing the target's signature.
    """

    def __init__(self, header: SigHeader):
        self.header = header
        self.hasher = identity_hasher()
        self.block = 0
        self.data_blocks = 0
        self.runs = 0
        self._hole = 0
        self._hashes = bytearray()  # digests of the data run being built
        self._count = 0  # blocks in it

    def start(self) -> bytes:
        out = encode_sig_header(self.header)
        self.hasher.update(out)
        return out

    def _emit(self, kind: int, first: int, count: int, payload: bytes) -> bytes:
        head = SIG_RUN.pack(kind, first, count)
        out = head + payload + CRC.pack(crc32c(payload, crc32c(head)))
        self.hasher.update(out)
        self.runs += 1
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
        out = self._emit(SIG_DATA, self.block, n, bytes(self._hashes))
        self.block += n
        self.data_blocks += n
        self._hashes = bytearray()
        self._count = 0
        return out

    def hole(self, count: int) -> bytes:
        out = self._flush_data() if self._count else b""
        self._hole += count
        return out

    def data(self, digest: bytes) -> bytes:
        if digest == ZERO_HASH:
            return self.hole(1)
        out = self._flush_hole() if self._hole else b""
        self._hashes += digest
        self._count += 1
        if self._count == MAX_SIG_DATA_RUN:
            out += self._flush_data()
        return out

    @property
    def position(self) -> int:
        """Number of blocks described so far."""
        return self.block + self._hole + self._count

    def data_at(self, index: int, digest: bytes) -> bytes:
        """Describe block index as data; blocks between the last one and index are holes."""
        gap = index - self.position
        out = self.hole(gap) if gap else b""
        return out + self.data(digest)

    def data_many(self, index: array, digests: bytes | bytearray) -> bytes:
        """data_at for many blocks at once: index ascending, digests HASH_LEN bytes each, of
        blocks that are not zeros. The same bytes as one data_at per block, without a
        Python call per block: consecutive blocks are taken as one slice."""
        n = len(index)
        if not n:
            return b""
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
            pos = k * HASH_LEN
            while k < j:
                take = min(j - k, MAX_SIG_DATA_RUN - self._count)
                self._hashes += digests[pos : pos + take * HASH_LEN]
                self._count += take
                k += take
                pos += take * HASH_LEN
                if self._count == MAX_SIG_DATA_RUN:
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
        out += _with_crc(SIG_TRAILER.pack(SIG_END, self.block, self.data_blocks, mtime_ns, identity))
        return out, identity


@dataclass
class Signature:
    """A decoded signature held compactly: one sorted array of data block numbers and their
    hashes in one buffer, 24 bytes per data block, no object per block."""

    header: SigHeader
    data_index: array  # array('Q') of block numbers holding data, ascending
    hashes: bytearray  # HASH_LEN bytes per entry of data_index
    identity: bytes
    runs: int
    mtime_ns: int = 0

    @property
    def block_size(self) -> int:
        return self.header.block_size

    @property
    def hole_blocks(self) -> int:
        return self.header.block_count - len(self.data_index)

    def hash_at(self, k: int) -> bytes:
        return bytes(self.hashes[k * HASH_LEN : (k + 1) * HASH_LEN])


def read_signature(read: Callable[[int], bytes], name: str = "signature") -> Signature:
    hasher = identity_hasher()
    r = Reader(read, name, hasher)
    head = r.header(SIG_HEADER.size + CRC.size, "signature")
    try:
        header = decode_sig_header(head)
    except FormatError as e:
        raise type(e)(f"{name}: {e}") from None
    total = header.block_count
    index = array("Q")
    hashes = bytearray()
    block = 0
    runs = 0
    prev_kind = last_count = 0
    while True:
        at = r.pos
        hasher_before = hasher.copy()
        kind_b = r.exact(1, f"run {runs} kind")
        if kind_b[0] == SIG_END:
            rest = r.exact(SIG_TRAILER.size - 1 + CRC.size, "trailer")
            body = kind_b + rest[:-CRC.size]
            _check_crc(body, CRC.unpack(rest[-CRC.size :])[0], f"{name} trailer", at)
            _, count, data_blocks, mtime_ns, identity = SIG_TRAILER.unpack(body)
            if body[1:4] != b"\0\0\0":
                raise FormatError(f"{name} trailer at byte {at}: reserved bytes are not zero")
            expected = hasher_before.digest()
            if identity != expected:
                raise ChecksumMismatch(
                    f"{name} trailer at byte {at}: identity mismatch "
                    f"(expected {identity.hex()[:16]}..., found {expected.hex()[:16]}...)"
                )
            if block != total or count != total or data_blocks != len(index):
                raise FormatError(
                    f"{name} trailer at byte {at}: counts {count} blocks/{data_blocks} data "
                    f"disagree with the runs ({block} blocks/{len(index)} data, header says {total})"
                )
            if not r.at_eof():
                raise FormatError(f"{name}: unexpected bytes after the trailer at byte {r.pos}")
            return Signature(header, index, hashes, identity, runs, mtime_ns)
        rest = r.exact(SIG_RUN.size - 1, f"run {runs} header")
        kind, first, count = SIG_RUN.unpack(kind_b + rest)
        where = f"{name} run {runs} at byte {at}"
        if kind not in (SIG_HOLE, SIG_DATA):
            raise FormatError(f"{where}: unknown run kind {kind}")
        if first != block:
            raise FormatError(f"{where}: starts at block {first}, expected {block}")
        if count == 0 or count > total - block:
            raise FormatError(f"{where}: block count {count} is outside 1..{total - block}")
        if kind == SIG_DATA and count > MAX_SIG_DATA_RUN:
            raise FormatError(f"{where}: {count} hashes exceed the limit of {MAX_SIG_DATA_RUN}")
        if rest[:3] != b"\0\0\0":
            raise FormatError(f"{where}: reserved bytes are not zero")
        # Canonical runs make the identity a function of content alone (spec: "Canonical form").
        if kind == SIG_HOLE and prev_kind == SIG_HOLE and last_count != MAX_SIG_HOLE_RUN:
            raise FormatError(f"{where}: hole run follows a short hole run (not canonical)")
        if kind == SIG_DATA and prev_kind == SIG_DATA and last_count != MAX_SIG_DATA_RUN:
            raise FormatError(f"{where}: data run follows a short data run (not canonical)")
        payload = r.exact(count * HASH_LEN, f"run {runs} hashes") if kind == SIG_DATA else b""
        crc = CRC.unpack(r.exact(CRC.size, f"run {runs} CRC"))[0]
        _check_crc(kind_b + rest + payload, crc, where, at)
        if kind == SIG_DATA:
            zero_at = payload.find(ZERO_HASH)  # a search, not a Python loop per hash
            while zero_at >= 0:
                if zero_at % HASH_LEN == 0:
                    raise FormatError(
                        f"{where}: block {first + zero_at // HASH_LEN} has the zero hash in a data run"
                    )
                zero_at = payload.find(ZERO_HASH, zero_at + 1)
            index.extend(range(first, first + count))
            hashes += payload
        block += count
        runs += 1
        prev_kind, last_count = kind, count


# ---------------------------------------------------------------- patch


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
    return _with_crc(
        PATCH_HEADER.pack(
            PATCH_MAGIC, VERSION, h.flags, h.block_shift, h.compression, 0,
            h.base_size, h.target_size, h.base_mtime_ns, h.base_identity, h.target_identity,
        )
    )


def decode_patch_header(buf: bytes) -> PatchHeader:
    body = buf[: PATCH_HEADER.size]
    (magic, version, flags, shift, comp, reserved, base_size, target_size, mtime_ns, base_id,
     target_id) = PATCH_HEADER.unpack(body)
    _check_magic_version(magic, version, flags, KNOWN_PATCH_FLAGS, "patch")
    _check_crc(body, CRC.unpack_from(buf, PATCH_HEADER.size)[0], "patch header", 0)
    check_shift(shift, "patch header at byte 12")
    if comp != COMP_ZSTD:
        raise UnsupportedVersion(f"patch header at byte 13: unknown compression {comp}")
    if reserved:
        raise FormatError("patch header at byte 14: reserved field is not zero")
    check_size(base_size, "base size", "patch header at byte 16")
    check_size(target_size, "target size", "patch header at byte 24")
    if flags & FLAG_FULL and base_size:
        raise FormatError("patch header at byte 16: a full patch must have base size 0")
    return PatchHeader(flags, shift, base_size, target_size, base_id, target_id, comp, mtime_ns)


@dataclass(frozen=True)
class Record:
    """One patch record. meta holds, per block: base hash (+ target hash for DATA and COPY)."""

    kind: int
    first_block: int
    count: int
    meta: bytes
    source_block: int = 0
    payload: bytes = b""
    offset: int = 0  # byte offset of the record in the patch, for messages
    index: int = 0  # record number, for messages
    source: str = "patch"  # name of the patch it came from, for messages

    @property
    def end_block(self) -> int:
        return self.first_block + self.count

    @property
    def meta_width(self) -> int:
        return HASH_LEN if self.kind == REC_ZERO else 2 * HASH_LEN

    def base_hash(self, k: int) -> bytes:
        w = self.meta_width
        return self.meta[k * w : k * w + HASH_LEN]

    def target_hash(self, k: int) -> bytes:
        if self.kind == REC_ZERO:
            return ZERO_HASH
        w = self.meta_width
        return self.meta[k * w + HASH_LEN : (k + 1) * w]

    def where(self) -> str:
        return f"{self.source} record {self.index} ({REC_NAMES.get(self.kind, '?')}) at byte {self.offset}"


def encode_record(rec: Record) -> bytes:
    head = RECORD.pack(rec.kind, rec.first_block, rec.count, len(rec.payload), rec.source_block)
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
    return _with_crc(
        PATCH_TRAILER.pack(REC_END, t.records, t.data_blocks, t.zero_blocks, t.copy_blocks,
                           t.payload_bytes, t.body_bytes)
    )


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


def raw_length(header: PatchHeader, first_block: int, count: int) -> int:
    """Bytes of target a DATA record carries: its blocks clipped at the target size."""
    start = first_block << header.block_shift
    end = min((first_block + count) << header.block_shift, header.target_size)
    return end - start


class PatchReader:
    """Streams a patch: header, then records in order, then the trailer, checking each
    field against the spec's limits before reading what it announces."""

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
                raise AuthenticationError(
                    f"{name}: patch is authenticated (flag at byte 10) but no key was given; "
                    "pass --key-file, or --no-auth to apply it unchecked"
                )
            self.mac = MacChain(key) if key is not None else None
            self._tag(f"{name} header", head)
        elif key is not None:
            raise AuthenticationError(
                f"{name}: patch is not authenticated (no MAC flag at byte 10) but a key was given"
            )
        self.trailer: PatchTrailer | None = None
        self.counts = {REC_DATA: 0, REC_ZERO: 0, REC_COPY: 0}
        self.payload_bytes = 0
        self.raw_bytes = 0

    def _tag(self, where: str, *element: bytes) -> None:
        """Read the tag after an element; check it when a key is known."""
        if not self.header.authenticated:
            return
        at = self.r.pos
        tag = self.r.exact(MAC_LEN, f"MAC tag after {where}")
        if self.mac is not None:
            import hmac  # only authenticated patches need it

            expected = self.mac.next(*element)
            if not hmac.compare_digest(tag, expected):
                raise AuthenticationError(
                    f"{where}: MAC mismatch at byte {at}: the patch was altered or the key is wrong"
                )

    def records(self) -> Iterator[Record]:
        h = self.header
        r = self.r
        total = h.target_blocks
        max_data = data_record_max_blocks(h.block_shift)
        next_block = 0
        n = 0
        # A copy must read a block no record changes, or the result would depend on the
        # order records are applied in and a resumed apply could read half-written data.
        changed, copied_from = RangeSet(), CopySources()
        while True:
            at = r.pos
            kind = r.exact(1, f"record {n} kind")
            if kind[0] == REC_END:
                self._finish(kind, at, n)
                return
            rest = r.exact(RECORD.size - 1, f"record {n} header")
            k, first, count, payload_len, source = RECORD.unpack(kind + rest)
            where = f"{self.name} record {n} at byte {at}"
            if k not in REC_NAMES:
                raise FormatError(f"{where}: unknown record kind {k}")
            where = f"{self.name} record {n} ({REC_NAMES[k]}) at byte {at}"
            if rest[:3] != b"\0\0\0":
                raise FormatError(f"{where}: reserved bytes are not zero")
            if first < next_block:
                raise FormatError(
                    f"{where}: starts at block {first}, before the end of the previous record "
                    f"(block {next_block}): records overlap or are out of order"
                )
            limit = max_data if k == REC_DATA else MAX_RECORD_BLOCKS
            if count == 0 or count > limit:
                raise FormatError(f"{where}: block count {count} is outside 1..{limit}")
            if first >= total or count > total - first:
                raise FormatError(
                    f"{where}: blocks {first}..{first + count - 1} lie beyond the target "
                    f"({total} blocks, {h.target_size} bytes)"
                )
            if k == REC_DATA:
                raw = raw_length(h, first, count)
                if payload_len == 0 or payload_len > payload_limit(raw):
                    raise FormatError(
                        f"{where}: payload length {payload_len} is outside 1..{payload_limit(raw)} "
                        f"for {raw} bytes of data"
                    )
            elif payload_len:
                raise FormatError(f"{where}: payload length {payload_len}, expected 0")
            if k == REC_COPY:
                # Sources must survive the final truncate, or a resumed apply would find
                # them gone; so they lie within both the base and the target.
                limit = min(blocks_for(h.base_size, h.block_shift), total)
                if source > limit or count > limit - source:
                    raise FormatError(
                        f"{where}: copy source blocks {source}..{source + count - 1} lie beyond "
                        f"the base or the target ({limit} blocks in both)"
                    )
                if source < first + count and first < source + count:
                    raise FormatError(f"{where}: copy source overlaps its own destination")
            elif source:
                raise FormatError(f"{where}: source block {source}, expected 0")
            if copied_from.meets(first, first + count):
                raise FormatError(f"{where}: changes a block an earlier copy record reads from")
            if k == REC_COPY:
                if changed.meets(source, source + count):
                    raise FormatError(f"{where}: copies from a block an earlier record changes")
                copied_from.add(source, source + count)
            changed.add(first, first + count)
            width = HASH_LEN if k == REC_ZERO else 2 * HASH_LEN
            meta = r.exact(count * width, f"record {n} block hashes")
            crc = CRC.unpack(r.exact(CRC.size, f"record {n} CRC"))[0]
            _check_crc(kind + rest + meta, crc, where, at)
            for b in range(count):
                if k != REC_ZERO and meta[b * width + HASH_LEN : (b + 1) * width] == ZERO_HASH:
                    raise FormatError(f"{where}: block {first + b} has the zero hash as target")
                if k == REC_ZERO and meta[b * width : b * width + HASH_LEN] == ZERO_HASH:
                    raise FormatError(f"{where}: block {first + b} is zeros in base and target")
            payload = r.exact(payload_len, f"record {n} payload") if payload_len else b""
            self._tag(where, kind, rest, meta, CRC.pack(crc), payload)
            self.counts[k] += count
            self.payload_bytes += payload_len
            next_block = first + count
            yield Record(k, first, count, meta, source, payload, at, n, self.name)
            n += 1

    def _finish(self, kind: bytes, at: int, n: int) -> None:
        rest = self.r.exact(PATCH_TRAILER.size - 1 + CRC.size, "trailer")
        body = kind + rest[: -CRC.size]
        _check_crc(body, CRC.unpack(rest[-CRC.size :])[0], f"{self.name} trailer", at)
        self._tag(f"{self.name} trailer at byte {at}", kind, rest)
        if body[1:4] != b"\0\0\0":
            raise FormatError(f"{self.name} trailer at byte {at}: reserved bytes are not zero")
        t = PatchTrailer(*PATCH_TRAILER.unpack(body)[1:])
        seen = PatchTrailer(n, self.counts[REC_DATA], self.counts[REC_ZERO], self.counts[REC_COPY],
                            self.payload_bytes, at)
        if t != seen:
            wrong = ", ".join(
                f"{f}={getattr(t, f)} (the records give {getattr(seen, f)})"
                for f in PatchTrailer.__dataclass_fields__
                if getattr(t, f) != getattr(seen, f)
            )
            raise FormatError(
                f"{self.name} trailer at byte {at}: counts disagree with the records read: {wrong}"
            )
        if not self.r.at_eof():
            raise FormatError(f"{self.name}: unexpected bytes after the trailer at byte {self.r.pos}")
        self.trailer = t


def _check_frame_layout(rec: Record) -> None:
    """The payload is exactly one zstd frame with a content checksum: walk its block
    headers (RFC 8878, 3.1.1.2) so no byte of the payload goes unchecked."""
    import zstandard  # imported where used: a signature never needs it

    p = rec.payload
    try:
        params = zstandard.get_frame_parameters(p)
        pos = zstandard.frame_header_size(p)
    except zstandard.ZstdError as e:
        raise FormatError(f"{rec.where()}: payload is not a zstd frame ({e})") from None
    if not params.has_checksum:
        raise FormatError(f"{rec.where()}: payload frame has no content checksum")
    while True:
        if pos + 3 > len(p):
            raise Truncated(f"{rec.where()}: payload frame ends inside a block header")
        head = int.from_bytes(p[pos : pos + 3], "little")
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        if kind == 3:
            raise FormatError(f"{rec.where()}: payload frame has a reserved block type")
        pos += 3 + (1 if kind == 1 else size)
        if last:
            break
    pos += 4  # content checksum
    if pos != len(p):
        raise FormatError(
            f"{rec.where()}: payload frame is {pos} bytes, the record says {len(p)}"
        )


def decode_payload(header: PatchHeader, rec: Record) -> bytes:
    """Decompress a DATA record's payload, refusing any frame whose declared size is not
    exactly the record's length, so output is bounded by the record before decoding."""
    import zstandard

    raw = raw_length(header, rec.first_block, rec.count)
    try:
        declared = zstandard.frame_content_size(rec.payload)
    except zstandard.ZstdError as e:
        raise FormatError(f"{rec.where()}: payload is not a zstd frame ({e})") from None
    if declared != raw:
        raise FormatError(
            f"{rec.where()}: payload declares {declared} bytes, record covers {raw}"
        )
    _check_frame_layout(rec)
    try:
        out = zstandard.ZstdDecompressor().decompress(rec.payload, max_output_size=raw)
    except zstandard.ZstdError as e:
        raise ChecksumMismatch(f"{rec.where()}: payload does not decompress ({e})") from None
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
        blk = view[b << shift : (b + 1) << shift]
        if len(blk) < bs:
            blk = memoryview(bytes(blk) + bytes(bs - len(blk)))
        if block_hash(blk) != rec.target_hash(b):
            raise ChecksumMismatch(
                f"{rec.where()}: block {rec.first_block + b} does not match its target hash "
                "after decompression"
            )
    return data


# ---------------------------------------------------------------- journal


@dataclass(frozen=True)
class JournalSlot:
    seq: int
    base_identity: bytes
    target_identity: bytes
    start_block: int
    end_block: int


def encode_journal_slot(s: JournalSlot) -> bytes:
    body = JOURNAL_SLOT.pack(JOURNAL_MAGIC, VERSION, 0, s.seq, s.base_identity,
                             s.target_identity, s.start_block, s.end_block)
    return _with_crc(body).ljust(JOURNAL_SLOT_SIZE, b"\0")


def decode_journal_slot(buf: bytes) -> JournalSlot | None:
    """A valid slot, or None for a slot that is empty or torn (its CRC does not match)."""
    if len(buf) < JOURNAL_SLOT.size + CRC.size:
        return None
    body = buf[: JOURNAL_SLOT.size]
    magic, version, _, seq, base, target, start, end = JOURNAL_SLOT.unpack(body)
    if magic != JOURNAL_MAGIC or version != VERSION:
        return None
    if crc32c(body) != CRC.unpack_from(buf, JOURNAL_SLOT.size)[0]:
        return None
    return JournalSlot(seq, base, target, start, end)
