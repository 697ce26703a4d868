"""The codec on bytes: golden fixtures decode and re-encode byte for byte, regenerate byte for
byte, apply to their targets, and every malformed input is refused with a FormatError that
names what is wrong and where."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import re
import struct
import subprocess
import sys
import tempfile
import tracemalloc
from array import array
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsepatch import api
from sparsepatch.errors import (
    AuthenticationError,
    BadMagic,
    ChecksumMismatch,
    FormatError,
    KeyRequired,
    SparsePatchError,
    Truncated,
    UnsupportedVersion,
    UsageError,
)
from sparsepatch.format import (
    CRC,
    FRAME_END,
    FRAME_START,
    HASH_LEN,
    JOURNAL_SLOT_SIZE,
    KNOWN_PATCH_FLAGS,
    MAC_LEN,
    MAX_RECORD_BLOCKS,
    MAX_SIG_DATA_RUN,
    PAGE_SIZE,
    PATCH_HEADER,
    PATCH_TRAILER,
    REC_COPY,
    REC_DATA,
    REC_NAMES,
    REC_ZERO,
    RECORD,
    SIG_DATA,
    SIG_END,
    SIG_HEADER,
    SIG_HOLE,
    SIG_RUN,
    SIG_TRAILER,
    ZERO_HASH,
    FrameDecoder,
    JournalSlot,
    MacChain,
    PatchReader,
    PatchTrailer,
    Record,
    SigHeader,
    SignatureEncoder,
    crc32c,
    data_record_max_blocks,
    decode_data,
    decode_journal,
    derive_mac_key,
    encode_journal_slot,
    encode_patch_header,
    encode_patch_trailer,
    encode_record,
    encode_sig_header,
    hash_block,
    hash_pages,
    identity_hasher,
    payload_limit,
    read_signature,
    shift_for_block_size,
    tree_hash,
)
from sparsepatch.format import assemble as assemble_pages

_spec = importlib.util.spec_from_file_location("make_fixtures", Path(__file__).with_name("make_fixtures.py"))
assert _spec is not None and _spec.loader is not None
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)

NAMES = sorted(mf.CASES)
SIG_FILES = ("base.sig", "target.sig")

# What each case's patch must hold: (kind, first block, block count, copy source block).
EXPECTED_RECORDS: dict[str, list[tuple[str, int, int, int]]] = {
    "empty-file": [],
    "hole-at-start": [("data", 1, 1, 0)],
    "hole-at-end": [("data", 1, 1, 0)],
    "unaligned-size": [("data", 3, 1, 0)],
    "grows": [("data", 3, 1, 0), ("data", 5, 1, 0)],
    "shrinks": [("data", 1, 1, 0)],
    "copy-record": [("copy", 4, 2, 1)],
    "zero-record": [("zero", 1, 2, 0)],
    "data-record": [("data", 1, 2, 0)],
    "full-patch": [("data", 1, 1, 0), ("data", 3, 1, 0)],
    "unchanged": [],
    "mixed": [("data", 0, 1, 0), ("zero", 3, 1, 0), ("copy", 4, 1, 1), ("zero", 5, 1, 0),
              ("data", 7, 1, 0)],
    "spec-example": [("data", 1, 1, 0)],
    "mac-patch": [("data", 1, 1, 0)],
    "block-16k": [("data", 0, 1, 0), ("zero", 2, 1, 0), ("copy", 3, 1, 1), ("data", 6, 1, 0)],
}


def fixture(name: str, file: str) -> bytes:
    return (mf.FIXTURES / name / file).read_bytes()


def case_of(name: str) -> dict[str, Any]:
    case: dict[str, Any] = json.loads(fixture(name, "case.json"))
    return case


def key_path(name: str) -> Path | None:
    """The key file of an authenticated fixture, None for the others."""
    return mf.FIXTURES / name / mf.KEY_FILE if "key" in mf.CASES[name] else None


def key_of(name: str) -> bytes | None:
    path = key_path(name)
    return derive_mac_key(path.read_bytes()) if path else None


def parse_patch(data: bytes, key: bytes | None = None) -> tuple[PatchReader, list[Record]]:
    reader = PatchReader(io.BytesIO(data).read, "patch", key)
    return reader, list(reader.records())


def encode_patch(reader: PatchReader, records: list[Record], key: bytes | None) -> bytes:
    """A decoded patch encoded again, with its Tag chain when it has one."""
    assert reader.trailer is not None
    chain = MacChain(key) if key is not None else None
    out = b""
    for element in (encode_patch_header(reader.header), *map(encode_record, records),
                    encode_patch_trailer(reader.trailer)):
        out += element + (chain.next(element) if chain else b"")
    return out


zstd_independent = mf.zstd_independent


def parse_sig(data: bytes) -> Any:
    return read_signature(io.BytesIO(data).read, "signature")


def decode_all(data: bytes) -> None:
    """Read a patch to its trailer and decompress every DATA payload."""
    reader, records = parse_patch(data)
    frames = FrameDecoder(reader.header)
    for rec in records:
        if rec.kind == REC_DATA:
            frames.decode(rec)


def decode_payload(header: Any, rec: Record, before: list[Record] | None = None) -> bytes:
    """rec's literal, decoded after the records before it in its patch (their frames)."""
    frames = FrameDecoder(header)
    for r in before or []:
        if r.kind == REC_DATA:
            frames.decode(r)
    return frames.decode(rec)


def decode_stream(header: Any, records: list[Record]) -> list[bytes]:
    """Every DATA record's target bytes, in order, through one frame decoder."""
    frames = FrameDecoder(header)
    return [decode_data(frames, r) for r in records if r.kind == REC_DATA]


def refuses(cls: type[SparsePatchError], fn: Any, *fragments: str) -> SparsePatchError:
    """fn() raises exactly cls, with every fragment in its message."""
    with pytest.raises(SparsePatchError) as info:
        fn()
    err = info.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    for frag in fragments:
        assert frag in str(err), f"{frag!r} not in {str(err)!r}"
    return err


def flip(data: bytes, pos: int, mask: int = 0xFF) -> bytes:
    buf = bytearray(data)
    buf[pos] ^= mask
    return bytes(buf)


def rewrite_header(data: bytes, header: struct.Struct, fmt: str, offset: int, value: int) -> bytes:
    """Set a header field and recompute the header CRC, so only the field's own check fires."""
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    CRC.pack_into(buf, header.size, crc32c(bytes(buf[: header.size])))
    return bytes(buf)


def rewrite_record(data: bytes, rec: Record, **fields: int) -> bytes:
    """Change fields of a record's fixed part and recompute its CRC over the original hashes."""
    names = ("kind", "flags", "first_block", "count", "payload_len", "source_block")
    values = dict(zip(names, RECORD.unpack_from(data, rec.offset), strict=True))
    values.update(fields)
    head = RECORD.pack(*(values[n] for n in names))
    buf = bytearray(data)
    buf[rec.offset : rec.offset + RECORD.size] = head
    CRC.pack_into(buf, rec.offset + RECORD.size + len(rec.meta), crc32c(rec.meta, crc32c(head)))
    return bytes(buf)


def assemble(header: Any, records: list[Record], trailer: dict[str, int] | None = None) -> bytes:
    """A patch from decoded parts, with a trailer that agrees unless told otherwise."""
    body = encode_patch_header(header) + b"".join(encode_record(r) for r in records)
    blocks = {k: sum(r.count for r in records if r.kind == k) for k in REC_NAMES}
    t = PatchTrailer(len(records), blocks[REC_DATA], blocks[REC_ZERO], blocks[REC_COPY],
                     sum(len(r.payload) for r in records), len(body))
    return body + encode_patch_trailer(dataclasses.replace(t, **(trailer or {})))


def sig_trailer_fields(data: bytes) -> list[Any]:
    return list(SIG_TRAILER.unpack_from(data, len(data) - SIG_TRAILER.size - CRC.size))


def make_sig(shift: int, size: int, runs: list[tuple[int, int, int, bytes]],
             blocks: int, data_blocks: int) -> bytes:
    """A signature from explicit runs (canonical or not) with a consistent identity and CRCs."""
    out = encode_sig_header(SigHeader(shift, size))
    for kind, first, count, payload in runs:
        head = SIG_RUN.pack(kind, first, count)
        out += head + payload + CRC.pack(crc32c(payload, crc32c(head)))
    hasher = identity_hasher()
    hasher.update(out)
    fields = sig_trailer_fields(fixture("mixed", "base.sig"))
    fields[0], fields[1], fields[2], fields[-1] = SIG_END, blocks, data_blocks, hasher.digest()
    body = SIG_TRAILER.pack(*fields)
    return out + body + CRC.pack(crc32c(body))


def with_sig_trailer(data: bytes, index: int, value: Any) -> bytes:
    fields = sig_trailer_fields(data)
    fields[index] = value
    body = SIG_TRAILER.pack(*fields)
    return data[: len(data) - SIG_TRAILER.size - CRC.size] + body + CRC.pack(crc32c(body))


def block_state(content: bytes, block: int, bs: int) -> bytes:
    """The hash the format gives a block of content: ZERO_HASH for zeros or a hole."""
    blk = content[block * bs : (block + 1) * bs].ljust(bs, b"\0")
    return ZERO_HASH if blk == bytes(bs) else hash_block(blk, bs)


def payload_ranges(records: list[Record]) -> list[range]:
    return [range(r.offset + RECORD.size + len(r.meta) + CRC.size,
                  r.offset + RECORD.size + len(r.meta) + CRC.size + len(r.payload))
            for r in records if r.payload]


# ---------------------------------------------------------------- the fixture set


def test_fixture_folders_match_the_case_maps() -> None:
    found = {p.name for p in mf.FIXTURES.iterdir() if p.is_dir()}
    assert found == set(mf.CASES)
    for name, case in mf.CASES.items():
        assert sorted(p.name for p in (mf.FIXTURES / name).iterdir()) == sorted(mf.files_of(case))
        assert case_of(name) == case, f"{name}: case.json is stale, run make fixtures"
    assert set(EXPECTED_RECORDS) == set(mf.CASES)
    block_sizes = {case["block_size"] for case in mf.CASES.values()}
    assert {4096, 16384} <= block_sizes
    assert any("key" in case for case in mf.CASES.values())


@pytest.mark.parametrize("name", NAMES)
def test_regenerating_gives_the_same_files(name: str, tmp_path: Path) -> None:
    """Byte for byte, except what spec section 5.2 lets vary with the zstd version: payload
    bytes, and the lengths, CRCs and Tags that depend on them."""
    mf.generate(case_of(name), tmp_path / name)
    for file in mf.files_of(case_of(name)):
        if file != "patch.bin":
            assert (tmp_path / name / file).read_bytes() == fixture(name, file), f"{name}/{file}"
    key = key_of(name)
    fresh = (tmp_path / name / "patch.bin").read_bytes()
    assert zstd_independent(fresh, key) == zstd_independent(fixture(name, "patch.bin"), key)


@pytest.mark.parametrize("file", SIG_FILES)
@pytest.mark.parametrize("name", NAMES)
def test_signature_reencodes_byte_identical(name: str, file: str) -> None:
    data = fixture(name, file)
    sig = parse_sig(data)
    enc = SignatureEncoder(sig.header)
    out = enc.start() + enc.data_many(sig.data_index, sig.pages)
    tail, identity = enc.finish(sig.mtime_ns)
    assert out + tail == data
    assert identity == sig.identity


@pytest.mark.parametrize("name", NAMES)
def test_patch_reencodes_byte_identical(name: str) -> None:
    data = fixture(name, "patch.bin")
    reader, records = parse_patch(data, key_of(name))
    assert encode_patch(reader, records, key_of(name)) == data


@pytest.mark.parametrize("file", SIG_FILES)
@pytest.mark.parametrize("name", NAMES)
def test_signature_describes_its_file(name: str, file: str) -> None:
    case = case_of(name)
    spec = case["base" if file == "base.sig" else "target"]
    content, bs = mf.file_bytes(spec), case["block_size"]
    sig = parse_sig(fixture(name, file))
    mtime = case.get("mtime_ns", mf.MTIME_NS)
    assert (sig.block_size, sig.header.file_size, sig.mtime_ns) == (bs, spec["size"], mtime)
    states = [block_state(content, i, bs) for i in range(sig.header.block_count)]
    assert list(sig.data_index) == [i for i, h in enumerate(states) if h != ZERO_HASH]
    assert bytes(sig.hashes) == b"".join(h for h in states if h != ZERO_HASH)
    # What the signature stores: the page hashes of each data block, the block hash their tree hash.
    width = bs // PAGE_SIZE * HASH_LEN
    for k, i in enumerate(sig.data_index):
        blk = content[i * bs : (i + 1) * bs]
        pages = sig.pages[k * width : (k + 1) * width]
        assert pages == hash_pages(blk, bs)
        assert sig.hashes[k * HASH_LEN : (k + 1) * HASH_LEN] == tree_hash(pages)
    assert len(sig.pages) == len(sig.data_index) * (bs // PAGE_SIZE) * HASH_LEN


@pytest.mark.parametrize("name", NAMES)
def test_patch_identities_and_sizes_match_the_signatures(name: str) -> None:
    case = case_of(name)
    reader, _ = parse_patch(fixture(name, "patch.bin"), key_of(name))
    h = reader.header
    base, target = parse_sig(fixture(name, "base.sig")), parse_sig(fixture(name, "target.sig"))
    assert h.base_identity == base.identity
    assert h.target_identity == target.identity
    assert (h.block_size, h.base_size, h.target_size) == (
        case["block_size"], case["base"]["size"], case["target"]["size"])
    assert h.full == bool(case.get("full"))
    assert h.authenticated == ("key" in case)
    assert h.base_mtime_ns == (0 if h.full else case.get("mtime_ns", mf.MTIME_NS))


@pytest.mark.parametrize("name", NAMES)
def test_patch_holds_the_expected_records(name: str) -> None:
    case = case_of(name)
    bs = case["block_size"]
    base, target = mf.file_bytes(case["base"]), mf.file_bytes(case["target"])
    reader, records = parse_patch(fixture(name, "patch.bin"), key_of(name))
    got = [(REC_NAMES[r.kind], r.first_block, r.count, r.source_block) for r in records]
    assert got == EXPECTED_RECORDS[name]
    t = reader.trailer
    assert t is not None and t.records == len(records)
    assert (t.data_blocks, t.zero_blocks, t.copy_blocks) == tuple(
        sum(r.count for r in records if r.kind == k) for k in (REC_DATA, REC_ZERO, REC_COPY))
    frames = FrameDecoder(reader.header)
    for rec in records:
        for k in range(rec.count):
            block = rec.first_block + k
            assert rec.base_hash(k) == block_state(base, block, bs)
            assert rec.target_hash(k) == block_state(target, block, bs)
            if rec.kind == REC_COPY:
                assert rec.target_hash(k) == block_state(base, rec.source_block + k, bs)
        if rec.kind == REC_DATA:
            start = rec.first_block * bs
            literal = decode_data(frames, rec)
            made = b"".join(b or b"" for _, b in assemble_pages(reader.header, rec, literal, None))
            assert made == target[start : start + rec.count * bs].ljust(rec.count * bs, b"\0")


@pytest.mark.parametrize("name", NAMES)
def test_applying_the_fixture_patch_gives_the_target(name: str, tmp_path: Path) -> None:
    case = case_of(name)
    dest = mf.make_file(tmp_path / "dest", case["base"], case.get("mtime_ns", mf.MTIME_NS))
    (tmp_path / "patch.bin").write_bytes(fixture(name, "patch.bin"))
    key = key_path(name)
    api.apply(str(tmp_path / "patch.bin"), str(dest), verify=True, key_file=key and str(key))
    assert dest.read_bytes() == mf.file_bytes(case["target"])


# ---------------------------------------------------------------- refusals: headers


def test_bad_magic() -> None:
    patch, sig = fixture("data-record", "patch.bin"), fixture("data-record", "base.sig")
    bad = b"\x89SPXXX\r\n"
    refuses(BadMagic, lambda: parse_patch(bad + patch[8:]), "patch", "unknown magic", bad.hex(),
            "at byte 0")
    refuses(BadMagic, lambda: parse_sig(bad + sig[8:]), "signature", "unknown magic", bad.hex(),
            "at byte 0")


def test_signature_where_a_patch_is_expected() -> None:
    sig = fixture("mixed", "base.sig")
    assert len(sig) >= PATCH_HEADER.size + CRC.size
    refuses(BadMagic, lambda: parse_patch(sig), "expected a patch, found a signature", "byte 0")


def test_patch_where_a_signature_is_expected() -> None:
    patch = fixture("empty-file", "patch.bin")
    refuses(BadMagic, lambda: parse_sig(patch), "expected a signature, found a patch", "byte 0")


def test_short_input_is_judged_by_its_magic() -> None:
    sig = fixture("empty-file", "base.sig")
    assert len(sig) < PATCH_HEADER.size + CRC.size
    refuses(BadMagic, lambda: parse_patch(sig), "expected a patch, found a signature")
    refuses(BadMagic, lambda: parse_patch(b"GIF89a"), "unknown magic 474946383961 at byte 0")
    refuses(BadMagic, lambda: parse_sig(b"\x89PNG"), "unknown magic 89504e47 at byte 0")
    refuses(Truncated, lambda: parse_sig(b"\x89SPSIG"), "signature is truncated", "at byte 6")
    refuses(Truncated, lambda: parse_patch(b""), "patch is empty")
    refuses(Truncated, lambda: parse_sig(b""), "signature is empty")


def test_user_gets_a_wrong_kind_error_from_the_api(tmp_path: Path) -> None:
    dest = mf.make_file(tmp_path / "dest", mf.CASES["mixed"]["base"])
    before = dest.read_bytes()
    sig_path = mf.FIXTURES / "mixed" / "base.sig"
    refuses(BadMagic, lambda: api.apply(str(sig_path), str(dest)), str(sig_path),
            "expected a patch, found a signature")
    assert dest.read_bytes() == before
    patch_path = mf.FIXTURES / "mixed" / "patch.bin"
    refuses(BadMagic, lambda: api.diff(str(patch_path), str(dest), str(tmp_path / "p")),
            str(patch_path), "expected a signature, found a patch")
    assert not (tmp_path / "p").exists()


def test_version_1_is_refused_with_what_to_do() -> None:
    patch = rewrite_header(fixture("data-record", "patch.bin"), PATCH_HEADER, "<H", 8, 1)
    refuses(UnsupportedVersion, lambda: parse_patch(patch),
            "patch: patch format version 1 is not supported (this sparsepatch reads version 2); "
            "make the patch again from a new signature")
    sig = rewrite_header(fixture("data-record", "base.sig"), SIG_HEADER, "<H", 8, 1)
    refuses(UnsupportedVersion, lambda: parse_sig(sig),
            "signature: signature format version 1 is not supported (this sparsepatch reads "
            "version 2); make the signature again")


def test_a_newer_version_is_refused() -> None:
    patch = rewrite_header(fixture("data-record", "patch.bin"), PATCH_HEADER, "<H", 8, 3)
    refuses(UnsupportedVersion, lambda: parse_patch(patch), "patch format version 3 is not supported",
            "a newer sparsepatch made it")
    sig = rewrite_header(fixture("data-record", "base.sig"), SIG_HEADER, "<H", 8, 3)
    refuses(UnsupportedVersion, lambda: parse_sig(sig), "signature format version 3 is not supported",
            "a newer sparsepatch made it")


def test_version_1_files_are_refused_by_the_command_line(tmp_path: Path) -> None:
    """What a user holding a version 1 signature or patch sees: one line naming the file
    and what to do, exit 4, and the destination untouched."""
    dest = mf.make_file(tmp_path / "dest", mf.CASES["data-record"]["base"])
    before = dest.read_bytes()
    sig = tmp_path / "base.sig"
    sig.write_bytes(rewrite_header(fixture("data-record", "base.sig"), SIG_HEADER, "<H", 8, 1))
    patch = tmp_path / "x.patch"
    patch.write_bytes(rewrite_header(fixture("data-record", "patch.bin"), PATCH_HEADER, "<H", 8, 1))
    cases = [
        (["diff", str(sig), str(dest), "-o", str(tmp_path / "out")],
         f"{sig}: signature format version 1 is not supported (this sparsepatch reads version 2); "
         "make the signature again"),
        (["apply", str(patch), str(dest)],
         f"{patch}: patch format version 1 is not supported (this sparsepatch reads version 2); "
         "make the patch again from a new signature"),
    ]
    for args, message in cases:
        r = subprocess.run([sys.executable, "-m", "sparsepatch", *args], capture_output=True,
                           text=True, check=False)
        assert r.returncode == 4, r.stderr
        assert r.stderr.strip().splitlines() == [f"sparsepatch: error: {message}"]
    assert dest.read_bytes() == before
    assert not (tmp_path / "out").exists()


def test_unknown_flag_bits_are_refused() -> None:
    unknown = next(1 << i for i in range(16) if not KNOWN_PATCH_FLAGS & (1 << i))
    patch = rewrite_header(fixture("data-record", "patch.bin"), PATCH_HEADER, "<H", 10, unknown)
    refuses(UnsupportedVersion, lambda: parse_patch(patch), f"flags {unknown:#06x} at byte 10",
            "unknown bits")
    sig = rewrite_header(fixture("data-record", "base.sig"), SIG_HEADER, "<H", 10, 1)
    refuses(UnsupportedVersion, lambda: parse_sig(sig), "signature flags 0x0001 at byte 10",
            "unknown bits")


@pytest.mark.parametrize("pos", [16, 40, PATCH_HEADER.size])  # base size, an identity, the CRC
def test_patch_header_crc(pos: int) -> None:
    patch = flip(fixture("data-record", "patch.bin"), pos, 0x01)
    refuses(ChecksumMismatch, lambda: parse_patch(patch), "patch header at byte 0", "CRC-32C mismatch")


@pytest.mark.parametrize("pos", [13, 16, SIG_HEADER.size])  # hash length, file size, the CRC
def test_signature_header_crc(pos: int) -> None:
    sig = flip(fixture("data-record", "base.sig"), pos, 0x01)
    refuses(ChecksumMismatch, lambda: parse_sig(sig), "signature header at byte 0", "CRC-32C mismatch")


@pytest.mark.parametrize("shift", [0, 11, 25, 255])
def test_block_shift_out_of_range(shift: int) -> None:
    patch = rewrite_header(fixture("data-record", "patch.bin"), PATCH_HEADER, "<B", 12, shift)
    refuses(FormatError, lambda: parse_patch(patch), "patch header at byte 12", f"2^{shift}",
            "block_shift 12..24")
    sig = rewrite_header(fixture("data-record", "base.sig"), SIG_HEADER, "<B", 12, shift)
    refuses(FormatError, lambda: parse_sig(sig), "signature header at byte 12", f"2^{shift}",
            "block_shift 12..24")


@pytest.mark.parametrize("size", [(1 << 60) + 1, 1 << 63, (1 << 64) - 1])
def test_absurd_sizes(size: int) -> None:
    patch = fixture("data-record", "patch.bin")
    refuses(FormatError, lambda: parse_patch(rewrite_header(patch, PATCH_HEADER, "<Q", 24, size)),
            f"target size {size} exceeds the limit", "at byte 24")
    refuses(FormatError, lambda: parse_patch(rewrite_header(patch, PATCH_HEADER, "<Q", 16, size)),
            f"base size {size} exceeds the limit", "at byte 16")
    sig = fixture("data-record", "base.sig")
    refuses(FormatError, lambda: parse_sig(rewrite_header(sig, SIG_HEADER, "<Q", 16, size)),
            f"file size {size} exceeds the limit", "at byte 16")


def test_other_header_fields() -> None:
    patch = fixture("data-record", "patch.bin")
    refuses(UnsupportedVersion, lambda: parse_patch(rewrite_header(patch, PATCH_HEADER, "<B", 13, 2)),
            "byte 13", "unknown compression 2")
    refuses(FormatError, lambda: parse_patch(rewrite_header(patch, PATCH_HEADER, "<B", 15, 1)),
            "byte 15", "reserved field is not zero")
    for window_log in (1, 9, 28, 255):
        refuses(FormatError,
                lambda w=window_log: parse_patch(rewrite_header(patch, PATCH_HEADER, "<B", 14, w)),
                "byte 14", f"window_log {window_log} is outside 0 or 10..27")
    full = fixture("full-patch", "patch.bin")
    refuses(FormatError, lambda: parse_patch(rewrite_header(full, PATCH_HEADER, "<Q", 16, 4096)),
            "byte 16", "full patch must have base size 0")
    sig = fixture("data-record", "base.sig")
    refuses(FormatError, lambda: parse_sig(rewrite_header(sig, SIG_HEADER, "<B", 13, 20)),
            "byte 13", "hash length 20")
    for page_shift in (0, 11, 13, 255):
        refuses(FormatError, lambda v=page_shift: parse_sig(rewrite_header(sig, SIG_HEADER, "<B", 14, v)),
                "signature header at byte 14", f"page size 2^{page_shift}, expected 2^12")
    refuses(FormatError, lambda: parse_sig(rewrite_header(sig, SIG_HEADER, "<B", 15, 1)),
            "byte 15", "reserved byte is not zero")


# ---------------------------------------------------------------- refusals: records and runs


@pytest.mark.parametrize("index", range(len(EXPECTED_RECORDS["mixed"])))
def test_record_crc(index: int) -> None:
    patch = fixture("mixed", "patch.bin")
    rec = parse_patch(patch)[1][index]
    where = f"record {index} ({REC_NAMES[rec.kind]}) at byte {rec.offset}"
    meta = rec.offset + RECORD.size
    for pos in (meta, meta + len(rec.meta) - 1, meta + len(rec.meta)):
        # the first hash, the last hash, the CRC itself (the fixed fields are range-checked first)
        refuses(ChecksumMismatch, lambda p=pos: parse_patch(flip(patch, p, 0x01)), where,
                "CRC-32C mismatch")


def test_signature_run_crc() -> None:
    sig = fixture("mixed", "base.sig")
    at = SIG_HEADER.size + CRC.size
    refuses(ChecksumMismatch, lambda: parse_sig(flip(sig, at + SIG_RUN.size, 0x01)),
            f"run 0 at byte {at}", "CRC-32C mismatch")


def test_record_beyond_the_target() -> None:
    patch = fixture("data-record", "patch.bin")  # 3 target blocks; DATA record at 1, 2 blocks
    rec = parse_patch(patch)[1][0]
    where = f"record 0 (data) at byte {rec.offset}"
    refuses(FormatError, lambda: parse_patch(rewrite_record(patch, rec, count=3)), where,
            "blocks 1..3 lie beyond the target (3 blocks, 12288 bytes)")
    refuses(FormatError, lambda: parse_patch(rewrite_record(patch, rec, first_block=3, count=1)),
            where, "blocks 3..3 lie beyond the target")
    refuses(FormatError, lambda: parse_patch(rewrite_record(patch, rec, first_block=(1 << 64) - 1)),
            where, "lie beyond the target")
    limit = data_record_max_blocks(12)
    for count in (0, limit + 1, (1 << 32) - 1):
        refuses(FormatError, lambda c=count: parse_patch(rewrite_record(patch, rec, count=c)), where,
                f"block count {count} is outside 1..{limit}")


def test_record_fields() -> None:
    patch = fixture("data-record", "patch.bin")
    rec = parse_patch(patch)[1][0]
    where = f"record 0 (data) at byte {rec.offset}"
    limit = payload_limit(2 * 4096, frame_start=True)
    for n in (0, limit + 1, (1 << 32) - 1):
        # Over the most any record of 2 blocks may carry: refused on the header alone.
        lo = 1 if n == 0 else 0
        refuses(FormatError, lambda n=n: parse_patch(rewrite_record(patch, rec, payload_len=n)),
                where, f"payload length {n} is outside {lo}..{limit}")
    refuses(FormatError, lambda: parse_patch(rewrite_record(patch, rec, source_block=5)), where,
            "5 moved pages, more than its 2 pages")
    refuses(FormatError, lambda: parse_patch(rewrite_record(patch, rec, kind=7)),
            f"record 0 at byte {rec.offset}", "unknown record kind 7")
    refuses(FormatError, lambda: parse_patch(flip(patch, rec.offset + 2, 0x01)), where,
            "reserved bytes are not zero")
    refuses(FormatError, lambda: parse_patch(flip(patch, rec.offset + 3, 0x80)), where,
            "reserved bytes are not zero")
    for bit in range(2, 8):
        refuses(FormatError, lambda b=bit: parse_patch(rewrite_record(patch, rec, flags=rec.flags | 1 << b)),
                where, "has unknown bits set")
    h, recs = parse_patch(patch)
    zero_target = dataclasses.replace(recs[0], meta=recs[0].meta[:HASH_LEN] + ZERO_HASH
                                      + recs[0].meta[2 * HASH_LEN :])
    refuses(FormatError, lambda: parse_patch(assemble(h.header, [zero_target])), where,
            "block 1 has the zero hash as target")

    zpatch = fixture("zero-record", "patch.bin")
    zrec = parse_patch(zpatch)[1][0]
    zwhere = f"record 0 (zero) at byte {zrec.offset}"
    refuses(FormatError, lambda: parse_patch(rewrite_record(zpatch, zrec, payload_len=5)), zwhere,
            "payload length 5, expected 0")
    refuses(FormatError, lambda: parse_patch(rewrite_record(zpatch, zrec, count=MAX_RECORD_BLOCKS + 1)),
            zwhere, f"block count {MAX_RECORD_BLOCKS + 1} is outside 1..{MAX_RECORD_BLOCKS}")


def test_copy_source_fields() -> None:
    patch = fixture("copy-record", "patch.bin")  # COPY of blocks 1..2 to 4..5; 6 base blocks
    rec = parse_patch(patch)[1][0]
    where = f"record 0 (copy) at byte {rec.offset}"
    refuses(FormatError, lambda: parse_patch(rewrite_record(patch, rec, source_block=5)), where,
            "copy source blocks 5..6 lie beyond the base")
    refuses(FormatError, lambda: parse_patch(rewrite_record(patch, rec, source_block=(1 << 64) - 1)),
            where, "lie beyond the base")
    refuses(FormatError, lambda: parse_patch(rewrite_record(patch, rec, source_block=3)), where,
            "copy source overlaps its own destination")


def test_records_out_of_order_or_overlapping() -> None:
    reader, recs = parse_patch(fixture("mixed", "patch.bin"))
    h = reader.header
    dup = assemble(h, [recs[0], recs[0], *recs[1:]])
    refuses(FormatError, lambda: parse_patch(dup), "record 1 (data)",
            "starts at block 0, before the end of the previous record (block 1)", "overlap")
    swapped = assemble(h, [recs[0], recs[2], recs[1], *recs[3:]])
    refuses(FormatError, lambda: parse_patch(swapped), "record 2 (zero)",
            "starts at block 3, before the end of the previous record (block 5)", "out of order")
    inside = dataclasses.replace(recs[1], first_block=0)  # inside a record further back
    refuses(FormatError, lambda: parse_patch(assemble(h, [recs[0], recs[2], inside])),
            "record 2 (zero)", "starts at block 0")


def test_copies_must_not_depend_on_record_order() -> None:
    reader, recs = parse_patch(fixture("copy-record", "patch.bin"))
    h, copy = reader.header, recs[0]
    target = copy.meta[HASH_LEN : 2 * HASH_LEN]
    reads_4 = Record(REC_COPY, 0, 1, ZERO_HASH + target, source_block=4)
    zero_4 = Record(REC_ZERO, 4, 1, target)
    refuses(FormatError, lambda: parse_patch(assemble(h, [reads_4, zero_4])), "record 1 (zero)",
            "changes a block an earlier copy record reads from")
    zero_0 = Record(REC_ZERO, 0, 1, target)
    reads_0 = Record(REC_COPY, 2, 1, ZERO_HASH + target, source_block=0)
    refuses(FormatError, lambda: parse_patch(assemble(h, [zero_0, reads_0])), "record 1 (copy)",
            "copies from a block an earlier record changes")


@pytest.mark.parametrize("field", ["records", "data_blocks", "zero_blocks", "copy_blocks",
                                   "payload_bytes", "body_bytes"])
def test_patch_trailer_counts_that_disagree(field: str) -> None:
    reader, recs = parse_patch(fixture("mixed", "patch.bin"))
    assert reader.trailer is not None
    assert assemble(reader.header, recs) == fixture("mixed", "patch.bin")
    bad = assemble(reader.header, recs, {field: getattr(reader.trailer, field) + 1})
    refuses(FormatError, lambda: parse_patch(bad), f"trailer at byte {reader.trailer.body_bytes}",
            f"{field}={getattr(reader.trailer, field) + 1}", "disagree")
    refuses(ChecksumMismatch, lambda: parse_patch(flip(bad, len(bad) - 1, 0x01)), "trailer",
            "CRC-32C mismatch")


def test_signature_trailer() -> None:
    sig = fixture("mixed", "base.sig")
    at = len(sig) - SIG_TRAILER.size - CRC.size
    fields = sig_trailer_fields(sig)
    assert parse_sig(with_sig_trailer(sig, 1, fields[1])) is not None
    refuses(FormatError, lambda: parse_sig(with_sig_trailer(sig, 1, fields[1] + 1)),
            f"trailer at byte {at}", f"counts {fields[1] + 1} blocks", "disagree")
    refuses(FormatError, lambda: parse_sig(with_sig_trailer(sig, 2, fields[2] - 1)),
            f"trailer at byte {at}", f"{fields[2] - 1} data", "disagree")
    refuses(ChecksumMismatch, lambda: parse_sig(with_sig_trailer(sig, -1, bytes(32))),
            f"trailer at byte {at}", "identity mismatch")
    refuses(ChecksumMismatch, lambda: parse_sig(flip(sig, len(sig) - 1, 0x01)),
            f"trailer at byte {at}", "CRC-32C mismatch")


def test_signature_runs() -> None:
    h = b"\x01" * HASH_LEN
    ok = make_sig(12, 4 * 4096, [(SIG_DATA, 0, 1, h), (SIG_HOLE, 1, 3, b"")], 4, 1)
    assert list(parse_sig(ok).data_index) == [0]
    at1 = SIG_HEADER.size + CRC.size + SIG_RUN.size + HASH_LEN + CRC.size
    cases = [
        ([(SIG_HOLE, 0, 1, b""), (SIG_HOLE, 1, 3, b"")], 4, 0,
         f"run 1 at byte {SIG_HEADER.size + CRC.size + SIG_RUN.size + CRC.size}",
         "hole run follows a short hole run (not canonical)"),
        ([(SIG_DATA, 0, 1, h), (SIG_HOLE, 2, 2, b"")], 4, 1, f"run 1 at byte {at1}",
         "starts at block 2, expected 1"),
        ([(SIG_DATA, 0, 1, h), (SIG_HOLE, 1, 4, b"")], 4, 1, f"run 1 at byte {at1}",
         "block count 4 is outside 1..3"),
        ([(SIG_DATA, 0, 1, h), (SIG_HOLE, 1, 0, b"")], 4, 1, f"run 1 at byte {at1}",
         "block count 0 is outside 1..3"),
        ([(SIG_DATA, 0, 2, h + ZERO_HASH), (SIG_HOLE, 2, 2, b"")], 4, 2, "run 0",
         "block 1 has only zero page hashes in a data run"),
        ([(3, 0, 4, b"")], 4, 0, "run 0", "unknown run kind 3"),
        ([(SIG_DATA, 0, 1, h), (SIG_DATA, 1, 1, h), (SIG_HOLE, 2, 2, b"")], 4, 2,
         f"run 1 at byte {at1}", "data run follows a short data run (not canonical)"),
    ]
    for runs, blocks, data_blocks, *fragments in cases:
        sig = make_sig(12, 4 * 4096, runs, blocks, data_blocks)
        refuses(FormatError, lambda s=sig: parse_sig(s), *fragments)
    n = MAX_SIG_DATA_RUN + 1
    big = make_sig(12, n * 4096, [(SIG_DATA, 0, n, b"")], n, n)  # refused before its hashes are read
    refuses(FormatError, lambda: parse_sig(big), "run 0",
            f"{n} blocks exceed the data run limit of {n - 1}")


@pytest.mark.parametrize(("shift", "limit"), [(12, 4096), (14, 1024), (20, 16), (24, 1)])
def test_signature_data_runs_hold_at_most_64_kib_of_page_hashes(shift: int, limit: int) -> None:
    """The run limit is in blocks of 2^(shift-12) page hashes each: max(1, 4096 // P)."""
    per = 1 << (shift - 12)
    page = b"\x01" * HASH_LEN
    bs = 1 << shift
    blocks = limit + 1
    full = make_sig(shift, blocks * bs, [(SIG_DATA, 0, limit, page * per * limit),
                                         (SIG_DATA, limit, 1, page * per)], blocks, blocks)
    assert len(parse_sig(full).data_index) == blocks
    assert len(parse_sig(full).pages) == blocks * per * HASH_LEN
    over = make_sig(shift, blocks * bs, [(SIG_DATA, 0, blocks, b"")], blocks, blocks)
    refuses(FormatError, lambda: parse_sig(over), "run 0",
            f"{blocks} blocks exceed the data run limit of {limit}")
    if limit > 1:  # a short data run followed by another is not canonical
        short = make_sig(shift, blocks * bs, [(SIG_DATA, 0, 1, page * per),
                                              (SIG_DATA, 1, limit, page * per * limit)], blocks, blocks)
        refuses(FormatError, lambda: parse_sig(short), "run 1",
                "data run follows a short data run (not canonical)")
    # The encoder cuts where the reader expects.
    enc = SignatureEncoder(SigHeader(shift, blocks * bs))
    out = enc.start() + enc.data_many(array("Q", range(blocks)), page * per * blocks)
    out += enc.finish(parse_sig(full).mtime_ns)[0]
    assert out == full


def test_a_data_block_needs_one_non_zero_page_hash() -> None:
    """At 16 KiB blocks (4 pages): zero page hashes are fine within a block that has one
    other page, and a block of only zero pages is a hole, so a data run may not hold it."""
    h = b"\x01" * HASH_LEN
    bs = 16384
    some = ZERO_HASH + h + ZERO_HASH * 2
    ok = make_sig(14, 2 * bs, [(SIG_DATA, 0, 2, some + h * 4)], 2, 2)
    sig = parse_sig(ok)
    assert sig.pages[: len(some)] == some and sig.hashes[:HASH_LEN] == tree_hash(some) != ZERO_HASH
    # A zero page hash straddling two blocks is not a zero block either.
    straddle = make_sig(14, 2 * bs, [(SIG_DATA, 0, 2, h * 2 + ZERO_HASH * 2 + ZERO_HASH * 2 + h * 2)],
                        2, 2)
    assert list(parse_sig(straddle).data_index) == [0, 1]
    bad = make_sig(14, 2 * bs, [(SIG_DATA, 0, 2, h * 4 + ZERO_HASH * 4)], 2, 2)
    refuses(FormatError, lambda: parse_sig(bad), "run 0",
            "block 1 has only zero page hashes in a data run")


# ---------------------------------------------------------------- truncation and trailing bytes


TRUNCATED = re.compile(r"is truncated: .* at byte (\d+) needs (\d+) bytes, found (\d+)")


def _check_truncated(err: SparsePatchError, length: int) -> None:
    assert type(err) is Truncated, f"{type(err).__name__}: {err}"
    if length == 0:
        assert "is empty" in str(err), str(err)
        return
    m = TRUNCATED.search(str(err))
    assert m, str(err)
    at, needs, found = map(int, m.groups())
    assert at + found == length and found < needs, str(err)


@pytest.mark.parametrize("name", NAMES)
def test_every_prefix_of_a_patch_is_truncated(name: str) -> None:
    patch = fixture(name, "patch.bin")
    for n in range(len(patch)):
        with pytest.raises(SparsePatchError) as info:
            parse_patch(patch[:n], key_of(name))
        _check_truncated(info.value, n)


@pytest.mark.parametrize("name", NAMES)
def test_every_prefix_of_a_signature_is_truncated(name: str) -> None:
    for file in SIG_FILES:
        sig = fixture(name, file)
        for n in range(len(sig)):
            with pytest.raises(SparsePatchError) as info:
                parse_sig(sig[:n])
            _check_truncated(info.value, n)


@pytest.mark.parametrize("extra", [b"\0", b"garbage", fixture("empty-file", "patch.bin")])
def test_trailing_bytes(extra: bytes) -> None:
    patch, sig = fixture("mixed", "patch.bin"), fixture("mixed", "base.sig")
    refuses(FormatError, lambda: parse_patch(patch + extra),
            f"unexpected bytes after the trailer at byte {len(patch)}")
    refuses(FormatError, lambda: parse_sig(sig + extra),
            f"unexpected bytes after the trailer at byte {len(sig)}")


# ---------------------------------------------------------------- single-byte damage


@pytest.mark.parametrize("name", NAMES)
def test_every_flip_outside_payloads_is_refused_by_the_reader(name: str) -> None:
    patch, key = fixture(name, "patch.bin"), key_of(name)
    payload = {p for r in payload_ranges(parse_patch(patch, key)[1]) for p in r}
    for pos in range(len(patch)):
        if pos in payload:
            continue
        for mask in (0x01, 0x80, 0xFF):
            with pytest.raises(FormatError):
                parse_patch(flip(patch, pos, mask), key)
    for file in SIG_FILES:
        sig = fixture(name, file)
        for pos in range(len(sig)):
            for mask in (0x01, 0x80, 0xFF):
                with pytest.raises(FormatError):
                    parse_sig(flip(sig, pos, mask))


@pytest.mark.parametrize("name", ["mixed", "unaligned-size", "grows"])
def test_every_flip_inside_a_payload_is_refused_or_harmless(name: str) -> None:
    """Decoded without the block hashes, through the end of the stream: the frame's
    content checksum covers every record of the frame."""
    reader, records = parse_patch(fixture(name, "patch.bin"))
    data = [r for r in records if r.kind == REC_DATA]
    if name != "unaligned-size":
        assert any(not r.flags & FRAME_END for r in data), "expected a frame across records"

    def literal(stream: list[Record]) -> list[bytes]:
        frames = FrameDecoder(reader.header)
        return [frames.decode(r) for r in stream]

    good = literal(data)
    for i, rec in enumerate(data):
        for pos in range(len(rec.payload)):
            damaged = dataclasses.replace(rec, payload=flip(rec.payload, pos))
            try:
                out = literal(data[:i] + [damaged] + data[i + 1 :])
            except SparsePatchError:
                continue
            assert out == good, f"{name} record {rec.index}: flip at payload byte {pos} went unnoticed"


# ---------------------------------------------------------------- zstd frames


def _huge_frame(declared: int) -> bytes:
    cobj = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=declared)
    return cobj.compress(b"\x01" * 100) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


def _with_payload(name: str, payload: bytes) -> tuple[Any, Record, bytes]:
    reader, recs = parse_patch(fixture(name, "patch.bin"))
    k = next(i for i, r in enumerate(recs) if r.kind == REC_DATA)
    recs[k] = dataclasses.replace(recs[k], payload=payload)
    patch = assemble(reader.header, recs)
    reader, recs = parse_patch(patch)  # the reader accepts it: payloads are checked on decode
    return reader.header, recs[k], patch


@pytest.mark.parametrize("declared", [1 << 40, (1 << 60) + 12345, 8193])
def test_payload_declaring_a_huge_size_is_refused_without_allocating(declared: int,
                                                                     tmp_path: Path) -> None:
    frame = _huge_frame(declared)
    assert zstandard.frame_content_size(frame) == declared
    header, rec, patch = _with_payload("data-record", frame)
    tracemalloc.start()
    try:
        refuses(FormatError, lambda: decode_payload(header, rec), f"record 0 (data) at byte {rec.offset}",
                f"declares {declared} bytes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    case = mf.CASES["data-record"]
    dest = mf.make_file(tmp_path / "dest", case["base"])
    (tmp_path / "patch.bin").write_bytes(patch)
    refuses(FormatError, lambda: api.apply(str(tmp_path / "patch.bin"), str(dest)),
            f"declares {declared} bytes")
    assert dest.read_bytes() == mf.file_bytes(case["base"])


def test_payload_frames_that_do_not_fit_the_record() -> None:
    raw = 2 * 4096
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x01" * raw)
    header, rec, _ = _with_payload("data-record", no_size)
    refuses(FormatError, lambda: decode_payload(header, rec), "has no content size")
    header, rec, _ = _with_payload("data-record", b"not a zstd frame at all")
    refuses(FormatError, lambda: decode_payload(header, rec), "is not a zstd frame")
    # A frame whose header declares the record's length but whose blocks hold twice as much.
    longer = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(b"\x01" * 2 * raw))
    fhd = longer[4]
    assert fhd >> 6 == 1 and fhd & 0x20, "expected a single-segment frame with a 2-byte size"
    struct.pack_into("<H", longer, 5, raw - 256)
    assert zstandard.frame_content_size(bytes(longer)) == raw
    header, rec, _ = _with_payload("data-record", bytes(longer))
    with pytest.raises(FormatError) as info:
        decode_payload(header, rec)
    assert f"record 0 (data) at byte {rec.offset}" in str(info.value)


# ---------------------------------------------------------------- random damage, end to end


DAMAGE_CASES = ["mixed", "unaligned-size", "full-patch", "copy-record", "shrinks", "zero-record"]
PATCHES = {name: fixture(name, "patch.bin") for name in DAMAGE_CASES}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_patch_is_refused_or_applies_exactly(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(DAMAGE_CASES), label="case")
    patch = PATCHES[name]
    truncate = data.draw(st.booleans(), label="truncate")
    if truncate:
        damaged = patch[: data.draw(st.integers(0, len(patch) - 1), label="length")]
    else:
        pos = data.draw(st.integers(0, len(patch) - 1), label="pos")
        damaged = flip(patch, pos, data.draw(st.integers(1, 255), label="mask"))
    try:
        decode_all(damaged)
        decoded = True
    except SparsePatchError:
        decoded = False
    if truncate:
        assert not decoded
    elif not decoded:
        pass
    else:
        in_payload = any(pos in r for r in payload_ranges(parse_patch(patch)[1]))
        assert in_payload, f"flip at byte {pos} outside every payload was not refused"
    case = mf.CASES[name]
    with tempfile.TemporaryDirectory(prefix="sparsepatch-damage-") as work:
        dest = mf.make_file(Path(work) / "dest", case["base"])
        (Path(work) / "patch.bin").write_bytes(damaged)
        try:
            api.apply(str(Path(work) / "patch.bin"), str(dest))
        except SparsePatchError:
            # A patch file is checked whole before the first write.
            assert dest.read_bytes() == mf.file_bytes(case["base"])
            return
        assert decoded, "apply accepted a patch the reader refuses"
        assert dest.read_bytes() == mf.file_bytes(case["target"])


# ---------------------------------------------------------------- fixtures and the zstd version


def _rewritten(name: str, change: bool = False) -> bytes:
    """The fixture patch with every payload compressed again as two zstd blocks: what another
    zstd version could write. Lengths, CRCs, counts and Tags follow, as a writer's would.
    With change, the first byte of each DATA record's content changes too (hashes follow)."""
    key = key_of(name)
    reader, records = parse_patch(fixture(name, "patch.bin"), key)
    h = reader.header
    out = []
    decoded = iter(decode_stream(h, records))
    data = [r for r in records if r.kind == REC_DATA]
    cobj: Any = None
    for r in records:
        if r.kind == REC_DATA:
            raw = bytearray(next(decoded))
            meta = r.meta
            if change:
                raw[0] ^= 1
                meta = r.meta[:16] + hash_block(raw[: h.block_size], h.block_size) + r.meta[32:]
            if r.flags & FRAME_START:  # the same frames, as the writer cut them
                end = next(i for i in range(data.index(r), len(data)) if data[i].flags & FRAME_END)
                size = sum(len(raw) if x is r else len(x.payload and decode_payload(h, x, records[
                    : records.index(x)])) for x in data[data.index(r) : end + 1])
                cobj = zstandard.ZstdCompressor(write_checksum=True).compressobj(size=size)
            payload = (cobj.compress(bytes(raw[:100])) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
                       + cobj.compress(bytes(raw[100:])))
            payload += cobj.flush() if r.flags & FRAME_END else cobj.flush(
                zstandard.COMPRESSOBJ_FLUSH_BLOCK)
            r = dataclasses.replace(r, meta=meta, payload=payload)
        out.append(r)
    assert reader.trailer is not None
    body = len(encode_patch_header(h)) + sum(len(encode_record(r)) for r in out)
    body += (len(out) + 1) * MAC_LEN if key else 0
    reader.trailer = dataclasses.replace(reader.trailer, body_bytes=body,
                                         payload_bytes=sum(len(r.payload) for r in out))
    return encode_patch(reader, out, key)


@pytest.mark.parametrize("name", ["mixed", "mac-patch", "block-16k"])
def test_the_fixture_check_does_not_depend_on_the_zstd_version(name: str) -> None:
    key, golden = key_of(name), fixture(name, "patch.bin")
    other = _rewritten(name)
    assert len(other) != len(golden)  # other payload bytes and lengths, as another zstd may give
    assert zstd_independent(other, key) == zstd_independent(golden, key)
    # ...and it still sees a change to the content (and so to a target hash).
    assert zstd_independent(_rewritten(name, change=True), key) != zstd_independent(golden, key)


# ---------------------------------------------------------------- spec section 10


SPEC = Path(__file__).resolve().parent.parent / "spec" / "FORMAT.md"


def _spec_dump(heading: str) -> tuple[int, bytes]:
    """The bytes an annotated listing of spec section 10 shows, and the size its heading
    gives. Each line is `offset  bytes  field  value`; offsets must follow each other."""
    text = SPEC.read_text()
    m = re.search(rf"^### {re.escape(heading)} \((\d+) bytes\)\n\n```\n(.*?)\n```", text, re.S | re.M)
    assert m, f"spec section {heading!r} not found"
    out = bytearray()
    for line in m.group(2).splitlines()[1:]:  # the first line names the columns
        off, column = int(line[:4], 16), line[6:40]
        assert off == len(out), f"{heading}: line at {off:04x} follows byte {len(out):04x}"
        out += bytes.fromhex(column.replace(" ", ""))
    return int(m.group(1)), bytes(out)


@pytest.mark.parametrize(("heading", "file"), [("10.1 Signature", "base.sig"), ("10.2 Patch", "patch.bin")])
def test_the_spec_dump_shows_the_spec_example_fixture(heading: str, file: str) -> None:
    size, shown = _spec_dump(heading)
    assert shown == fixture("spec-example", file)
    assert size == len(shown)


def test_the_spec_example_is_what_section_10_describes() -> None:
    case = mf.CASES["spec-example"]
    base, target = mf.file_bytes(case["base"]), mf.file_bytes(case["target"])
    assert base == b"A" * 4096 + b"B" * 4096 + bytes(4096)
    assert target == b"A" * 4096 + b"b" * 4096 + bytes(4096)
    assert case["block_size"] == 4096 and case["mtime_ns"] == 1767225600000000000
    assert mf.CASES["mac-patch"]["base"] == case["base"]
    assert mf.CASES["mac-patch"]["target"] == case["target"]


def test_the_spec_gives_the_offsets_of_the_mac_example() -> None:
    text = " ".join(SPEC.read_text().split())
    m = re.search(r"with `--key-file` is (\d+) bytes, 3 × 32 more\. T0 is at 0x(\w+), the record "
                  r"moves to 0x(\w+) and is followed by T1 at 0x(\w+), the trailer moves to 0x(\w+) "
                  r"\(so body_bytes = (\d+)\), and T2 is at 0x(\w+)\.", text)
    assert m, "the MAC example paragraph of section 10 changed: update this test"
    size, t0, rec, t1, trailer, body, t2 = (int(v, 16 if i in (1, 2, 3, 4, 6) else 10)
                                            for i, v in enumerate(m.groups()))
    patch, key = fixture("mac-patch", "patch.bin"), key_of("mac-patch")
    reader, records = parse_patch(patch, key)
    assert reader.trailer is not None
    assert len(patch) == size == len(fixture("spec-example", "patch.bin")) + 3 * MAC_LEN
    assert (t0, rec) == (PATCH_HEADER.size + CRC.size, records[0].offset)
    assert t1 == rec + len(encode_record(records[0]))
    assert trailer == t1 + MAC_LEN == reader.trailer.body_bytes == body
    assert t2 == trailer + PATCH_TRAILER.size + CRC.size == size - MAC_LEN


# ---------------------------------------------------------------- rules added to the spec


def test_data_or_copy_that_changes_nothing_is_refused() -> None:
    """Rule 14: a DATA or COPY block whose base and target hashes are equal would not change."""
    for name, kind in (("data-record", "data"), ("copy-record", "copy")):
        reader, recs = parse_patch(fixture(name, "patch.bin"))
        rec = recs[0]
        same = rec.meta[16:32] + rec.meta[16:]
        patch = assemble(reader.header, [dataclasses.replace(rec, meta=same)])
        refuses(FormatError, lambda p=patch: parse_patch(p), f"record 0 ({kind}) at byte {rec.offset}",
                f"block {rec.first_block} has the same base and target hash")


def _frame(raw: bytes, **params: Any) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True, write_content_size=True, **params).compress(raw)


def _skippable_first(raw: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A53, 4) + b"abcd" + _frame(raw)


def _with_dictionary(raw: bytes) -> bytes:
    # Dictionary_ID 7 in the frame header (1 byte, flag value 1); the frame is otherwise plain.
    out = bytearray(_frame(raw))
    assert out[4] & 3 == 0
    out[4] |= 1
    out[5:5] = b"\x07"
    return bytes(out)


def _wide_window(raw: bytes) -> bytes:
    # Not single-segment, with a Window_Descriptor of 2^25 (exponent 15, mantissa 0).
    out = bytearray(_frame(raw))
    assert out[4] & 0x20, "expected a single-segment frame"
    out[4] &= ~0x20 & 0xFF
    out[5:5] = bytes([(25 - 10) << 3])
    return bytes(out)


@pytest.mark.parametrize(("build", "message"), [
    (_skippable_first, "is a skippable frame"),
    (_with_dictionary, "names dictionary 7; none is allowed"),
    (_wide_window, f"asks for a window of {1 << 25} bytes, more than the patch header's 2^13"),
])
def test_payload_frames_the_spec_rules_out(build: Any, message: str) -> None:
    """Rule 16: no skippable frame, no dictionary, a window within the header's window_log."""
    reader, recs = parse_patch(fixture("data-record", "patch.bin"))
    assert reader.header.window_log == 13  # 8192 bytes of literal
    header, rec, _ = _with_payload("data-record", build(decode_stream(reader.header, recs)[0]))
    refuses(FormatError, lambda: decode_payload(header, rec), f"record 0 (data) at byte {rec.offset}",
            message)


def test_zstd_errors_are_named_for_what_they_are() -> None:
    """A frame that does not decode is a corrupt payload; only a failed content checksum
    is a checksum mismatch."""
    reader, recs = parse_patch(fixture("spec-example", "patch.bin"))
    rec = recs[0]
    good = rec.payload  # 9 bytes of compressed block, then the content checksum
    bad_sum = dataclasses.replace(rec, payload=flip(good, len(good) - 1, 0x01))
    refuses(ChecksumMismatch, lambda: decode_payload(reader.header, bad_sum),
            "the frame's zstd content checksum does not match its decompressed bytes")
    corrupt = 0
    for pos in range(10, len(good) - 4):  # inside the compressed block
        damaged = dataclasses.replace(rec, payload=flip(good, pos))
        try:
            decode_payload(reader.header, damaged)
        except ChecksumMismatch as e:
            assert "zstd content checksum" in str(e)
        except FormatError as e:
            assert "corrupt zstd data" in str(e) or "decodes" in str(e), str(e)
            corrupt += "corrupt zstd data" in str(e)
    assert corrupt, "no damaged block was reported as a corrupt frame"


def test_a_mac_patch_without_a_key_says_so_in_codec_words() -> None:
    patch = fixture("mac-patch", "patch.bin")
    err = refuses(KeyRequired, lambda: parse_patch(patch), "patch is authenticated", "no key was given")
    assert "--" not in str(err)  # command-line options are the CLI's to name
    refuses(AuthenticationError, lambda: parse_patch(fixture("spec-example", "patch.bin"),
                                                     key_of("mac-patch")), "a key was given")
    wrong = derive_mac_key(b"another key of 32 bytes, or so..")
    refuses(AuthenticationError, lambda: parse_patch(patch, wrong), "MAC mismatch at byte 108")


def test_hash_block_pads_the_last_block_and_knows_zeros() -> None:
    bs = 16384
    assert hash_block(b"", bs) == hash_block(bytes(100), bs) == hash_block(bytes(bs), bs) == ZERO_HASH
    assert hash_block(b"x" * 100, bs) == hash_block(b"x" * 100 + bytes(bs - 100), bs)
    assert hash_block(memoryview(b"y" * bs), bs) == hash_block(b"y" * bs, bs)
    assert hash_block(b"x" * 100, 4096) != hash_block(b"x" * 100, bs)


def _b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest(length=16)


def test_block_hash_is_the_tree_hash_of_its_page_hashes() -> None:
    """Spec section 1, computed here from BLAKE3 directly: page hash = BLAKE3-128 of the
    page (ZERO_HASH for zeros); block hash = BLAKE3-128 of the page hashes in order."""
    pages = [b"a" * 4096, bytes(4096), b"c" * 4000, bytes(4096)]  # the third padded below
    block = b"".join(pages)[: 3 * 4096 - 96]  # a short last block of a file
    expected_pages = _b3(pages[0]) + ZERO_HASH + _b3(pages[2] + bytes(96)) + ZERO_HASH
    assert hash_pages(block, 16384) == expected_pages
    assert hash_block(block, 16384) == _b3(expected_pages) == tree_hash(expected_pages)
    # One page a block: the block hash is still the hash of the page hash, not of the page.
    assert hash_pages(pages[0], 4096) == _b3(pages[0])
    assert hash_block(pages[0], 4096) == _b3(_b3(pages[0])) != _b3(pages[0])
    assert tree_hash(ZERO_HASH * 4) == ZERO_HASH == tree_hash(hash_pages(bytes(16384), 16384))
    # Content that moves by one page inside a block changes the block hash.
    assert hash_block(bytes(4096) + pages[0], 8192) != hash_block(pages[0] + bytes(4096), 8192)
    assert len(hash_pages(b"", 1 << 24)) == 4096 * 16


@pytest.mark.parametrize("size", [0, -4096, 2048, 4095, 4097, 12288, 1 << 25])
def test_block_size_is_checked_in_one_place(size: int, tmp_path: Path) -> None:
    refuses(UsageError, lambda: shift_for_block_size(size), f"block size {size} must be a power of two")
    refuses(UsageError, lambda: api.signature(str(tmp_path / "none"), None, block_size=size),
            f"block size {size}")


def test_block_sizes_the_format_allows() -> None:
    assert [shift_for_block_size(1 << s) for s in range(12, 25)] == list(range(12, 25))


def test_journal_sequence_wraps() -> None:
    ids = bytes(32), b"\1" * 32

    def journal(*seqs: int) -> bytes:
        slots = [bytes(JOURNAL_SLOT_SIZE)] * 2
        for seq in seqs:
            slots[seq % 2] = encode_journal_slot(JournalSlot(seq, *ids, seq, seq + 1))
        return b"".join(slots)

    assert decode_journal(journal(1, 2)).seq == 2  # type: ignore[union-attr]
    assert decode_journal(journal(2, 3)).seq == 3  # type: ignore[union-attr]
    # After 0xFFFFFFFF comes 0: the slot written last is current.
    last = decode_journal(journal(0xFFFFFFFE, 0xFFFFFFFF, 1 << 32))
    assert last is not None and last.seq == 0 and last.start_block == 1 << 32
    assert decode_journal(journal(0xFFFFFFFF)).seq == 0xFFFFFFFF  # type: ignore[union-attr]
    assert decode_journal(bytes(2 * JOURNAL_SLOT_SIZE)) is None


def test_info_shows_the_page_size_and_page_hash_count() -> None:
    path = mf.FIXTURES / "block-16k" / "base.sig"
    sig = parse_sig(path.read_bytes())
    info = api.info(str(path))
    assert info["version"] == 2 and info["block_size"] == 16384 and info["page_size"] == 4096
    assert info["page_hashes"] == 4 * info["data_blocks"] == len(sig.pages) // HASH_LEN > 0
    r = subprocess.run([sys.executable, "-m", "sparsepatch", "info", str(path)], capture_output=True,
                       text=True, check=True)
    assert "page size: 4,096 (4.0 KiB)" in r.stdout.splitlines()
    assert f"page hashes: {info['page_hashes']:,}" in r.stdout.splitlines()
