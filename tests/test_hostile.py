"""Hostile patches, hand-built with the codec so that every CRC is right and only the one
thing under test is wrong. Each must be refused with its own error class and message before
the destination changes: from a patch file (read whole before the first write), and from
stdin (checked record by record), where only whole records that came before the hostile one
may have been written, and never the hostile record itself."""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from conftest import allocated, error_line, make_sparse, pattern, run_cli

from sparsepatch import api
from sparsepatch.errors import ChecksumMismatch, FormatError, SparsePatchError
from sparsepatch.format import (
    CRC,
    FRAME_END,
    FRAME_START,
    MAX_RECORD_BLOCKS,
    MAX_WINDOW_LOG,
    PAGE_LITERAL,
    REC_COPY,
    REC_DATA,
    REC_NAMES,
    REC_ZERO,
    RECORD,
    ZERO_HASH,
    PatchHeader,
    PatchTrailer,
    Record,
    crc32c,
    encode_patch_header,
    encode_patch_trailer,
    encode_record,
    hash_block,
    payload_limit,
)

BS = 4096
SHIFT = 12
N = 16  # blocks in base and target
SIZE = N * BS
EVIL = pattern(BS, 666)  # data no honest record carries
MiB = 1 << 20
LITERAL = bytes([PAGE_LITERAL])  # the page kind of a 4 KiB block carried in the payload


def state(block: bytes) -> bytes:
    block = block.ljust(BS, b"\0")
    return ZERO_HASH if not any(block) else hash_block(block, len(block))


FRAME = FRAME_START | FRAME_END  # a record that is a frame of its own


def compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(data)


@dataclass
class World:
    """A base and a target of 16 blocks of 4 KiB, and the parts to build patches between them.

    base:   blocks 0..11 data, 12..15 holes.
    target: 0, 1 new data; 2 unchanged; 3 zeros; 4, 5 copies of base 8, 9; 6 new data;
            7..11 unchanged; 12 new data (a hole in the base); 13..15 holes.
    """

    tmp: Path
    base: bytes
    target: bytes
    header: PatchHeader
    dest: Path

    def block(self, data: bytes, i: int) -> bytes:
        return data[i * BS : (i + 1) * BS].ljust(BS, b"\0")

    def base_hash(self, i: int) -> bytes:
        return state(self.block(self.base, i))

    def target_hash(self, i: int) -> bytes:
        return state(self.block(self.target, i))

    def data(self, first: int, count: int = 1) -> Record:
        meta = b"".join(self.base_hash(i) + self.target_hash(i) + LITERAL
                        for i in range(first, first + count))
        return Record(REC_DATA, first, count, meta,
                      payload=compress(self.target[first * BS : (first + count) * BS]), flags=FRAME)

    def evil_data(self, first: int, base: bytes | None = None, content: bytes = EVIL) -> Record:
        """A one-block DATA record, self-consistent, writing content over block first."""
        base = self.base_hash(first) if base is None else base
        return Record(REC_DATA, first, 1, base + state(content) + LITERAL, payload=compress(content),
                      flags=FRAME)

    def zero(self, first: int, count: int = 1) -> Record:
        meta = b"".join(self.base_hash(i) for i in range(first, first + count))
        return Record(REC_ZERO, first, count, meta)

    def copy(self, first: int, count: int, source: int) -> Record:
        """A COPY record whose target hashes are those of the source blocks."""
        meta = b"".join(self.base_hash(first + k) + self.base_hash(source + k) for k in range(count))
        return Record(REC_COPY, first, count, meta, source_block=source)

    def valid(self) -> list[Record]:
        return [self.data(0, 2), self.zero(3), self.copy(4, 2, 8), self.data(6), self.data(12)]

    def patch(self, records: list[Record], header: dict[str, int] | None = None,
              bump: str | None = None) -> bytes:
        """Records between a header and a trailer that agrees with them (or, with bump, whose
        field of that name is one more than it should be)."""
        body = encode_patch_header(dataclasses.replace(self.header, **(header or {})))
        body += b"".join(encode_record(r) for r in records)
        blocks = {k: sum(r.count for r in records if r.kind == k) for k in REC_NAMES}
        t = PatchTrailer(len(records), blocks[REC_DATA], blocks[REC_ZERO], blocks[REC_COPY],
                         sum(len(r.payload) for r in records), len(body))
        if bump:
            t = dataclasses.replace(t, **{bump: getattr(t, bump) + 1})
        return body + encode_patch_trailer(t)

    def expected_after(self, written: set[int]) -> bytes:
        """The destination once exactly the blocks `written` received their target content."""
        out = bytearray(self.base)
        for i in written:
            out[i * BS : (i + 1) * BS] = self.block(self.target, i)
        return bytes(out)


@pytest.fixture
def world(tmp: Path) -> World:
    base_map: list[tuple[int, bytes | int]] = [(i * BS, pattern(BS, 100 + i)) for i in range(12)]
    base = make_sparse(tmp / "base.img", SIZE, base_map)
    b = base.read_bytes()
    blocks = [b[i * BS : (i + 1) * BS] for i in range(N)]
    blocks[0], blocks[1], blocks[6], blocks[12] = (pattern(BS, 200 + i) for i in (0, 1, 6, 12))
    blocks[3] = bytes(BS)
    blocks[4], blocks[5] = blocks[8], blocks[9]
    target_map: list[tuple[int, bytes | int]] = [(i * BS, blk) for i, blk in enumerate(blocks) if any(blk)]
    target = make_sparse(tmp / "target.img", SIZE, target_map)
    ids = []
    for f in (base, target):
        api.signature(str(f), str(tmp / f"{f.name}.sig"), block_size=BS)
        ids.append(bytes.fromhex(api.info(str(tmp / f"{f.name}.sig"))["identity"]))
    header = PatchHeader(0, SHIFT, SIZE, SIZE, ids[0], ids[1], window_log=MAX_WINDOW_LOG)
    dest = make_sparse(tmp / "dest.img", SIZE, base_map)
    return World(tmp, b, target.read_bytes(), header, dest)


# ---------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Hostile:
    name: str
    build: Callable[[World], bytes]
    error: type[SparsePatchError]
    fragments: tuple[str, ...]
    written_first: frozenset[int] = frozenset()  # blocks honest records before it write (stdin)


def _huge_payload_prefix(w: World) -> bytes:
    """Header, then a DATA record announcing 2^32-1 bytes of payload; 64 bytes follow."""
    meta = w.base_hash(0) + w.target_hash(0) + LITERAL
    head = RECORD.pack(REC_DATA, FRAME_START | FRAME_END, 0, 1, (1 << 32) - 1, 0)
    return (encode_patch_header(w.header) + head + meta + CRC.pack(crc32c(meta, crc32c(head)))
            + pattern(64, 1))


def _huge_count_prefix(w: World) -> bytes:
    """Header, then a ZERO record of 2^32-1 blocks (64 GiB of hashes announced); 64 bytes follow."""
    head = RECORD.pack(REC_ZERO, 0, 0, (1 << 32) - 1, 0, 0)
    meta = w.base_hash(0)
    return (encode_patch_header(w.header) + head + meta + CRC.pack(crc32c(meta, crc32c(head)))
            + pattern(64, 2))


def bomb() -> bytes:
    """64 MiB of zeros in about 2 KiB: a frame that declares its 64 MiB."""
    out = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True).compress(
        bytes(64 * MiB))
    assert zstandard.frame_content_size(out) == 64 * MiB
    return out


def lying_bomb() -> bytes:
    """The same frame with its content size field rewritten to one block: it declares 4096
    bytes and holds 64 MiB."""
    out = bytearray(bomb())
    assert out[4] >> 6 == 2 and not out[4] & 0x20, "expected a 4-byte size after a window byte"
    struct.pack_into("<I", out, 6, BS)
    assert zstandard.frame_content_size(bytes(out)) == BS
    return bytes(out)


def _bad_target_hash(w: World, rec: Record, k: int) -> Record:
    meta = bytearray(rec.meta)
    w_ = rec.meta_width
    meta[k * w_ + 16 : k * w_ + 32] = state(EVIL)
    return dataclasses.replace(rec, meta=bytes(meta))


CASES = [
    Hostile("data record beyond the target",
            lambda w: w.patch([w.data(0, 2), w.evil_data(16, base=ZERO_HASH)]), FormatError,
            ("record 1 (data)", "blocks 16..16 lie beyond the target (16 blocks, 65536 bytes)"),
            frozenset({0, 1})),
    Hostile("zero record running past the end",
            lambda w: w.patch([Record(REC_ZERO, 14, 3, ZERO_HASH * 3)]), FormatError,
            ("record 0 (zero)", "blocks 14..16 lie beyond the target (16 blocks")),
    Hostile("record at block 2^64-1",
            lambda w: w.patch([dataclasses.replace(w.evil_data(0), first_block=(1 << 64) - 1)]),
            FormatError, ("record 0 (data)", f"blocks {(1 << 64) - 1}..", "lie beyond the target")),
    Hostile("overlapping records",
            # The second record takes the first one's output as its base: applied, block 1
            # would end up neither base nor target.
            lambda w: w.patch([w.data(0, 2), w.evil_data(1, base=w.target_hash(1))]), FormatError,
            ("record 1 (data)", "starts at block 1, before the end of the previous record (block 2)",
             "records overlap or are out of order"), frozenset({0, 1})),
    Hostile("records out of order",
            lambda w: w.patch([w.data(6), w.data(0, 2)]), FormatError,
            ("record 1 (data)", "starts at block 0, before the end of the previous record (block 7)"),
            frozenset({6})),
    Hostile("record repeated",
            lambda w: w.patch([w.data(0, 2), w.zero(3), w.data(0, 2)]), FormatError,
            ("record 2 (data)", "starts at block 0, before the end of the previous record (block 4)"),
            frozenset({0, 1, 3})),
    Hostile("copy from a block an earlier record changes",
            lambda w: w.patch([w.data(0, 2), w.copy(4, 2, 0)]), FormatError,
            ("record 1 (copy)", "copies from a block an earlier record changes"), frozenset({0, 1})),
    Hostile("copy from a block a later record changes",
            lambda w: w.patch([w.copy(4, 2, 8), w.evil_data(8)]), FormatError,
            ("record 1 (data)", "changes a block an earlier copy record reads from"),
            frozenset({4, 5})),
    Hostile("copy source overlapping its destination",
            lambda w: w.patch([w.copy(4, 2, 5)]), FormatError,
            ("record 0 (copy)", "copy source overlaps its own destination")),
    Hostile("copy source beyond the base",
            lambda w: w.patch([w.copy(4, 2, 15)]), FormatError,
            ("record 0 (copy)", "copy source blocks 15..16 lie beyond the base")),
    *[Hostile(f"trailer {field} disagrees",
              lambda w, f=field: w.patch(w.valid(), bump=f),
              FormatError, ("trailer at byte", "disagree with the records read"),
              frozenset({0, 1, 3, 4, 5, 6, 12}))
      for field in ("records", "data_blocks", "zero_blocks", "copy_blocks", "payload_bytes",
                    "body_bytes")],
    *[Hostile(f"{field.replace('_', ' ')} 2^{bits}",
              lambda w, f=field, b=bits: w.patch(w.valid(), header={f: 1 << b}), FormatError,
              (f"{field.replace('_', ' ')} {1 << bits} exceeds the limit of 2^60 bytes",
               f"at byte {16 if field == 'base_size' else 24}"))
      for field in ("target_size", "base_size") for bits in (63, 61)],
    Hostile("payload length 2^32-1", _huge_payload_prefix, FormatError,
            ("record 0 (data)",
             f"payload length 4294967295 is outside 0..{payload_limit(BS, True)} for 1 blocks of data")),
    Hostile("block count 2^32-1", _huge_count_prefix, FormatError,
            ("record 0 (zero)", f"block count 4294967295 is outside 1..{MAX_RECORD_BLOCKS}")),
    Hostile("zstd bomb: 64 MiB declared in a one-block record",
            lambda w: w.patch([dataclasses.replace(w.data(0), payload=bomb())]), FormatError,
            ("record 0 (data)", "declares 67108864 bytes, the record alone carries 4096")),
    Hostile("zstd bomb: one block declared, 64 MiB inside",
            lambda w: w.patch([w.data(0, 2), dataclasses.replace(w.data(6), payload=lying_bomb())]),
            FormatError, ("record 1 (data)", "corrupt zstd data"),
            frozenset({0, 1})),
    Hostile("data that does not match its target hash",
            lambda w: w.patch([_bad_target_hash(w, w.data(0, 2), 1)]), ChecksumMismatch,
            ("record 0 (data)", "block 1 does not match its target hash after decompression")),
    Hostile("data that does not match its target hash, after a good record",
            lambda w: w.patch([w.data(0, 2), w.zero(3), _bad_target_hash(w, w.data(6), 0)]),
            ChecksumMismatch,
            ("record 2 (data)", "block 6 does not match its target hash after decompression"),
            frozenset({0, 1, 3})),
    Hostile("zero hash as a data target",
            lambda w: w.patch([Record(REC_DATA, 0, 1, w.base_hash(0) + ZERO_HASH + LITERAL,
                                      payload=compress(bytes(BS)), flags=FRAME)]),
            FormatError, ("record 0 (data)", "block 0 has the zero hash as target")),
    Hostile("zero hash as a copy target",
            lambda w: w.patch([w.copy(4, 1, 13)]), FormatError,
            ("record 0 (copy)", "block 4 has the zero hash as target")),
]


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), allocated(path)


def journal(w: World) -> Path:
    return w.dest.parent / f".{w.dest.name}.sparsepatch-journal"


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", ["file", "stdin"])
def test_the_hand_built_patch_is_sound(world: World, mode: str) -> None:
    """The builder makes patches the tool accepts: every refusal below is the hostile part's."""
    patch = world.patch(world.valid())
    if mode == "file":
        (world.tmp / "good.patch").write_bytes(patch)
        api.apply(str(world.tmp / "good.patch"), str(world.dest), verify=True)
    else:
        run_cli("apply", "-", str(world.dest), "--verify", input=patch)
    assert world.dest.read_bytes() == world.target
    assert api.info(str(world.tmp / "target.img.sig"))["data_blocks"] == 12


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_from_a_file_before_the_first_write(world: World, case: Hostile) -> None:
    patch = world.tmp / "hostile.patch"
    patch.write_bytes(case.build(world))
    before = snapshot(world.dest)
    with pytest.raises(SparsePatchError) as info:
        api.apply(str(patch), str(world.dest))
    err = info.value
    assert type(err) is case.error, f"{type(err).__name__}: {err}"
    for frag in case.fragments:
        assert frag in str(err), f"{frag!r} not in {str(err)!r}"
    assert snapshot(world.dest) == before
    assert not journal(world).exists()
    line = error_line(run_cli("apply", str(patch), str(world.dest), check=False), case.error.exit_code)
    assert all(frag in line for frag in case.fragments), line
    assert snapshot(world.dest) == before


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_from_stdin_before_the_hostile_record_is_written(world: World, case: Hostile) -> None:
    r = run_cli("apply", "-", str(world.dest), input=case.build(world), check=False)
    line = error_line(r, case.error.exit_code)
    assert all(frag in line for frag in case.fragments), line
    assert world.dest.read_bytes() == world.expected_after(set(case.written_first))
    # What honest records wrote is a resumable state: the genuine patch finishes it.
    run_cli("apply", "-", str(world.dest), "--verify", input=world.patch(world.valid()))
    assert world.dest.read_bytes() == world.target
    assert not journal(world).exists()


def test_huge_payload_length_is_refused_without_waiting_for_it(world: World) -> None:
    """From a pipe that stays open, the record must be refused from its header alone: a
    reader that tried to read (or allocate) the 4 GiB payload would wait here for ever.
    In-process, from a file, refusing it allocates next to nothing."""
    before = snapshot(world.dest)
    for build in (_huge_payload_prefix, _huge_count_prefix):
        (world.tmp / "huge.patch").write_bytes(build(world))
        tracemalloc.start()
        try:
            with pytest.raises(FormatError, match="is outside [01].."):
                api.apply(str(world.tmp / "huge.patch"), str(world.dest))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * MiB, f"{build.__name__}: {peak} bytes allocated"
    for build in (_huge_payload_prefix, _huge_count_prefix):
        p = subprocess.Popen([sys.executable, "-m", "sparsepatch", "apply", "-", str(world.dest)],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert p.stdin is not None and p.stderr is not None
        try:
            p.stdin.write(build(world))
            p.stdin.flush()
            try:
                code = p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{build.__name__}: apply waited for the announced data instead of refusing")
            err = p.stderr.read().decode()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdin.close()
            p.stderr.close()
        assert code == 4, err
        assert "is outside 0.." in err or "is outside 1.." in err, err
    assert snapshot(world.dest) == before


def _peak_rss_kib(args: list[str], stdin: bytes) -> tuple[int, int, str]:
    """Run the command line; its exit code, peak resident set (KiB) and stderr."""
    p = subprocess.Popen([sys.executable, "-m", "sparsepatch", *args], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stderr is not None
    try:
        p.stdin.write(stdin)
        p.stdin.close()
        err = p.stderr.read().decode()
    finally:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stderr.close()
    return p.returncode, usage.ru_maxrss, err


@pytest.mark.parametrize("payload", [bomb, lying_bomb], ids=["declared", "lying"])
def test_zstd_bomb_is_refused_without_inflating_it(world: World, payload: Callable[[], bytes]) -> None:
    """A 2 KiB payload holding 64 MiB in a record of one block: refused with memory use far
    below 64 MiB, both in-process and by the command line reading stdin."""
    rec = dataclasses.replace(world.data(0), payload=payload())
    hostile = world.patch([rec])
    (world.tmp / "bomb.patch").write_bytes(hostile)
    before = snapshot(world.dest)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError) as info:
            api.apply(str(world.tmp / "bomb.patch"), str(world.dest))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "record 0 (data)" in str(info.value)
    assert peak < 8 * MiB, f"{peak} bytes allocated while refusing a bomb"
    assert snapshot(world.dest) == before

    code, bomb_kib, err = _peak_rss_kib(["apply", "-", str(world.dest)], hostile)
    assert code == 4, err
    assert snapshot(world.dest) == before
    # The same command applying an honest one-block record, for the baseline.
    code, good_kib, err = _peak_rss_kib(["apply", "-", str(world.dest)], world.patch([world.data(0)]))
    assert code == 0, err
    assert bomb_kib < good_kib + 16 * 1024, f"peak RSS {bomb_kib} KiB vs {good_kib} KiB"
