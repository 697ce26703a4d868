"""Moved content end to end, through the command line: regions swapped, rotated, shifted by one
page, or moved out of blocks the patch punches or rewrites. The result must be the target byte
for byte and as sparse, the patch about the size of the new data only, and an apply killed
while staging or writing must finish when run again; a lost scratch, no room for it, and
hostile patches are refused before the destination changes."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KiB, MiB, allocated_blocks, error_line, make_sparse, pattern, run_cli, sparse_copy

from sparsepatch.format import (
    REC_COPY,
    REC_DATA,
    REC_STAGE,
    REC_ZERO,
    PatchReader,
    PatchTrailer,
    Record,
    encode_patch_header,
    encode_patch_trailer,
    encode_record,
)

BS = 16 * KiB  # the default block size
PAGE = 4 * KiB


def build(tmp: Path, base_map: list[tuple[int, bytes | int]], size: int,
          move: list[tuple[int, int, int]], extra: list[tuple[int, bytes | int]] | None = None
          ) -> tuple[Path, Path]:
    """base.img from base_map; target.img = base with, for each (src, dst, n), the base's
    bytes [src, src+n) at dst (all moves read the base), then extra written over it (an int:
    that many zeros)."""
    base = make_sparse(tmp / "base.img", size, base_map)
    data = base.read_bytes()
    out = bytearray(data)
    for src, dst, n in move:
        out[dst : dst + n] = data[src : src + n]
    for off, piece in extra or []:
        if isinstance(piece, int):
            piece = bytes(piece)
        out[off : off + len(piece)] = piece
    return base, sparse_copy(out, tmp / "target.img")


def nonzero_blocks(path: Path) -> set[int]:
    data = path.read_bytes()
    return {i // BS for i in range(0, len(data), BS) if any(data[i : i + BS])}


def diff(tmp: Path, base: Path, target: Path) -> tuple[Path, dict[str, object]]:
    sig, patch = tmp / "base.sig", tmp / "t.patch"
    run_cli("signature", str(base), "-o", str(sig))
    out = json.loads(run_cli("diff", str(sig), str(target), "-o", str(patch), "--json", "-q").stdout)
    return patch, out


def dest_of(tmp: Path, base: Path) -> Path:
    return sparse_copy(base.read_bytes(), tmp / "dest.img")


def side_files(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if "sparsepatch-" in n)


def check_target(dest: Path, target: Path) -> None:
    assert dest.read_bytes() == target.read_bytes()
    assert allocated_blocks(dest, BS) <= nonzero_blocks(target)  # still sparse
    assert not side_files(dest.parent)  # journal and scratch gone


N = 8 * MiB  # region size: large enough that patch size against moved data means something

SCENARIOS = {
    # Two regions swapped: one of them must be staged (2-cycles).
    "swap": ([(0, 24 * MiB)], 32 * MiB, [(2 * MiB, 14 * MiB, N), (14 * MiB, 2 * MiB, N)], []),
    # Three regions rotated, a 3-cycle.
    "rotate": ([(0, 30 * MiB)], 32 * MiB,
               [(0, 3 * MiB, 3 * MiB), (3 * MiB, 6 * MiB, 3 * MiB), (6 * MiB, 0, 3 * MiB)], []),
    # Shifted up by one 4 KiB page: every source lies in the same block or the one before.
    "shift-up": ([(0, 16 * MiB)], 24 * MiB, [(4 * MiB, 4 * MiB + PAGE, N)], []),
    # Shifted down by one page: sources in the same block or the next, read in place.
    "shift-down": ([(0, 16 * MiB)], 24 * MiB, [(4 * MiB + PAGE, 4 * MiB, N)], []),
    # Moved out of blocks the patch punches (zeroed in the target) or rewrites with new data.
    "from-punched-and-rewritten": (
        [(0, 20 * MiB)], 24 * MiB, [(2 * MiB, 12 * MiB, 4 * MiB), (8 * MiB, 16 * MiB, 2 * MiB)],
        [(2 * MiB, 4 * MiB), (8 * MiB, pattern(2 * MiB, 77))]),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_moved_content_applies_byte_identical_and_sparse(name: str, tmp: Path) -> None:
    base_map, size, move, extra = SCENARIOS[name]
    base, target = build(tmp, base_map, size, move, extra)
    patch, stats = diff(tmp, base, target)
    moved = sum(n for _, _, n in move)
    new = sum(len(p) for _, p in extra if isinstance(p, bytes))
    assert isinstance(stats["moved_pages"], int) and stats["moved_pages"] * PAGE >= moved * 0.95
    # The patch carries the new data and 16 bytes or so a moved page, never the moved bytes.
    assert os.path.getsize(patch) < new + moved // 50, (os.path.getsize(patch), moved)
    dest = dest_of(tmp, base)
    out = json.loads(run_cli("apply", str(patch), str(dest), "--json", "-q").stdout)
    check_target(dest, target)
    assert out["moved_pages"] == stats["moved_pages"]
    assert out["scratch_bytes"] == PAGE * int(stats["stage_pages"])  # type: ignore[call-overload]
    if name in ("swap", "rotate", "shift-up"):
        assert out["scratch_bytes"] > 0  # overwritten before they are read: staged
    info = json.loads(run_cli("info", str(patch), "--json").stdout)
    assert info["moved_pages"] == stats["moved_pages"] and info["stage_pages"] == stats["stage_pages"]
    # Again: already the target, nothing written, nothing staged, nothing left behind.
    again = json.loads(run_cli("apply", str(patch), str(dest), "--json", "-q").stdout)
    assert again["bytes_written"] == 0 and again["scratch_bytes"] == 0
    check_target(dest, target)


def test_moved_content_from_a_stream(tmp: Path) -> None:
    base, target = build(tmp, *SCENARIOS["swap"][:3], [])
    patch, _ = diff(tmp, base, target)
    # diff from a stream writes the same patch as from the file.
    streamed = run_cli("diff", str(tmp / "base.sig"), "-", input=target.read_bytes()).stdout
    assert streamed == patch.read_bytes()
    run_cli("verify", str(patch))  # on its own: what it can check without the base
    dest = dest_of(tmp, base)
    run_cli("apply", "-", str(dest), "-q", input=patch.read_bytes())
    check_target(dest, target)


@pytest.fixture
def rotated(tmp: Path) -> tuple[Path, Path, Path, Path]:
    """Base, target, patch and a copy of the base for a 3-cycle of 3 MiB regions (1536 pages
    staged: 6 MiB)."""
    base, target = build(tmp, *SCENARIOS["rotate"][:3], [])
    patch, _ = diff(tmp, base, target)
    return base, target, patch, dest_of(tmp, base)


# A kill at a chosen call: the apply runs in a child process with one function wrapped to
# SIGKILL the process on its Nth call (or after it, with after=True).
KILLER = """
import os, signal, sys, importlib
mod = importlib.import_module(sys.argv[1]); *cls, fn = sys.argv[2].split('.')
n, after = int(sys.argv[3]), sys.argv[4] == 'after'
owner = getattr(mod, cls[0]) if cls else mod
real = getattr(owner, fn)
calls = [0]
def wrapped(*a, **k):
    calls[0] += 1
    if calls[0] == n and not after:
        os.kill(os.getpid(), signal.SIGKILL)
    r = real(*a, **k)
    if calls[0] == n and after:
        os.kill(os.getpid(), signal.SIGKILL)
    return r
setattr(owner, fn, wrapped)
sys.argv = ['sparsepatch'] + sys.argv[5:]
from sparsepatch.cli import main
main()
"""


def killed(where: str, n: int, when: str, *args: str, surely: bool = True) -> bool:
    """Run sparsepatch args, killed at the nth call of where (module:function or
    module:Class.method); whether it was (if surely, it must be)."""
    module, func = where.rsplit(":", 1)
    r = subprocess.run([sys.executable, "-c", KILLER, module, func, str(n), when, *args],
                       capture_output=True)
    assert r.returncode in ((-9,) if surely else (-9, 0)), r.stderr.decode()
    return r.returncode == -9


# The rotation stages 1536 pages (6 writes of 1 MiB to the scratch), writes one journal slot,
# then 9 MiB to the destination in writes of 1 MiB.
WRITES = "sparsepatch.sparse:pwrite_full"


@pytest.mark.parametrize("where, n, when", [
    ("sparsepatch.scratch:Scratch.write", 3, "before"),  # half the pages staged, no journal
    ("sparsepatch.scratch:Scratch.sync", 1, "after"),  # staged and synced, no journal yet
    ("sparsepatch.journal:Journal.write", 1, "after"),  # the first slot, nothing written
    (WRITES, 6 + 1 + 4, "before"),  # staged sources overwritten
    (WRITES, 6 + 1 + 8, "after"),
])
def test_killed_while_staging_or_writing_then_rerun(rotated: tuple[Path, Path, Path, Path],
                                                    where: str, n: int, when: str) -> None:
    base, target, patch, dest = rotated
    killed(where, n, when, "apply", str(patch), str(dest))
    if where == WRITES:
        assert dest.read_bytes() != base.read_bytes()  # staged sources are gone from dest now
    # A second kill while the rerun writes, then the rerun that finishes.
    killed(WRITES, 3, "before", "apply", str(patch), str(dest), surely=False)
    run_cli("apply", str(patch), str(dest), "-q")
    check_target(dest, target)


def _scratch(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.sparsepatch-scratch"


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_lost_scratch_is_refused_naming_it(rotated: tuple[Path, Path, Path, Path], damage: str) -> None:
    base, target, patch, dest = rotated
    killed(WRITES, 6 + 1 + 4, "before", "apply", str(patch), str(dest))
    scratch = _scratch(dest)
    assert scratch.exists()
    if damage == "deleted":
        scratch.unlink()
    else:
        os.truncate(scratch, scratch.stat().st_size - PAGE)
    before = dest.read_bytes()
    line = error_line(run_cli("apply", str(patch), str(dest), check=False), 5)
    assert str(scratch) in line and ("missing" in line if damage == "deleted" else "bytes" in line)
    assert dest.read_bytes() == before


def test_damaged_scratch_page_is_refused_naming_it(rotated: tuple[Path, Path, Path, Path]) -> None:
    base, target, patch, dest = rotated
    killed(WRITES, 6 + 1 + 2, "before", "apply", str(patch), str(dest))
    scratch = _scratch(dest)
    with open(scratch, "r+b") as f:
        f.write(b"\xff" * PAGE)  # the first staged page, still needed
    line = error_line(run_cli("apply", str(patch), str(dest), check=False), 5)
    assert str(scratch) in line and "damaged" in line
    assert side_files(dest.parent) == [f".{dest.name}.sparsepatch-journal", scratch.name]


def test_patch_stream_cut_short_then_whole_patch(rotated: tuple[Path, Path, Path, Path]) -> None:
    """A stream refused midway keeps journal and scratch: the sources it overwrote are in the
    scratch alone, and the whole patch then resumes from it."""
    base, target, patch, dest = rotated
    blob = patch.read_bytes()
    records = list(PatchReader(io.BytesIO(blob).read).records())
    assert [r.kind for r in records] == [REC_STAGE, REC_DATA, REC_DATA]
    cut = blob[: records[2].offset + 40]  # the first DATA record whole: written
    error_line(run_cli("apply", "-", str(dest), input=cut, check=False), 4)
    assert dest.read_bytes() != base.read_bytes()
    assert len(side_files(dest.parent)) == 2  # journal and scratch
    run_cli("apply", "-", str(dest), "-q", input=blob)
    check_target(dest, target)


def _mount_small(where: Path, size: str) -> bool:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True)
    return r.returncode == 0


def test_no_room_for_the_scratch_is_refused_before_any_write(rotated: tuple[Path, Path, Path, Path],
                                                             tmp: Path) -> None:
    base, target, patch, dest = rotated
    small = tmp / "small"
    if os.geteuid() != 0 or not _mount_small(small, "1m"):
        pytest.skip("needs root to mount a 1 MiB tmpfs")
    try:
        before = (dest.read_bytes(), dest.stat().st_mtime_ns)
        r = run_cli("apply", str(patch), str(dest), "--scratch", str(small), check=False)
        line = error_line(r, 3)
        assert f"apply: scratch needs 6.0 MiB in {small}, " in line and "MiB free" in line, line
        assert (dest.read_bytes(), dest.stat().st_mtime_ns) == before
        assert not side_files(tmp) and not os.listdir(small)
        # With room elsewhere it goes through, and leaves nothing in that folder.
        roomy = tmp / "roomy"
        roomy.mkdir()
        run_cli("apply", str(patch), str(dest), "--scratch", str(roomy), "-q")
        check_target(dest, target)
        assert not os.listdir(roomy)
    finally:
        subprocess.run(["umount", str(small)], check=False)


def _rewrite(patch: Path, edit: Callable[[list[Record]], list[Record]]) -> bytes:
    """The patch re-encoded after edit(records) -> records, with a trailer that agrees."""
    reader = PatchReader(io.BytesIO(patch.read_bytes()).read)
    records = edit(list(reader.records()))
    body = encode_patch_header(reader.header) + b"".join(encode_record(r) for r in records)
    count = {k: sum(r.count for r in records if r.kind == k) for k in (REC_DATA, REC_ZERO, REC_COPY)}
    t = PatchTrailer(len(records), count[REC_DATA], count[REC_ZERO], count[REC_COPY],
                     sum(len(r.payload) for r in records), len(body))
    return body + encode_patch_trailer(t)


def _no_stage(recs: list[Record]) -> list[Record]:
    return [r for r in recs if r.kind != REC_STAGE]


def _stage_late(recs: list[Record]) -> list[Record]:
    stage = [r for r in recs if r.kind == REC_STAGE]
    rest = [r for r in recs if r.kind != REC_STAGE]
    return rest[:1] + stage + rest[1:]


def _source_past_base(recs: list[Record]) -> list[Record]:
    k = next(i for i, r in enumerate(recs) if r.kind == REC_DATA and r.moved_pages)
    r = recs[k]
    end = len(r.meta) - len(r.page_hashes)  # the last source, before the page hashes
    meta = r.meta[: end - 8] + (1 << 40).to_bytes(8, "little") + r.meta[end:]
    return recs[:k] + [dataclasses.replace(r, meta=meta)] + recs[k + 1 :]


@pytest.mark.parametrize("edit, fragment", [
    (_no_stage, "which this or an earlier record changes, and is not staged"),
    (_stage_late, "STAGE records must precede every other record"),
    (_source_past_base, "moved source page 1099511627776 lies beyond the base"),
])
def test_hostile_moves_are_refused_and_the_destination_untouched(
        tmp: Path, edit: Callable[[list[Record]], list[Record]], fragment: str) -> None:
    # The swap's first records read ahead in place and need no staged page.
    base, target = build(tmp, *SCENARIOS["swap"][:3], [])
    patch, _ = diff(tmp, base, target)
    dest = dest_of(tmp, base)
    evil = patch.parent / "evil.patch"
    evil.write_bytes(_rewrite(patch, edit))
    before = dest.read_bytes()
    line = error_line(run_cli("apply", str(evil), str(dest), check=False), 4)
    assert fragment in line, line
    assert dest.read_bytes() == before
    assert not side_files(dest.parent)


def test_undo_of_moves_restores_the_base(rotated: tuple[Path, Path, Path, Path]) -> None:
    base, target, patch, dest = rotated
    undo = patch.parent / "u.patch"
    run_cli("apply", str(patch), str(dest), "--undo", str(undo), "-q")
    check_target(dest, target)
    run_cli("apply", str(undo), str(dest), "-q")
    assert dest.read_bytes() == base.read_bytes()
    assert allocated_blocks(dest, BS) <= nonzero_blocks(base)


def test_moves_onto_a_block_device_stage_in_the_private_state_dir(tmp: Path) -> None:
    from test_blockdev import _why_no_loop, loop

    from sparsepatch.scratch import device_scratch_name

    why = _why_no_loop()
    if why:
        pytest.skip(why)
    base, target = build(tmp, *SCENARIOS["rotate"][:3], [])
    patch, _ = diff(tmp, base, target)
    backing = dest_of(tmp, base)
    with loop(backing) as dev:
        st = os.stat(dev)
        scratch = Path("/var/lib/sparsepatch") / device_scratch_name(st.st_rdev, backing.stat().st_size)
        try:
            killed(WRITES, 6 + 1 + 4, "before", "apply", str(patch), dev)
            assert scratch.stat().st_size == 1536 * PAGE  # not in /dev, which is not durable
            run_cli("apply", str(patch), dev, "-q")
            assert not scratch.exists()
        finally:
            with contextlib.suppress(FileNotFoundError):
                scratch.unlink()
    assert backing.read_bytes() == target.read_bytes()


def test_a_moved_source_page_that_is_not_the_bases_is_named(tmp: Path) -> None:
    # The source lies in a block the patch leaves alone, so the destination's block hashes
    # cannot tell; the page hash the patch carries for the moved page does.
    src = 1 * MiB + PAGE
    base, target = build(tmp, [(0, 2 * MiB)], 2 * MiB, [(src, 256 * KiB, 64 * KiB)], [])
    patch, stats = diff(tmp, base, target)
    assert stats["moved_pages"] == 16
    dest = dest_of(tmp, base)
    with open(dest, "r+b") as f:
        f.seek(src + 100)
        f.write(b"changed")
    before = dest.read_bytes()
    line = error_line(run_cli("apply", str(patch), str(dest), check=False), 5)
    assert f"moved source page at byte {src} does not hold the base's content" in line, line
    assert dest.read_bytes() == before


def test_two_destinations_of_one_name_do_not_share_a_scratch_dir_entry(tmp: Path) -> None:
    """`--scratch DIR` serves many destinations: one killed while its staged pages were in
    the scratch alone must find them again after another destination of the same file name
    (in another folder) was updated through the same DIR."""
    shared = tmp / "scratch"
    shared.mkdir()
    runs = []
    for sub in ("a", "b"):
        (tmp / sub).mkdir()
        base, target = build(tmp / sub, *SCENARIOS["rotate"][:3], [])
        patch, _ = diff(tmp / sub, base, target)
        runs.append((target, patch, dest_of(tmp / sub, base)))
    (target_a, patch_a, dest_a), (target_b, patch_b, dest_b) = runs
    assert dest_a.name == dest_b.name
    killed(WRITES, 6 + 1 + 4, "before", "apply", str(patch_a), str(dest_a), "--scratch", str(shared))
    run_cli("apply", str(patch_b), str(dest_b), "--scratch", str(shared), "-q")
    check_target(dest_b, target_b)
    run_cli("apply", str(patch_a), str(dest_a), "--scratch", str(shared), "-q")
    check_target(dest_a, target_a)
    assert not os.listdir(shared)


def test_undo_of_moves_killed_at_random_moments_then_rerun(rotated: tuple[Path, Path, Path, Path]
                                                           ) -> None:
    """apply --undo of a patch with moves, killed while staging, at its first journal slot
    or among its writes (spool and destination), then run again: the target, and an UNDO
    that gives the base back bit for bit."""
    base, target, patch, dest = rotated
    undo = patch.parent / "u.patch"
    rng = random.Random(20261130)
    points = [("sparsepatch.scratch:Scratch.write", 2, "before"),
              ("sparsepatch.journal:Journal.write", 1, "after")]
    points += [(WRITES, rng.randrange(1, 24), rng.choice(("before", "after"))) for _ in range(3)]
    for where, n, when in points:
        for name in side_files(dest.parent):
            (dest.parent / name).unlink()
        undo.unlink(missing_ok=True)
        dest = dest_of(dest.parent, base)
        killed(where, n, when, "apply", str(patch), str(dest), "--undo", str(undo), surely=False)
        run_cli("apply", str(patch), str(dest), "--undo", str(undo), "-q")
        check_target(dest, target)
        run_cli("apply", str(undo), str(dest), "-q")
        assert dest.read_bytes() == base.read_bytes(), (where, n, when)
        assert allocated_blocks(dest, BS) <= nonzero_blocks(base)
