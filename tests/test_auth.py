"""Authenticated patches (diff -k KEY): the key opens them, nothing else does. A patch that
was altered in any way after it was signed is refused with exit 4 before the altered part
reaches the destination: from a file before the first write, from stdin before the first
altered record (whole genuine records before it may already be written, as when a stream
breaks off)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from conftest import allocated, error_line, make_sparse, pattern, run_cli

from sparsepatch.format import (
    CRC,
    FLAG_MAC,
    FRAME_END,
    FRAME_START,
    MAC_LEN,
    PAGE_LITERAL,
    PATCH_HEADER,
    PATCH_TRAILER,
    REC_COPY,
    REC_DATA,
    REC_ZERO,
    RECORD,
    PatchReader,
    PatchTrailer,
    Record,
    crc32c,
    encode_patch_trailer,
    encode_record,
    hash_block,
)

BS = 4096
N = 24
SIZE = N * BS
EVIL = pattern(BS, 666)
HEAD = PATCH_HEADER.size + CRC.size
TRAILER = PATCH_TRAILER.size + CRC.size


@dataclass
class Signed:
    """A MAC patch cut into its elements, each with the tag that follows it."""

    header: bytes
    header_tag: bytes
    records: list[Record]
    raw: list[bytes]  # each record's bytes, as stored
    tags: list[bytes]
    trailer: bytes
    trailer_tag: bytes

    @classmethod
    def parse(cls, data: bytes) -> Signed:
        reader = PatchReader(io.BytesIO(data).read, "patch", None, unauthenticated_ok=True)
        assert reader.header.authenticated
        records = list(reader.records())
        raw, tags = [], []
        for rec in records:
            end = rec.offset + len(encode_record(rec))
            raw.append(data[rec.offset : end])
            tags.append(data[end : end + MAC_LEN])
        assert raw == [encode_record(r) for r in records]
        return cls(data[:HEAD], data[HEAD : HEAD + MAC_LEN], records, raw, tags,
                   data[-TRAILER - MAC_LEN : -MAC_LEN], data[-MAC_LEN:])

    def join(self, trailer: bytes | None = None, trailer_tag: bytes | None = None) -> bytes:
        body = self.header + self.header_tag + b"".join(r + t for r, t in zip(self.raw, self.tags,
                                                                               strict=True))
        return (body + (self.trailer if trailer is None else trailer)
                + (self.trailer_tag if trailer_tag is None else trailer_tag))

    def consistent_trailer(self) -> bytes:
        """A trailer (CRC right) whose counts agree with the records as they now stand."""
        recs = [_decode(r) for r in self.raw]
        body = len(self.join()) - TRAILER - MAC_LEN
        count = {k: sum(r.count for r in recs if r.kind == k) for k in (REC_DATA, REC_ZERO, REC_COPY)}
        return encode_patch_trailer(PatchTrailer(len(recs), count[REC_DATA], count[REC_ZERO],
                                                 count[REC_COPY], sum(len(r.payload) for r in recs),
                                                 body))

    def copy(self) -> Signed:
        return dataclasses.replace(self, records=list(self.records), raw=list(self.raw),
                                   tags=list(self.tags))


def _decode(raw: bytes) -> Record:
    """Record fields back from its bytes (enough for counting)."""
    kind, flags, first, count, plen, src = RECORD.unpack_from(raw)
    return Record(kind, first, count, b"", src, raw[len(raw) - plen :] if plen else b"", flags=flags)


@dataclass
class World:
    tmp: Path
    base: bytes
    target: bytes
    dest: Path
    sig: Path
    key: Path
    signed: Path  # diff -k key
    plain: Path  # the same diff, unsigned
    target_file: Path
    sig_mtime: int = 0

    def reset(self) -> None:
        make_sparse(self.dest, SIZE, [(i * BS, self.base[i * BS : (i + 1) * BS]) for i in range(N)
                                      if any(self.base[i * BS : (i + 1) * BS])])
        j = journal(self)
        if j.exists():
            j.unlink()

    def expected_after(self, records: list[Record]) -> bytes:
        out = bytearray(self.base)
        for rec in records:
            span = slice(rec.first_block * BS, (rec.first_block + rec.count) * BS)
            out[span] = self.target[span]
        return bytes(out)


def journal(w: World) -> Path:
    return w.dest.parent / f".{w.dest.name}.sparsepatch-journal"


def target_blocks(base: bytes, changes: dict[int, bytes]) -> bytes:
    out = bytearray(base)
    for i, blk in changes.items():
        out[i * BS : (i + 1) * BS] = blk
    return bytes(out)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Base, target, signature, key and the patches, made once by the command line."""
    folder = tmp_path_factory.mktemp("auth")
    base_map: list[tuple[int, bytes | int]] = [(i * BS, pattern(BS, 100 + i)) for i in range(20)]
    base = make_sparse(folder / "base.img", SIZE, base_map).read_bytes()
    b = [base[i * BS : (i + 1) * BS] for i in range(N)]
    target = target_blocks(base, {1: pattern(BS, 201), 3: bytes(BS), 5: b[12], 6: b[13],
                                  8: pattern(BS, 208), 14: pattern(BS, 214), 15: pattern(BS, 215),
                                  18: bytes(BS), 21: pattern(BS, 221)})
    make_sparse(folder / "target.img", SIZE, [(i * BS, target[i * BS : (i + 1) * BS]) for i in range(N)
                                              if any(target[i * BS : (i + 1) * BS])])
    key = folder / "key"
    key.write_bytes(pattern(32, 7))
    w = World(folder, base, target, folder / "dest.img", folder / "dest.sig", key,
              folder / "signed.patch", folder / "plain.patch", folder / "target.img")
    w.reset()
    run_cli("signature", str(w.dest), "-o", str(w.sig), "-b", "4K")
    w.sig_mtime = os.stat(w.dest).st_mtime_ns
    run_cli("diff", str(w.sig), str(w.target_file), "-o", str(w.signed), "-k", str(key))
    run_cli("diff", str(w.sig), str(w.target_file), "-o", str(w.plain))
    kinds = [(r.kind, r.first_block, r.count) for r in Signed.parse(w.signed.read_bytes()).records]
    assert kinds == [(REC_DATA, 1, 1), (REC_ZERO, 3, 1), (REC_COPY, 5, 2), (REC_DATA, 8, 1),
                     (REC_DATA, 14, 2), (REC_ZERO, 18, 1), (REC_DATA, 21, 1)], kinds
    return w


@pytest.fixture
def world(made: World, tmp: Path) -> World:
    """A fresh destination holding the base, with the mtime its signature recorded."""
    w = dataclasses.replace(made, tmp=tmp, dest=tmp / "dest.img")
    w.reset()
    os.utime(w.dest, ns=(w.sig_mtime, w.sig_mtime))
    return w


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), allocated(path)


def apply(w: World, patch: Path | bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    """apply from a file (patch is a Path) or from stdin (patch is bytes)."""
    if isinstance(patch, Path):
        return run_cli("apply", str(patch), str(w.dest), *args, check=False)
    return run_cli("apply", "-", str(w.dest), *args, input=patch, check=False)


def feed(w: World, mode: str, data: bytes) -> Path | bytes:
    if mode == "stdin":
        return data
    p = w.tmp / "altered.patch"
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------------------- the good path


@pytest.mark.parametrize("mode", ["file", "stdin"])
def test_signed_patch_applies_with_its_key(world: World, mode: str) -> None:
    r = apply(world, feed(world, mode, world.signed.read_bytes()), "-k", str(world.key), "--verify")
    assert r.returncode == 0, r.stderr
    assert world.dest.read_bytes() == world.target
    assert not journal(world).exists()


def test_info_and_verify_say_whether_a_patch_is_authenticated(world: World) -> None:
    assert json.loads(run_cli("info", str(world.signed), "--json").stdout)["authenticated"] is True
    assert json.loads(run_cli("info", str(world.plain), "--json").stdout)["authenticated"] is False
    assert "authenticated: True" in run_cli("info", str(world.signed)).stdout.decode()
    r = run_cli("verify", "-k", str(world.key), str(world.signed))
    assert "MAC checked" in r.stderr.decode() and "no MAC" not in r.stderr.decode()
    r = run_cli("verify", str(world.signed))  # without a key the tags are read, not checked
    assert "no MAC checked" in r.stderr.decode()
    other = world.tmp / "other-key"
    other.write_bytes(pattern(32, 8))
    line = error_line(run_cli("verify", "-k", str(other), str(world.signed), check=False), 4)
    assert "MAC mismatch" in line


@pytest.mark.parametrize("mode", ["file", "stdin"])
def test_signed_patch_without_a_key_is_refused(world: World, mode: str) -> None:
    before = snapshot(world.dest)
    line = error_line(apply(world, feed(world, mode, world.signed.read_bytes())), 4)
    assert "authenticated" in line and "key" in line and "--no-auth" in line, line
    assert snapshot(world.dest) == before
    assert not journal(world).exists()
    r = apply(world, feed(world, mode, world.signed.read_bytes()), "--no-auth")
    assert r.returncode == 0, r.stderr
    assert world.dest.read_bytes() == world.target


@pytest.mark.parametrize("mode", ["file", "stdin"])
def test_wrong_key_is_refused_before_the_first_write(world: World, mode: str) -> None:
    other = world.tmp / "other-key"
    other.write_bytes(pattern(32, 8))
    before = snapshot(world.dest)
    line = error_line(apply(world, feed(world, mode, world.signed.read_bytes()), "-k", str(other)), 4)
    assert "header" in line and "MAC mismatch" in line and "key is wrong" in line, line
    assert snapshot(world.dest) == before
    assert not journal(world).exists()


@pytest.mark.parametrize("mode", ["file", "stdin"])
def test_key_for_an_unsigned_patch_is_refused(world: World, mode: str) -> None:
    before = snapshot(world.dest)
    line = error_line(apply(world, feed(world, mode, world.plain.read_bytes()), "-k", str(world.key)), 4)
    assert "not authenticated" in line and "key was given" in line, line
    assert snapshot(world.dest) == before


@pytest.mark.parametrize("size", [0, 1, 15])
def test_key_file_shorter_than_16_bytes_is_a_usage_error(world: World, size: int) -> None:
    short = world.tmp / "short-key"
    short.write_bytes(pattern(size, 3))
    before = snapshot(world.dest)
    for args in (["diff", str(world.sig), str(world.target_file), "-o", str(world.tmp / "p"),
                  "-k", str(short)],
                 ["apply", str(world.signed), str(world.dest), "-k", str(short)],
                 ["verify", "-k", str(short), str(world.signed)]):
        line = error_line(run_cli(*args, check=False), 2)
        assert str(short) in line and f"holds {size} bytes" in line and "at least 16" in line, line
    assert not (world.tmp / "p").exists()
    assert snapshot(world.dest) == before
    line = error_line(run_cli("apply", str(world.signed), str(world.dest), "-k",
                              str(world.tmp / "no-such-key"), check=False), 3)
    assert "no-such-key" in line and "no such file" in line
    assert snapshot(world.dest) == before


# ---------------------------------------------------------------------------- alterations


def _flip_payload(s: Signed, w: World) -> None:
    raw = bytearray(s.raw[3])
    raw[-5] ^= 0x40  # inside the zstd frame; the record CRC does not cover payloads
    s.raw[3] = bytes(raw)


def _forge_record(s: Signed, w: World) -> None:
    """A record of the attacker's own, well formed to the last CRC: only the tag gives it away.
    Its literal shares a frame with the other DATA records, so the attacker compresses the
    whole literal stream again, as diff cuts it (one frame here)."""
    data = [i for i, r in enumerate(s.records) if r.kind == REC_DATA]
    literal = {i: EVIL if i == 3 else w.target[s.records[i].first_block * BS :
                                                (s.records[i].first_block + s.records[i].count) * BS]
               for i in data}
    cobj = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compressobj(
        size=sum(len(v) for v in literal.values()))
    for i in data:
        rec = s.records[i]
        meta = s.raw[i][RECORD.size : RECORD.size + rec.meta_width * rec.count]
        if i == 3:
            meta = meta[:16] + hash_block(EVIL, len(EVIL)) + bytes([PAGE_LITERAL])
        last = i == data[-1]
        payload = cobj.compress(literal[i]) + cobj.flush(
            zstandard.COMPRESSOBJ_FLUSH_FINISH if last else zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        flags = (FRAME_START if i == data[0] else 0) | (FRAME_END if last else 0)
        s.raw[i] = encode_record(Record(REC_DATA, rec.first_block, rec.count, meta, payload=payload,
                                        flags=flags))


def _swap(s: Signed, w: World) -> None:
    s.raw[3], s.raw[4] = s.raw[4], s.raw[3]
    s.tags[3], s.tags[4] = s.tags[4], s.tags[3]


def _drop(s: Signed, w: World) -> None:
    del s.raw[3], s.tags[3]


def _drop_last(s: Signed, w: World) -> None:
    del s.raw[-1], s.tags[-1]


def _truncate(s: Signed, w: World) -> None:
    del s.raw[3:], s.tags[3:]


def _splice(s: Signed, w: World) -> None:
    """Record 3 of another patch from the same base, signed with the same key."""
    other = target_blocks(w.target, {8: pattern(BS, 308)})
    make_sparse(w.tmp / "other.img", SIZE, [(i * BS, other[i * BS : (i + 1) * BS]) for i in range(N)
                                            if any(other[i * BS : (i + 1) * BS])])
    run_cli("diff", str(w.sig), str(w.tmp / "other.img"), "-o", str(w.tmp / "other.patch"),
            "-k", str(w.key))
    donor = Signed.parse((w.tmp / "other.patch").read_bytes())
    assert donor.records[3].first_block == 8 and donor.raw[3] != s.raw[3]
    s.raw[3], s.tags[3] = donor.raw[3], donor.tags[3]


@dataclass(frozen=True)
class Alteration:
    name: str
    change: Callable[[Signed, World], None]
    trailer: str  # "keep", "recount" (a consistent forged trailer), "untagged"
    genuine_before: int  # records ahead of the first altered element
    fragments: tuple[str, ...] = ("MAC mismatch", "altered or the key is wrong")


ALTERATIONS = [
    Alteration("payload byte flipped", _flip_payload, "keep", 3, ("record 3 (data)", "MAC mismatch")),
    Alteration("forged record", _forge_record, "recount", 3, ("record 3 (data)", "MAC mismatch")),
    Alteration("two records swapped", _swap, "keep", 3, ("record 3 (data)", "MAC mismatch")),
    Alteration("record dropped", _drop, "recount", 3, ("record 3 (data)", "MAC mismatch")),
    Alteration("last record dropped", _drop_last, "recount", 6, ("trailer", "MAC mismatch")),
    Alteration("truncated, forged trailer appended", _truncate, "recount", 3,
               ("trailer", "MAC mismatch")),
    Alteration("trailer tag missing", lambda s, w: None, "untagged", 7,
               ("truncated", "MAC tag after", "trailer")),
    Alteration("record spliced from another signed patch", _splice, "recount", 3,
               ("record 3 (data)", "MAC mismatch")),
]


def altered(w: World, alt: Alteration) -> bytes:
    s = Signed.parse(w.signed.read_bytes()).copy()
    alt.change(s, w)
    if alt.trailer == "recount":
        return s.join(trailer=s.consistent_trailer())
    if alt.trailer == "untagged":
        return s.join(trailer_tag=b"")
    return s.join()


@pytest.mark.parametrize("alt", ALTERATIONS, ids=[a.name for a in ALTERATIONS])
def test_altered_patch_from_a_file_is_refused_before_the_first_write(world: World,
                                                                    alt: Alteration) -> None:
    data = altered(world, alt)
    assert data != world.signed.read_bytes()
    patch = feed(world, "file", data)
    before = snapshot(world.dest)
    line = error_line(apply(world, patch, "-k", str(world.key)), 4)
    assert all(f in line for f in alt.fragments), line
    assert snapshot(world.dest) == before
    assert not journal(world).exists()
    line = error_line(run_cli("verify", "-k", str(world.key), str(patch), check=False), 4)
    assert all(f in line for f in alt.fragments), line


@pytest.mark.parametrize("alt", ALTERATIONS, ids=[a.name for a in ALTERATIONS])
def test_altered_patch_from_stdin_never_writes_an_altered_record(world: World, alt: Alteration) -> None:
    line = error_line(apply(world, altered(world, alt), "-k", str(world.key)), 4)
    assert all(f in line for f in alt.fragments), line
    genuine = Signed.parse(world.signed.read_bytes()).records[: alt.genuine_before]
    assert world.dest.read_bytes() == world.expected_after(genuine)
    # The genuine patch then finishes what the genuine records started.
    r = apply(world, world.signed.read_bytes(), "-k", str(world.key), "--verify")
    assert r.returncode == 0, r.stderr
    assert world.dest.read_bytes() == world.target


def test_forged_record_is_otherwise_a_valid_patch(world: World) -> None:
    """Without the tag check the forgery goes through: the key is what stops it."""
    forged = altered(world, ALTERATIONS[1])
    r = apply(world, feed(world, "file", forged), "--no-auth")
    assert r.returncode == 0, r.stderr
    assert world.dest.read_bytes()[8 * BS : 9 * BS] == EVIL


@pytest.mark.parametrize("mode", ["file", "stdin"])
def test_stripping_the_mac_does_not_get_past_a_key(world: World, mode: str) -> None:
    """The signed patch with its flag cleared and every tag removed (CRCs recomputed): a
    well-formed unsigned patch, refused when the user asks for authentication."""
    s = Signed.parse(world.signed.read_bytes())
    body = bytearray(s.header[: PATCH_HEADER.size])
    flags = int.from_bytes(body[10:12], "little")
    body[10:12] = (flags & ~FLAG_MAC).to_bytes(2, "little")
    header = bytes(body) + CRC.pack(crc32c(bytes(body)))
    stripped = header + b"".join(s.raw)
    t = PATCH_TRAILER.unpack(s.trailer[: PATCH_TRAILER.size])
    stripped += encode_patch_trailer(PatchTrailer(*t[1:6], len(stripped)))
    assert stripped == world.plain.read_bytes()
    before = snapshot(world.dest)
    line = error_line(apply(world, feed(world, mode, stripped), "-k", str(world.key)), 4)
    assert "not authenticated" in line, line
    assert snapshot(world.dest) == before
