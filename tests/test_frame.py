"""The literal stream (spec section 5.2, rules 7, 11, 15 and 16): DATA payloads as zstd frames
across records, checked piece by piece as apply and verify decode them."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import zstandard

from sparsepatch import api
from sparsepatch.errors import ChecksumMismatch, FormatError, SparsePatchError
from sparsepatch.format import (
    FRAME_END,
    FRAME_START,
    REC_DATA,
    REC_ZERO,
    FrameDecoder,
    PatchHeader,
    PatchReader,
    PatchTrailer,
    Record,
    decode_data,
    encode_patch_header,
    encode_patch_trailer,
    encode_record,
    hash_block,
)

BS = 4096
ROOT = Path(__file__).resolve().parent.parent


def _blocks(n: int, seed: int) -> list[bytes]:
    import random

    rng = random.Random(seed)
    # Compressible and repeating: a frame across records finds the repeats.
    word = rng.randbytes(512)
    return [word[: 64 + k] * (BS // (64 + k)) + rng.randbytes(BS % (64 + k)) for k in range(n)]


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    """A base and a target with three DATA records and a ZERO record, and its patch."""
    n = 32
    base = [os.urandom(BS) for _ in range(n)]
    target = list(base)
    new = _blocks(12, 1)
    for i, blk in zip([1, 2, 3, 8, 9, 20, 21, 22, 23, 24, 25, 30], new, strict=True):
        target[i] = blk
    target[12] = bytes(BS)
    (tmp_path / "base.img").write_bytes(b"".join(base))
    (tmp_path / "target.img").write_bytes(b"".join(target))
    api.signature(str(tmp_path / "base.img"), str(tmp_path / "base.sig"), block_size=BS)
    api.diff(str(tmp_path / "base.sig"), str(tmp_path / "target.img"), str(tmp_path / "p.patch"))
    return {"tmp": tmp_path, "base": b"".join(base), "target": b"".join(target),
            "patch": (tmp_path / "p.patch").read_bytes()}


def parse(data: bytes) -> tuple[PatchReader, list[Record]]:
    reader = PatchReader(io.BytesIO(data).read, "patch")
    return reader, list(reader.records())


def assemble(header: PatchHeader, records: list[Record]) -> bytes:
    body = encode_patch_header(header) + b"".join(encode_record(r) for r in records)
    counts = {k: sum(r.count for r in records if r.kind == k) for k in (1, 2, 3)}
    return body + encode_patch_trailer(PatchTrailer(len(records), counts[1], counts[2], counts[3],
                                                    sum(len(r.payload) for r in records), len(body)))


def decode_all(data: bytes) -> list[bytes]:
    reader, records = parse(data)
    frames = FrameDecoder(reader.header)
    return [decode_data(frames, r) for r in records if r.kind == REC_DATA]


def refused(cls: type[SparsePatchError], data: bytes, *fragments: str) -> str:
    with pytest.raises(SparsePatchError) as info:
        decode_all(data)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    for f in fragments:
        assert f in str(info.value), str(info.value)
    return str(info.value)


def test_diff_writes_one_frame_across_records(world: dict[str, Any]) -> None:
    reader, records = parse(world["patch"])
    data = [r for r in records if r.kind == REC_DATA]
    assert len(data) == 4
    assert [r.flags for r in data] == [FRAME_START, 0, 0, FRAME_END]
    assert [r.flags for r in records if r.kind != REC_DATA] == [0]
    raw = 12 * BS
    assert reader.header.window_log == max(10, (raw - 1).bit_length())
    assert reader.frames == 1
    info = api.info(str(world["tmp"] / "p.patch"))
    assert (info["frames"], info["window_log"]) == (1, reader.header.window_log)
    target = world["target"]
    assert decode_all(world["patch"]) == [target[r.first_block * BS : (r.first_block + r.count) * BS]
                                          for r in data]


def test_window_log_option_caps_the_window(world: dict[str, Any]) -> None:
    t = world["tmp"]
    api.diff(str(t / "base.sig"), str(t / "target.img"), str(t / "w.patch"), window_log=10)
    reader, _ = parse((t / "w.patch").read_bytes())
    assert reader.header.window_log == 10
    with pytest.raises(SparsePatchError, match="window log 28 is outside 10..27"):
        api.diff(str(t / "base.sig"), str(t / "target.img"), str(t / "x.patch"), window_log=28)
    r = subprocess.run([sys.executable, "-m", "sparsepatch", "diff", "--window-log", "9",
                        str(t / "base.sig"), str(t / "target.img"), "-o", str(t / "y.patch")],
                       capture_output=True, cwd=ROOT)
    assert r.returncode == 2 and b"--window-log" in r.stderr


def test_no_literal_gives_window_log_0(tmp_path: Path) -> None:
    base = os.urandom(8 * BS)
    (tmp_path / "b.img").write_bytes(base)
    (tmp_path / "t.img").write_bytes(base[: 4 * BS] + bytes(4 * BS))
    api.signature(str(tmp_path / "b.img"), str(tmp_path / "b.sig"), block_size=BS)
    api.diff(str(tmp_path / "b.sig"), str(tmp_path / "t.img"), str(tmp_path / "p.patch"))
    reader, records = parse((tmp_path / "p.patch").read_bytes())
    assert reader.header.window_log == 0 and reader.frames == 0
    assert [r.kind for r in records] == [REC_ZERO]


def test_patch_bytes_do_not_depend_on_the_cpus(world: dict[str, Any]) -> None:
    """The same patch with one CPU and with all of them (diff's reading thread, the
    scanner's worker process)."""
    import shutil

    if shutil.which("taskset") is None:
        pytest.skip("taskset (Debian package util-linux) is not installed")
    t = world["tmp"]
    outs = []
    for cpus in ("0", ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))):
        out = t / f"cpu{len(outs)}.patch"
        subprocess.run(["taskset", "-c", cpus, sys.executable, "-m", "sparsepatch", "diff",
                        str(t / "base.sig"), str(t / "target.img"), "-o", str(out)],
                       check=True, cwd=ROOT)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == world["patch"]


# ---------------------------------------------------------------- damaged and hostile frames


def test_truncated_and_corrupt_pieces_are_refused(world: dict[str, Any]) -> None:
    reader, records = parse(world["patch"])
    h = reader.header
    k = next(i for i, r in enumerate(records) if r.kind == REC_DATA and not r.flags)
    rec = records[k]
    # A piece cut short: the record no longer ends at a block boundary.
    cut = dataclasses.replace(rec, payload=rec.payload[:-1])
    msg = refused(FormatError, assemble(h, [*records[:k], cut, *records[k + 1 :]]),
                  f"record {k} (data)", "payload ends inside the zstd block")
    assert "at byte" in msg
    # A flipped byte inside the piece: refused, by the decoder, the target hashes, or the
    # frame's checksum at its end.
    for pos in range(len(rec.payload)):
        bad = bytearray(rec.payload)
        bad[pos] ^= 0x5A
        with pytest.raises(FormatError):  # ChecksumMismatch is a FormatError
            decode_all(assemble(h, [*records[:k], dataclasses.replace(rec, payload=bytes(bad)),
                                    *records[k + 1 :]]))


def test_the_content_checksum_is_a_checksum_mismatch(world: dict[str, Any]) -> None:
    reader, records = parse(world["patch"])
    k = max(i for i, r in enumerate(records) if r.kind == REC_DATA)
    rec = records[k]
    assert rec.flags & FRAME_END
    bad = bytearray(rec.payload)
    bad[-1] ^= 1
    refused(ChecksumMismatch, assemble(reader.header, [*records[:k],
                                                        dataclasses.replace(rec, payload=bytes(bad)),
                                                        *records[k + 1 :]]),
            f"record {k} (data)", "content checksum")


def test_reordered_pieces_are_refused(world: dict[str, Any]) -> None:
    """Two pieces of one frame swapped (with their blocks, so rule 8 holds): each piece
    decodes only after the ones before it."""
    reader, records = parse(world["patch"])
    data = [i for i, r in enumerate(records) if r.kind == REC_DATA]
    a, b = records[data[1]], records[data[2]]
    swapped = list(records)
    swapped[data[1]] = dataclasses.replace(a, payload=b.payload)
    swapped[data[2]] = dataclasses.replace(b, payload=a.payload)
    with pytest.raises(FormatError):
        decode_all(assemble(reader.header, swapped))
    # A piece that opens a frame, moved after a piece of the frame: a frame flag out of order.
    first = records[data[0]]
    moved = list(records)
    moved[data[0]] = dataclasses.replace(first, payload=a.payload, flags=0)
    with pytest.raises(FormatError, match="no frame is open"):
        parse(assemble(reader.header, moved))


def test_a_frame_left_open_is_refused(world: dict[str, Any]) -> None:
    reader, records = parse(world["patch"])
    k = max(i for i, r in enumerate(records) if r.kind == REC_DATA)
    open_ = [*records[:k], dataclasses.replace(records[k], flags=0), *records[k + 1 :]]
    with pytest.raises(FormatError, match="is not closed .no FRAME_END before the trailer."):
        parse(assemble(reader.header, open_))
    # Only the records: the last block flag in a record that does not close the frame.
    reader2, records2 = parse(assemble(reader.header, records))
    frames = FrameDecoder(reader2.header)
    for r in records2[:k]:
        if r.kind == REC_DATA:
            frames.decode(r)
    with pytest.raises(FormatError, match="is the frame's last, but the record does not close"):
        frames.decode(dataclasses.replace(records2[k], flags=0))
    # Two frames opened without the first closed.
    data = [i for i, r in enumerate(records) if r.kind == REC_DATA]
    twice = list(records)
    twice[data[1]] = dataclasses.replace(records[data[1]], flags=FRAME_START)
    with pytest.raises(FormatError, match="opens a frame while the frame opened by"):
        parse(assemble(reader.header, twice))


def test_a_window_above_the_headers_is_refused(world: dict[str, Any]) -> None:
    reader, records = parse(world["patch"])
    small = dataclasses.replace(reader.header, window_log=10)
    refused(FormatError, assemble(small, records), "record 0 (data)",
            "more than the patch header's 2^10")
    none = dataclasses.replace(reader.header, window_log=0)
    with pytest.raises(FormatError, match="window_log .byte 14. is 0"):
        parse(assemble(none, records))


def test_a_flags_bit_on_a_zero_record_is_refused(world: dict[str, Any]) -> None:
    reader, records = parse(world["patch"])
    k = next(i for i, r in enumerate(records) if r.kind == REC_ZERO)
    for flags in (FRAME_START, FRAME_END, 0x80):
        bad = [*records[:k], dataclasses.replace(records[k], flags=flags), *records[k + 1 :]]
        with pytest.raises(FormatError, match=f"record {k} .zero. at byte .*has unknown bits set"):
            parse(assemble(reader.header, bad))


def _bomb_world(tmp: Path, declared: int) -> tuple[bytes, bytes]:
    """A one-block patch whose record carries 4096 bytes but whose payload holds a frame
    that decodes to 64 MiB of zeros (an honest content size past the record); the base."""
    base = os.urandom(BS)
    target = b"\x01" * BS
    (tmp / "b.img").write_bytes(base)
    (tmp / "t.img").write_bytes(target)
    api.signature(str(tmp / "b.img"), str(tmp / "b.sig"), block_size=BS)
    api.diff(str(tmp / "b.sig"), str(tmp / "t.img"), str(tmp / "p.patch"))
    reader, records = parse((tmp / "p.patch").read_bytes())
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=17, write_checksum=1,
                                                           write_content_size=1)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj(size=declared)
    payload = cobj.compress(bytes(declared)) + cobj.flush()
    assert len(payload) < 16 << 10
    rec = dataclasses.replace(records[0], payload=payload)
    assert hash_block(target, BS) == rec.target_hash(0)
    return assemble(reader.header, [rec]), base


def test_a_bomb_record_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    patch, base = _bomb_world(tmp_path, 64 << 20)
    # The frame says 64 MiB, the record 4096 bytes, and it closes the frame.
    refused(FormatError, patch, "record 0 (data)", "declares 67108864 bytes, the record alone carries 4096")
    # Without FRAME_END the header is plausible (a frame across records); the blocks are
    # decoded one at a time and the first that passes the record's 4096 bytes stops it.
    reader, records = parse(patch)
    rec = dataclasses.replace(records[0], flags=FRAME_START)
    frames = FrameDecoder(dataclasses.replace(reader.header, window_log=27))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="decodes past the record's 4096 bytes of literal|"
                                              "is the frame's last"):
            frames.decode(rec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_bomb_patch_is_refused_by_apply_within_bounded_memory(tmp_path: Path) -> None:
    """End to end, in a child whose peak RSS is measured: far below the 64 MiB inside."""
    patch, base = _bomb_world(tmp_path, 64 << 20)
    # The record opens the frame and does not close it, and the header allows the largest
    # window: only the record's own 4096 bytes bound what it may decode to. (The reader
    # would refuse the open frame at the trailer, after the dry run decoded the record.)
    reader, records = parse(patch)
    patch = assemble(dataclasses.replace(reader.header, window_log=27),
                     [dataclasses.replace(records[0], flags=FRAME_START)])
    (tmp_path / "bomb.patch").write_bytes(patch)
    (tmp_path / "dest.img").write_bytes(base)
    # The child's own peak (VmHWM: its memory since exec; ru_maxrss would count the
    # test process it was forked from).
    code = ("import sys\nfrom sparsepatch import api, SparsePatchError\n"
            "try:\n    api.apply(sys.argv[1], sys.argv[2])\n"
            "except SparsePatchError as e:\n    print('refused:', e)\n"
            "print([x for x in open('/proc/self/status') if x.startswith('VmHWM')][0])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.patch"),
                        str(tmp_path / "dest.img")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "record 0 (data)" in r.stdout, r.stdout
    assert "decodes past the record's 4096 bytes" in r.stdout, r.stdout
    peak_kib = int(r.stdout.split("VmHWM:")[1].split()[0])
    assert peak_kib < 60 << 10, r.stdout  # far below the 64 MiB inside
    assert (tmp_path / "dest.img").read_bytes() == base


# ---------------------------------------------------------------- apply: file, stdin, resume


@pytest.mark.parametrize("mode", ["file", "stdin"])
def test_apply_decodes_the_stream_from_a_file_and_from_stdin(world: dict[str, Any], mode: str) -> None:
    t = world["tmp"]
    dest = t / "dest.img"
    dest.write_bytes(world["base"])
    args = [sys.executable, "-m", "sparsepatch", "apply"]
    if mode == "file":
        r = subprocess.run([*args, str(t / "p.patch"), str(dest)], capture_output=True, cwd=ROOT)
    else:
        r = subprocess.run([*args, "-", str(dest)], input=world["patch"], capture_output=True,
                           cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == world["target"]


def test_apply_decodes_records_already_applied(world: dict[str, Any]) -> None:
    """A destination whose first DATA record is already the target: its blocks are skipped,
    but its piece of the frame is decoded, or the next record could not be."""
    t = world["tmp"]
    reader, records = parse(world["patch"])
    first = next(r for r in records if r.kind == REC_DATA)
    dest = bytearray(world["base"])
    a, b = first.first_block * BS, (first.first_block + first.count) * BS
    dest[a:b] = world["target"][a:b]
    (t / "dest.img").write_bytes(bytes(dest))
    stats = api.apply(str(t / "p.patch"), str(t / "dest.img"))
    assert (t / "dest.img").read_bytes() == world["target"]
    assert stats.blocks_skipped == first.count


def test_undo_round_trips_with_a_frame_per_record(world: dict[str, Any]) -> None:
    t = world["tmp"]
    dest = t / "dest.img"
    dest.write_bytes(world["base"])
    api.apply(str(t / "p.patch"), str(dest), undo=str(t / "undo.patch"))
    assert dest.read_bytes() == world["target"]
    reader, records = parse((t / "undo.patch").read_bytes())
    data = [r for r in records if r.kind == REC_DATA]
    assert data and all(r.flags == FRAME_START | FRAME_END for r in data)
    assert reader.header.window_log == 23  # the largest undo record: 8 MiB
    api.apply(str(t / "undo.patch"), str(dest))
    assert dest.read_bytes() == world["base"]


def test_frames_are_cut_at_record_boundaries(world: dict[str, Any],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """At most MAX_FRAME_RAW of literal a frame (1 GiB; made small here): a new frame opens
    at the record that would pass it, and each applies in turn."""
    t = world["tmp"]
    monkeypatch.setattr(sys.modules["sparsepatch.writer"], "MAX_FRAME_RAW", 5 * BS)
    api.diff(str(t / "base.sig"), str(t / "target.img"), str(t / "f.patch"))
    reader, records = parse((t / "f.patch").read_bytes())
    data = [r for r in records if r.kind == REC_DATA]
    assert [(r.count, r.flags) for r in data] == [
        (3, FRAME_START), (2, FRAME_END), (6, FRAME_START | FRAME_END), (1, FRAME_START | FRAME_END)]
    assert reader.frames == 3
    assert reader.header.window_log == max(10, (6 * BS - 1).bit_length())
    dest = t / "dest.img"
    dest.write_bytes(world["base"])
    api.apply(str(t / "f.patch"), str(dest))
    assert dest.read_bytes() == world["target"]
