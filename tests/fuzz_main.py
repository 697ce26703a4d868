"""Mutation fuzzer for the signature decoder, the patch decoder and apply.

Valid signatures and patches between small files (4 KiB blocks: data, zero and copy records,
a frame across DATA records, growth and shrinkage, a full patch, an authenticated patch, an
empty patch, moved content with STAGE records and sources read in place; 16 KiB blocks: pages
LITERAL, ZERO, SAME and MOVED within a block) are damaged by
truncation, byte flips, random overwrites, field-sized integers, records spliced in from
other patches, and duplicated or removed ranges (some with their CRC recomputed, to get past
the checksum to the checks behind it). Patches are also changed record by record (fields,
hashes, payloads, frame flags, page kinds, moved sources, the header's window_log; records
repeated, dropped, swapped or taken from another patch) and
encoded again with every CRC, count and MAC right, so that the checks on meaning are reached
as well as those on framing. Each damaged input goes to one target:

  signature    read_signature
  patch        PatchReader over every record, decode_data for every DATA record
  apply-file   api.apply from a patch file onto a copy of the base
  apply-stdin  api.apply from stdin (record by record) onto a copy of the base

Every failure must be a SparsePatchError; anything else, or a case running past its time
limit, is a failure. After apply the destination must be the base (a refused patch file is
checked whole before the first write) or the target (an accepted patch); from stdin a refused
patch may leave whole base or target blocks only. A mutation that recomputes a CRC, splices
in a record or encodes the patch again can make a valid patch for another file: for those,
an accepted patch (or records applied from stdin before a refusal) may give another result,
but a refused patch file must still leave the destination as it was.

    python tests/fuzz_main.py --cases 10000 [--seed N] [--replay CASE]

prints the outcomes per target and exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import blake3
import zstandard

from sparsepatch import api
from sparsepatch.errors import SparsePatchError
from sparsepatch.format import (
    CRC,
    MAC_LEN,
    PATCH_HEADER,
    PATCH_TRAILER,
    REC_COPY,
    REC_DATA,
    REC_NAMES,
    REC_STAGE,
    REC_ZERO,
    RECORD,
    SIG_HEADER,
    SIG_RUN,
    SIG_TRAILER,
    ZERO_HASH,
    FrameDecoder,
    MacChain,
    PatchHeader,
    PatchReader,
    PatchTrailer,
    Record,
    crc32c,
    decode_data,
    derive_mac_key,
    encode_patch_header,
    encode_patch_trailer,
    encode_record,
    read_signature,
)

BS = 4096
TARGETS = ("signature", "patch", "apply-file", "apply-stdin")
MAX_DEST = 16 << 20  # larger destinations (sparse) are not read back
INTERESTING = (0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x800000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 60, (1 << 60) + 1,
               1 << 63, (1 << 64) - 1)
# Offsets of the integer fields in a record (kind, first block, count, payload length,
# source block), a signature run and the headers: where a changed number means something.
FIELD_OFFSETS = (0, 4, 8, 10, 12, 13, 14, 16, 20, 24)
Op = tuple[Any, ...]


class CaseTimeout(BaseException):
    """A case ran past its time limit (not an Exception, so no handler in the code swallows it)."""


# ---------------------------------------------------------------------------- corpus


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def write_sparse(path: Path, content: bytes) -> None:
    """path holds content, with holes where whole 4 KiB blocks are zeros."""
    with open(path, "wb") as f:
        f.truncate(len(content))
        for i in range(0, len(content), BS):
            blk = content[i : i + BS]
            if any(blk):
                f.seek(i)
                f.write(blk)


def blocks_of(spec: dict[int, bytes], size: int) -> bytes:
    out = bytearray(size)
    for i, blk in spec.items():
        out[i * BS : i * BS + len(blk)] = blk
    return bytes(out[:size])


@dataclass(frozen=True)
class Unit:
    """A part of an input: bytes [start, end), CRC at crc_pos over [start, crc_pos)."""

    start: int
    crc_pos: int
    end: int


@dataclass
class Pair:
    name: str
    base: bytes | None  # None: no destination yet (a full patch creates it)
    target: bytes
    key: Path | None = None
    block_size: int = BS


@dataclass
class Item:
    name: str
    kind: str  # "patch" or "signature"
    data: bytes
    units: list[Unit]
    pair: Pair | None = None
    header: PatchHeader | None = None  # a patch, decoded
    records: list[Record] = field(default_factory=list)


@dataclass
class Corpus:
    folder: Path
    items: list[Item] = field(default_factory=list)

    def of(self, kind: str) -> list[Item]:
        return [i for i in self.items if i.kind == kind]

    def for_target(self, target: str) -> list[Item]:
        return self.of("signature" if target == "signature" else "patch")


def decode_patch(data: bytes) -> tuple[PatchHeader, list[Record]]:
    reader = PatchReader(io.BytesIO(data).read, "patch", None, unauthenticated_ok=True)
    return reader.header, list(reader.records())


def encode_patch(header: PatchHeader, records: list[Record], key: bytes | None) -> bytes:
    """A patch whose CRCs, trailer counts and (given the key) MAC tags are all right."""
    mac = MacChain(key) if key is not None and header.authenticated else None
    out = bytearray()

    def emit(b: bytes) -> None:
        out.extend(b)
        if mac is not None:
            out.extend(mac.next(b))

    emit(encode_patch_header(header))
    blocks = {k: 0 for k in REC_NAMES}
    for r in records:
        emit(encode_record(r))
        blocks[r.kind] = blocks.get(r.kind, 0) + r.count
    emit(encode_patch_trailer(PatchTrailer(len(records), blocks[REC_DATA], blocks[REC_ZERO],
                                           blocks[REC_COPY], sum(len(r.payload) for r in records),
                                           len(out))))
    return bytes(out)


def patch_units(data: bytes) -> list[Unit]:
    reader = PatchReader(io.BytesIO(data).read, "patch", None, unauthenticated_ok=True)
    tag = MAC_LEN if reader.header.authenticated else 0
    units = [Unit(0, PATCH_HEADER.size, PATCH_HEADER.size + CRC.size + tag)]
    for rec in reader.records():
        crc_pos = rec.offset + RECORD.size + len(rec.meta)
        units.append(Unit(rec.offset, crc_pos, crc_pos + CRC.size + len(rec.payload) + tag))
    assert reader.trailer is not None
    at = reader.trailer.body_bytes
    units.append(Unit(at, at + PATCH_TRAILER.size, at + PATCH_TRAILER.size + CRC.size + tag))
    assert units[-1].end == len(data)
    return units


def signature_units(data: bytes) -> list[Unit]:
    units = [Unit(0, SIG_HEADER.size, SIG_HEADER.size + CRC.size)]
    pos = units[0].end
    per = 1 << (data[12] - 12)  # page hashes of a block (block_shift at byte 12)
    while data[pos] != 0xFF:
        kind, _, count = SIG_RUN.unpack_from(data, pos)
        crc_pos = pos + SIG_RUN.size + (16 * per * count if kind == 2 else 0)
        units.append(Unit(pos, crc_pos, crc_pos + CRC.size))
        pos = crc_pos + CRC.size
    units.append(Unit(pos, pos + SIG_TRAILER.size, pos + SIG_TRAILER.size + CRC.size))
    assert units[-1].end == len(data)
    return units


def build_corpus(folder: Path) -> Corpus:
    """Signatures and patches between small files, made by the tool itself."""
    folder.mkdir(parents=True, exist_ok=True)
    size = 16 * BS + 100
    base_spec = {i: pattern(BS, 100 + i) for i in range(12)}
    base_spec[16] = pattern(100, 116)
    base = blocks_of(base_spec, size)
    grown = dict(base_spec)
    grown.update({0: pattern(BS, 200), 1: pattern(BS, 201), 3: bytes(BS), 4: base_spec[8],
                  5: base_spec[9], 6: pattern(BS, 206), 12: pattern(BS, 212), 16: pattern(BS, 216),
                  17: pattern(900, 217)})
    target = blocks_of(grown, 17 * BS + 900)
    shrunk = dict(list(base_spec.items())[:9])
    shrunk[2] = pattern(BS, 302)
    small = blocks_of(shrunk, 9 * BS + 123)
    long_spec = {i: blk for i, blk in base_spec.items() if i < 12}
    long_spec.update({i: pattern(BS, 400 + i) for i in range(12, 28)})  # one DATA record of 16
    long_spec.update({30 + i: base_spec[i] for i in range(4)})  # one COPY record of 4
    long_run = blocks_of(long_spec, 40 * BS)
    key = folder / "key"
    key.write_bytes(pattern(32, 9))
    # Moved content at 4 KiB: blocks 0 and 1 swapped (one source staged), block 4 taken from
    # block 9, which a later record rewrites (read in place), block 6 zeroed.
    moved_spec = dict(base_spec)
    moved_spec.update({0: base_spec[1], 1: base_spec[0], 4: base_spec[9], 6: bytes(BS),
                       9: pattern(BS, 509)})
    moved = blocks_of(moved_spec, size)
    # 16 KiB blocks: block 0 with one new page (the others SAME), block 1 with its pages
    # rotated (MOVED within the block: staged), block 2 with a page zeroed, block 3 with a
    # page of block 5.
    big = 4 * BS
    base16 = pattern(6 * big, 600)
    t16 = bytearray(base16)
    t16[BS : 2 * BS] = pattern(BS, 601)
    t16[big : 2 * big] = base16[big + BS : 2 * big] + base16[big : big + BS]
    t16[2 * big : 2 * big + BS] = bytes(BS)
    t16[3 * big + 2 * BS : 3 * big + 3 * BS] = base16[5 * big : 5 * big + BS]
    pairs = [Pair("mixed", base, target), Pair("shrink", base, small), Pair("full", None, target),
             Pair("signed", base, target, key), Pair("same", base, base), Pair("long-run", base, long_run),
             Pair("moves", base, moved), Pair("pages16k", base16, bytes(t16), block_size=4 * BS)]
    corpus = Corpus(folder)
    for p in pairs:
        write_sparse(folder / f"{p.name}.target", p.target)
        patch = folder / f"{p.name}.patch"
        if p.base is None:
            api.diff(None, str(folder / f"{p.name}.target"), str(patch), full=True,
                     block_size=p.block_size)
        else:
            write_sparse(folder / f"{p.name}.base", p.base)
            sig = folder / f"{p.name}.base.sig"
            api.signature(str(folder / f"{p.name}.base"), str(sig), block_size=p.block_size)
            api.diff(str(sig), str(folder / f"{p.name}.target"), str(patch),
                     key_file=str(p.key) if p.key else None)
        data = patch.read_bytes()
        header, records = decode_patch(data)
        key_bytes = derive_mac_key(p.key.read_bytes()) if p.key else None
        assert encode_patch(header, records, key_bytes) == data
        if p.name == "moves":
            assert any(r.kind == REC_STAGE for r in records) and any(r.moved_pages for r in records)
        corpus.items.append(Item(f"{p.name}.patch", "patch", data, patch_units(data), p, header,
                                 records))
    write_sparse(folder / "empty", b"")
    for name in ("mixed.base", "mixed.target", "shrink.target", "long-run.target", "empty"):
        sig = folder / f"{name}.sig"
        api.signature(str(folder / name), str(sig), block_size=BS)
        data = sig.read_bytes()
        corpus.items.append(Item(f"{name}.sig", "signature", data, signature_units(data)))
    return corpus


# ---------------------------------------------------------------------------- mutations


class Chooser(Protocol):
    """Where the random choices come from: random.Random here, Hypothesis in test_fuzz.py
    (which can then shrink a failing case to its simplest ops)."""

    def choice(self, seq: Any) -> Any: ...

    def randrange(self, stop: int) -> int: ...

    def randint(self, a: int, b: int) -> int: ...

    def randbytes(self, n: int) -> bytes: ...


BYTE_OPS = (["flip"] * 20 + ["overwrite"] * 8 + ["int"] * 8 + ["field"] * 16 + ["truncate"] * 10
            + ["splice"] * 10 + ["dup-unit"] * 5 + ["drop-unit"] * 5 + ["duplicate"] * 6
            + ["remove"] * 6)
RECORD_OPS = (["s-field"] * 10 + ["s-hash"] * 5 + ["s-payload"] * 4 + ["s-dup"] * 2 + ["s-drop"] * 2
              + ["s-swap"] * 2 + ["s-splice"] * 4 + ["s-header"] * 3 + ["s-kinds"] * 3
              + ["s-source"] * 3)
RECORD_FIELDS = ("first_block", "count", "source_block", "kind", "flags")
HEADER_FIELDS = ("base_size", "target_size", "block_shift", "flags", "window_log")
PAGE_KIND_VALUES = (0, 1, 2, 3, 4, 0xFF)


def _value(c: Chooser) -> int:
    if c.randrange(10) < 7:
        v: int = c.choice(INTERESTING)
    else:
        v = c.randrange(1 << 64)
    return (v + c.choice((0, 0, -1, 1))) % (1 << 64)


def random_ops(c: Chooser, item: Item) -> list[Op]:
    """One to three mutations for item (record-level ones only for patches)."""
    ops: list[Op] = []
    kinds = BYTE_OPS + (RECORD_OPS * 2 if item.kind == "patch" else [])
    for _ in range(c.choice((1, 1, 1, 2, 2, 3))):
        kind = c.choice(kinds)
        pos, unit = c.randrange(1 << 16), c.randrange(64)
        if kind == "flip":
            ops.append(("flip", pos, c.choice((1, 0x80, 0xFF, c.randint(1, 255)))))
        elif kind == "overwrite":
            ops.append(("overwrite", pos, c.randbytes(c.randint(1, 16))))
        elif kind == "int":
            ops.append(("int", pos, c.choice((1, 2, 4, 8)), _value(c)))
        elif kind == "field":
            ops.append(("field", unit, c.choice(FIELD_OFFSETS), c.choice((1, 2, 4, 8)), _value(c)))
            if c.randrange(2):
                ops.append(("fixcrc", unit))
        elif kind == "truncate":
            ops.append(("truncate", pos))
        elif kind in ("splice", "s-splice"):
            ops.append((kind, c.randrange(64), c.randrange(64), unit, bool(c.randrange(2))))
        elif kind in ("dup-unit", "s-dup", "s-swap"):
            ops.append((kind, unit, c.randrange(64)))
        elif kind in ("drop-unit", "s-drop"):
            ops.append((kind, unit))
        elif kind == "duplicate":
            ops.append(("duplicate", pos, c.randint(1, 300), c.randrange(1 << 16)))
        elif kind == "remove":
            ops.append(("remove", pos, c.randint(1, 300)))
        elif kind in ("s-field", "s-header"):
            name = c.choice(RECORD_FIELDS if kind == "s-field" else HEADER_FIELDS)
            if c.randrange(2):
                ops.append((kind, unit, name, "add", c.choice((-4096, -2, -1, 1, 2, 3, 4096))))
            else:
                ops.append((kind, unit, name, "set", _value(c)))
        elif kind == "s-kinds":
            ops.append(("s-kinds", unit, c.randrange(1 << 16), c.choice(PAGE_KIND_VALUES)))
        elif kind == "s-source":
            ops.append(("s-source", unit, c.randrange(1 << 16),
                        c.choice(("first", "last", "base_pages", "base_pages-1", "staged", "value")),
                        _value(c)))
        elif kind == "s-hash":
            ops.append(("s-hash", unit, c.randrange(64), c.randrange(2),
                        c.choice(("zero", "other", "random", "same")), c.randrange(1 << 16)))
        else:  # s-payload
            ops.append(("s-payload", unit, c.choice(("swap", "flip", "truncate", "zeros", "skippable",
                                                     "dictionary", "window")),
                        c.randrange(1 << 16)))
    if item.kind == "signature" and c.randrange(2):
        ops.append(("fixsig",))
    return ops


def _resize_meta(rec: Record, kind: int, count: int) -> bytes:
    """rec's block entries for a record of kind and count: cut, or padded with the last (a
    DATA block's page kinds kept, or all LITERAL when rec had none)."""
    per = rec.pages
    width = 16 if kind in (REC_ZERO, REC_STAGE) else 32 + per if kind == REC_DATA else 32
    w = rec.meta_width
    entries = [rec.meta[i : i + w] for i in range(0, min(rec.count * w, len(rec.meta)), w)]
    entries = [((e[:16] + (e[16:32] or e[:16])) + (e[32:] or bytes(per)))[:width] for e in entries]
    entries = entries or [ZERO_HASH * 2 + bytes(per) if kind == REC_DATA else ZERO_HASH * (width // 16)]
    count = min(count, 4096)  # a count beyond the limit is refused before its hashes are read
    return b"".join(entries[min(i, len(entries) - 1)] for i in range(count))


def _mutate_records(header: PatchHeader, records: list[Record], ops: list[Op],
                    donors: list[Item]) -> tuple[PatchHeader, list[Record]]:
    recs = list(records)
    for op in ops:
        kind = op[0]
        if kind == "s-header":
            name = op[2]
            old = getattr(header, name)
            new = old + op[4] if op[3] == "add" else op[4]
            limit = {"base_size": 1 << 64, "target_size": 1 << 64, "block_shift": 256, "flags": 1 << 16,
                     "window_log": 256}
            header = dataclasses.replace(header, **{name: new % limit[name]})
            continue
        if kind == "s-splice":
            donor = [d for d in donors if d.records] or donors
            rs = donor[op[1] % len(donor)].records
            if rs:
                rec = rs[op[2] % len(rs)]
                at = op[3] % (len(recs) + 1)
                recs[at : at + (1 if op[4] else 0)] = [rec]
            continue
        if not recs:
            continue
        i = op[1] % len(recs)
        rec = recs[i]
        if kind == "s-dup":
            recs.insert(op[2] % (len(recs) + 1), rec)
        elif kind == "s-drop":
            del recs[i]
        elif kind == "s-swap":
            j = op[2] % len(recs)
            recs[i], recs[j] = recs[j], rec
        elif kind == "s-field":
            name = op[2]
            old = getattr(rec, name)
            new = (old + op[4] if op[3] == "add" else op[4]) % (
                1 << (8 if name in ("kind", "flags") else 32 if name == "count" else 64))
            fields: dict[str, Any] = {name: new}
            if name in ("count", "kind"):
                k = new if name == "kind" else rec.kind
                fields["meta"] = _resize_meta(rec, k, new if name == "count" else rec.count)
                if name == "kind" and new == REC_DATA and not rec.payload:
                    fields["payload"] = next((r.payload for r in recs if r.payload),
                                             zstandard.ZstdCompressor().compress(bytes(BS)))
                elif name == "kind" and new != REC_DATA:
                    fields["payload"] = b""
            recs[i] = dataclasses.replace(rec, **fields)
        elif kind == "s-kinds" and rec.kind == REC_DATA:
            n = rec.count * rec.meta_width
            if n <= len(rec.meta) and rec.count:
                k = op[2] % (rec.count * rec.pages)
                at = (k // rec.pages) * rec.meta_width + 32 + k % rec.pages
                recs[i] = dataclasses.replace(rec, meta=rec.meta[:at] + bytes([op[3]]) + rec.meta[at + 1 :])
        elif kind == "s-source" and rec.kind == REC_DATA and rec.moved_pages:
            n = rec.count * rec.meta_width
            srcs = (len(rec.meta) - n) // 8
            if srcs <= 0:
                continue
            j = op[2] % srcs
            base_pages = -(-header.base_size // BS)
            staged = [r.first_block for r in recs if r.kind == REC_STAGE] or [0]
            v = {"first": 0, "last": max(base_pages - 1, 0), "base_pages": base_pages,
                 "base_pages-1": base_pages - 1, "staged": staged[op[4] % len(staged)],
                 "value": op[4]}[op[3]] % (1 << 64)
            at = n + 8 * j
            meta = rec.meta[:at] + v.to_bytes(8, "little") + rec.meta[at + 8 :]
            recs[i] = dataclasses.replace(rec, meta=meta)
        elif kind == "s-hash":
            width = rec.meta_width
            n = rec.count if width * rec.count <= len(rec.meta) else len(rec.meta) // width
            if not n:
                continue
            k = op[2] % n
            at = k * width + (16 if op[3] and width >= 32 else 0)
            if op[4] == "zero":
                h = ZERO_HASH
            elif op[4] == "random":
                h = random.Random(op[5]).randbytes(16)
            elif op[4] == "same":  # base and target hash equal: a block that does not change
                h = rec.meta[k * width + (0 if at % width else 16) :][:16] if width >= 32 else ZERO_HASH
            else:
                other = recs[op[5] % len(recs)]
                h = other.meta[:16] if other.meta else ZERO_HASH
            recs[i] = dataclasses.replace(rec, meta=rec.meta[:at] + h + rec.meta[at + 16 :])
        elif kind == "s-payload":
            p = rec.payload
            if op[2] == "swap":
                with_payload = [r for r in recs if r.payload] or [rec]
                p = with_payload[op[3] % len(with_payload)].payload
            elif op[2] == "flip" and p:
                b = bytearray(p)
                b[op[3] % len(b)] ^= 0xFF
                p = bytes(b)
            elif op[2] == "truncate":
                p = p[: op[3] % (len(p) + 1)]
            elif op[2] == "skippable":
                p = (0x184D2A50 + op[3] % 16).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"skip" + p
            elif op[2] in ("dictionary", "window") and len(p) > 5 and not p[4] & 3:
                b = bytearray(p)
                if op[2] == "dictionary":  # a 1-byte Dictionary_ID after the descriptor
                    b[4] |= 1
                    b.insert(5 + (not b[4] & 0x20), op[3] % 255 + 1)
                elif b[4] & 0x20:  # single segment: give it a Window_Descriptor instead
                    b[4] &= 0xDF
                    b.insert(5, op[3] & 0xFF)
                p = bytes(b)
            elif op[2] in ("dictionary", "window"):
                pass
            else:
                p = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(op[3] % (2 * BS) + 1))
            recs[i] = dataclasses.replace(rec, payload=p)
    return header, recs


def mutate(item: Item, ops: list[Op], donors: list[Item]) -> bytes:
    """Apply ops: record-level ones first (then the patch is encoded again, with its key
    when it has one), then byte-level ones in order. Positions wrap around the current
    length; units are the parts of the input as it was before the byte-level ops (stale
    after a length change, which is fine for fuzzing)."""
    data, units = item.data, item.units
    structural = [op for op in ops if op[0].startswith("s-")]
    if structural and item.header is not None:
        key = derive_mac_key(item.pair.key.read_bytes()) if item.pair and item.pair.key else None
        header, records = _mutate_records(item.header, item.records, structural, donors)
        data = encode_patch(header, records, key)
        with contextlib.suppress(SparsePatchError):
            units = patch_units(data)
    buf = bytearray(data)
    for op in ops:
        kind, n = op[0], len(buf)
        if kind == "truncate":
            del buf[op[1] % (n + 1) :]
        elif kind == "flip" and n:
            buf[op[1] % n] ^= op[2] or 1
        elif kind == "overwrite" and n:
            p = op[1] % n
            buf[p : p + len(op[2])] = op[2]
        elif kind in ("int", "field"):
            width, value = op[-2], op[-1] & ((1 << (8 * op[-2])) - 1)
            if kind == "int":
                p = op[1] % max(n, 1)
            else:
                u = units[op[1] % len(units)]
                p = u.start + op[2]
            if p < n:
                buf[p : p + width] = value.to_bytes(width, "little")
        elif kind == "fixcrc":
            u = units[op[1] % len(units)]
            if u.crc_pos + CRC.size <= len(buf):
                CRC.pack_into(buf, u.crc_pos, crc32c(bytes(buf[u.start : u.crc_pos])))
        elif kind == "splice":
            donor = donors[op[1] % len(donors)]
            du = donor.units[op[2] % len(donor.units)]
            vu = units[op[3] % len(units)]
            chunk = donor.data[du.start : du.end]
            if op[4]:
                buf[vu.start : vu.end] = chunk
            else:
                buf[vu.start : vu.start] = chunk
        elif kind == "dup-unit":
            u, at = units[op[1] % len(units)], units[op[2] % len(units)]
            buf[at.start : at.start] = bytes(buf[u.start : u.end])
        elif kind == "drop-unit":
            u = units[op[1] % len(units)]
            del buf[u.start : u.end]
        elif kind == "duplicate":
            s = op[1] % (n + 1)
            chunk = bytes(buf[s : s + op[2]])
            at = op[3] % (n + 1)
            buf[at:at] = chunk
        elif kind == "remove":
            s = op[1] % (n + 1)
            del buf[s : s + op[2]]
        elif kind == "fixsig" and n >= SIG_TRAILER.size + CRC.size:
            _fix_signature(buf, units)
    return bytes(buf)


def _fix_signature(buf: bytearray, units: list[Unit]) -> None:
    """Recompute a signature's run CRCs (where its runs were), its identity and its trailer
    CRC, so that what is checked after them is reached."""
    t = len(buf) - SIG_TRAILER.size - CRC.size
    for u in units[1:-1]:
        if u.crc_pos + CRC.size <= t:
            CRC.pack_into(buf, u.crc_pos, crc32c(bytes(buf[u.start : u.crc_pos])))
    buf[t + 28 : t + 60] = blake3.blake3(bytes(buf[:t])).digest()
    CRC.pack_into(buf, t + SIG_TRAILER.size, crc32c(bytes(buf[t : t + SIG_TRAILER.size])))


def lenient(ops: list[Op]) -> bool:
    """Whether ops may have made a valid patch for another file (see the module text)."""
    return any(op[0] in ("fixcrc", "splice") or op[0].startswith("s-") for op in ops)


# ---------------------------------------------------------------------------- running a case


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def stdin_holding(data: bytes) -> Iterator[None]:
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(data))
    try:
        yield
    finally:
        sys.stdin = saved


def _blocks(data: bytes, n: int) -> list[bytes]:
    data = data.ljust(n * BS, b"\0")
    return [data[i * BS : (i + 1) * BS] for i in range(n)]


def _check_dest(pair: Pair, dest: Path, accepted: bool, stream: bool, loose: bool) -> str | None:
    """None when the destination is in a state the outcome allows, else what is wrong."""
    size = os.path.getsize(dest) if dest.exists() else 0
    if size > MAX_DEST:  # a header changed to announce a huge (sparse) target
        return None if loose else f"destination grew to {size} bytes"
    now = dest.read_bytes() if dest.exists() else None
    base = pair.base
    if accepted:
        if now == pair.target or loose:
            return None
        return "accepted, but the destination is not the target"
    if now == base:
        return None
    if not stream:
        return "refused patch file, but the destination is no longer the base"
    if now is None:
        return "the destination disappeared"
    lo, hi = sorted((len(base or b""), len(pair.target)))
    if not lo <= len(now) <= hi and not loose:
        return f"destination is {len(now)} bytes, outside {lo}..{hi}"
    n = -(-max(len(now), hi) // BS)
    mixed = [i for i, (d, b, t) in enumerate(zip(_blocks(now, n), _blocks(base or b"", n),
                                                 _blocks(pair.target, n), strict=True))
             if d not in (b, t)]
    if mixed and not loose:
        return f"blocks {mixed[:8]} are neither base nor target"
    return None


def _reset(folder: Path, pair: Pair) -> Path:
    dest = folder / "dest.img"
    for p in (dest, folder / ".dest.img.sparsepatch-journal", folder / ".dest.img.sparsepatch-scratch"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if pair.base is not None:
        write_sparse(dest, pair.base)
    return dest


def run_case(corpus: Corpus, target: str, item: Item, ops: list[Op], timeout: float = 10.0,
             work: Path | None = None) -> tuple[str, str | None]:
    """(outcome, failure): outcome 'accepted' or 'refused <ErrorClass>'; failure None or a
    description of what went wrong."""
    data = mutate(item, ops, corpus.of(item.kind))
    work = work or corpus.folder / "work"
    work.mkdir(exist_ok=True)
    pair = item.pair
    dest = _reset(work, pair) if pair and target.startswith("apply") else None
    key_file = str(pair.key) if pair and pair.key else None
    accepted = True
    outcome = "accepted"
    try:
        with time_limit(timeout):
            if target == "signature":
                read_signature(io.BytesIO(data).read, "signature")
            elif target == "patch":
                key = derive_mac_key(pair.key.read_bytes()) if pair and pair.key else None
                reader = PatchReader(io.BytesIO(data).read, "patch", key, unauthenticated_ok=key is None)
                frames = FrameDecoder(reader.header)
                for rec in reader.records():
                    if rec.kind == REC_DATA:
                        decode_data(frames, rec)
            elif target == "apply-file":
                (work / "patch.bin").write_bytes(data)
                api.apply(str(work / "patch.bin"), str(dest), key_file=key_file)
            else:
                with stdin_holding(data):
                    api.apply("-", str(dest), key_file=key_file)
    except SparsePatchError as e:
        accepted = False
        outcome = f"refused {type(e).__name__}"
    except CaseTimeout as e:
        return "TIMEOUT", f"{e}"
    except Exception as e:  # the failures this fuzzer looks for
        return f"CRASH {type(e).__name__}", "".join(traceback.format_exception(e))
    if dest is not None and pair is not None:
        wrong = _check_dest(pair, dest, accepted, target == "apply-stdin", lenient(ops))
        if wrong:
            return "BAD DESTINATION", wrong + (f" ({outcome})")
    if accepted and lenient(ops) and target.startswith("apply") and dest is not None and pair is not None:
        if os.path.getsize(dest) != len(pair.target) or dest.read_bytes() != pair.target:
            outcome = "accepted (a valid patch for another file)"
    return outcome, None


# ---------------------------------------------------------------------------- main


def case_of(corpus: Corpus, seed: int, i: int) -> tuple[str, Item, list[Op]]:
    rng = random.Random(f"{seed}:{i}")
    target = TARGETS[i % len(TARGETS)]
    item = rng.choice(corpus.for_target(target))
    return target, item, random_ops(rng, item)


def _workspace() -> str:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="cases to run (default 10000)")
    ap.add_argument("--seed", type=int, default=1, help="seed; a case is reproducible from seed and number")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds one case may take")
    ap.add_argument("--replay", type=int, metavar="CASE", help="run one case and show it in full")
    ap.add_argument("--show", type=int, default=5, help="failures to describe in full")
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="sparsepatch-fuzz-", dir=_workspace()))
    try:
        corpus = build_corpus(folder)
        cases = [args.replay] if args.replay is not None else range(args.cases)
        counts: dict[str, Counter[str]] = {t: Counter() for t in TARGETS}
        failures: list[tuple[int, str, str, list[Op], str]] = []
        start = time.monotonic()
        for n, i in enumerate(cases, 1):
            target, item, ops = case_of(corpus, args.seed, i)
            outcome, failure = run_case(corpus, target, item, ops, args.timeout)
            counts[target][outcome] += 1
            if failure is not None:
                failures.append((i, target, item.name, ops, f"{outcome}: {failure}"))
            if args.replay is not None:
                print(f"case {i}: {target} on {item.name}, ops {ops}: {outcome}")
            if n % 1000 == 0:
                print(f"... {n} cases, {len(failures)} failures, {time.monotonic() - start:.0f} s",
                      file=sys.stderr)
        total = sum(sum(c.values()) for c in counts.values())
        print(f"sparsepatch fuzz: {total} cases, seed {args.seed}, {time.monotonic() - start:.1f} s")
        for target in TARGETS:
            c = counts[target]
            if not c:
                continue
            parts = ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
            print(f"  {target:12} {sum(c.values()):6}: {parts}")
        for i, target, name, ops, what in failures[: args.show]:
            print(f"\nFAILED case {i} ({target} on {name}, replay with --seed {args.seed} --replay {i})"
                  f"\n  ops: {ops}\n  {what}")
        print(f"{len(failures)} failures")
        return 1 if failures else 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
