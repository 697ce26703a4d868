"""End to end: signature -> diff -> apply on real sparse files, through the command line
(in subprocesses, as a user runs it), plus a few calls through click and the library."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import KiB, MiB, allocated, allocated_blocks, error_line, extents, make_sparse, pattern, run_cli

from sparsepatch import SparsePatchError, api
from sparsepatch.cli import main as cli_main

BS = 64 * KiB
SUMMARY = re.compile(
    r"apply: ([\d,]+) blocks written, ([\d,]+) punched, ([\d,]+) copied, ([\d,]+) already current"
)


# ---------------------------------------------------------------------------- file helpers


def nonzero_blocks(path: Path, bs: int) -> set[int]:
    """Blocks of size bs holding a non-zero byte (only allocated ranges are read)."""
    out: set[int] = set()
    with open(path, "rb") as f:
        for b in sorted(allocated_blocks(path, bs)):
            f.seek(b * bs)
            if f.read(bs).strip(b"\0"):
                out.add(b)
    return out


def clone(src: Path, dst: Path) -> Path:
    """A sparse copy: only src's allocated ranges are written."""
    with open(src, "rb") as i, open(dst, "wb") as o:
        o.truncate(os.path.getsize(src))
        for start, end in extents(src):
            i.seek(start)
            o.seek(start)
            left = end - start
            while left:
                chunk = i.read(min(left, 4 * MiB))
                o.write(chunk)
                left -= len(chunk)
    return dst


def same_bytes(a: Path, b: Path) -> bool:
    """Byte-for-byte equality, reading only where either file has allocated ranges (both
    read as zeros everywhere else)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in extents(a) + extents(b):
            pos = start
            while pos < end:
                n = min(4 * MiB, end - pos)
                fa.seek(pos)
                fb.seek(pos)
                if fa.read(n) != fb.read(n):
                    return False
                pos += n
    return True


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def sync_cli(base: Path, target: Path, dest: Path, tmp: Path, *extra: str) -> tuple[str, Path]:
    """signature dest -> diff -> apply, each through the command line; returns apply's stderr."""
    sig, patch = tmp / "dest.sig", tmp / "update.patch"
    run_cli("signature", str(dest), "-o", str(sig), "-b", str(BS))
    run_cli("diff", str(sig), str(target), "-o", str(patch))
    r = run_cli("apply", str(patch), str(dest), *extra)
    return r.stderr.decode(), patch


def summary(stderr: str) -> tuple[int, int, int, int]:
    m = SUMMARY.search(stderr)
    assert m, stderr
    w, p, c, s = (int(g.replace(",", "")) for g in m.groups())
    return w, p, c, s


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def vm(tmp: Path) -> tuple[Path, Path, Path]:
    """A 300 MiB (unaligned) base with ~6 MiB of data, a target that rewrites, deletes and
    adds extents, and a destination that starts as a sparse copy of the base."""
    size = 300 * MiB + 12345
    kept = [(0, 300 * KiB), (10 * MiB + 5000, MiB), (120 * MiB + 777, 512 * KiB), (200 * MiB, MiB),
            (size - 1000, 1000)]
    base = make_sparse(tmp / "base.img", size, [*kept, (50 * MiB, 2 * MiB)])
    target = make_sparse(tmp / "target.img", size, [
        *kept,  # the 2 MiB extent at 50 MiB is deleted (a hole in the target)
        (10 * MiB + 70000, pattern(200 * KiB, 1)),  # rewritten inside an extent
        (80 * MiB + 3, pattern(700 * KiB, 2)),  # a new extent in a hole
        (200 * MiB + BS, pattern(BS, 3)),  # exactly one aligned block
        (size - 300, pattern(300, 4)),  # the last, partial block
    ])
    dest = clone(base, tmp / "dest.img")
    return base, target, dest


# ---------------------------------------------------------------------------- round trips


def test_sync_large_sparse_file_bytes_and_allocation(vm: tuple[Path, Path, Path], tmp: Path) -> None:
    base, target, dest = vm
    assert not same_bytes(dest, target)
    sync_cli(base, target, dest, tmp)
    assert same_bytes(dest, target)
    # Holes stay holes and deleted data is punched: every allocated block of the result
    # holds non-zero target data.
    assert allocated_blocks(dest, BS) <= nonzero_blocks(target, BS)
    slack = BS * 2 * len(extents(target))
    assert allocated(dest) <= allocated(target) + slack
    # The deleted 2 MiB extent is gone from the result (it was allocated in the base).
    assert allocated(dest) < allocated(base)
    assert not os.path.exists(tmp / ".dest.img.sparsepatch-journal")


def test_huge_apparent_size(tmp: Path) -> None:
    """A 1 TiB sparse file with 4 KiB blocks: only data is read, holes stay holes."""
    tib = 1 << 40
    size = tib + 4097
    base = make_sparse(tmp / "base.img", size, [(0, MiB), (tib // 2, MiB), (size - 100, 100)])
    target = make_sparse(tmp / "target.img", size, [
        (0, MiB), (tib // 2 + 4096, pattern(5000, 1)), (3 * tib // 4, MiB), (size - 100, 100)])
    dest = clone(base, tmp / "dest.img")
    run_cli("signature", str(dest), "-o", str(tmp / "s"), "-b", "4K")
    run_cli("diff", str(tmp / "s"), str(target), "-o", str(tmp / "p"))
    run_cli("apply", str(tmp / "p"), str(dest), "--verify")
    assert same_bytes(dest, target)
    assert allocated_blocks(dest, 4 * KiB) <= nonzero_blocks(target, 4 * KiB)
    assert allocated(dest) <= allocated(target)


def test_allocated_zeros_in_target_become_holes(tmp: Path) -> None:
    size = 256 * MiB + 4097
    base = make_sparse(tmp / "base.img", size, [(MiB, 4 * MiB), (100 * MiB, 8 * MiB)])
    target = clone(base, tmp / "target.img")
    overwrite(target, 100 * MiB, bytes(8 * MiB))  # allocated zeros over base data
    overwrite(target, 150 * MiB, bytes(6 * MiB))  # allocated zeros over a hole
    overwrite(target, 2 * MiB, pattern(BS, 9))
    zeros_allocated = allocated(target)
    assert zeros_allocated >= 4 * MiB + 14 * MiB  # the target really holds written zeros
    dest = clone(base, tmp / "dest.img")
    sync_cli(base, target, dest, tmp)
    assert same_bytes(dest, target)
    assert allocated(dest) <= zeros_allocated - 14 * MiB + BS
    assert allocated_blocks(dest, BS) <= nonzero_blocks(target, BS)


def test_full_patch_creates_missing_destination_sparsely(vm: tuple[Path, Path, Path], tmp: Path) -> None:
    _, target, _ = vm
    patch, dest = tmp / "full.patch", tmp / "new" / "copy.img"
    dest.parent.mkdir()
    run_cli("diff", "--full", str(target), "-o", str(patch), "-b", str(BS))
    run_cli("apply", str(patch), str(dest), "--verify")
    assert same_bytes(dest, target)
    assert allocated_blocks(dest, BS) <= nonzero_blocks(target, BS)
    assert allocated(dest) <= allocated(target) + BS * 2 * len(extents(target))
    assert sorted(os.listdir(dest.parent)) == ["copy.img"]


def test_unchanged_blocks_are_not_rewritten_and_apply_is_idempotent(tmp: Path) -> None:
    size = 200 * MiB
    base = make_sparse(tmp / "base.img", size, [(0, 8 * MiB), (64 * MiB, 4 * MiB)])
    target = clone(base, tmp / "target.img")
    changed = [3, 17, 100, 1024, 1025, 1030]  # blocks rewritten with new data
    for i, b in enumerate(changed):
        overwrite(target, b * BS + 100, pattern(500, 50 + i))
    zeroed = [40, 41, 42]  # data blocks that become zeros
    for b in zeroed:
        overwrite(target, b * BS, bytes(BS))
    dest = clone(base, tmp / "dest.img")
    err, patch = sync_cli(base, target, dest, tmp)
    assert summary(err)[:3] == (len(changed), len(zeroed), 0)
    assert same_bytes(dest, target)

    again = run_cli("apply", str(patch), str(dest)).stderr.decode()
    w, p, c, s = summary(again)
    assert (w, p, c) == (0, 0, 0)
    assert s == len(changed) + len(zeroed)
    assert same_bytes(dest, target)

    stats = api.apply(str(patch), str(dest))
    assert (stats.blocks_written, stats.blocks_punched, stats.blocks_copied) == (0, 0, 0)
    assert stats.bytes_written == 0
    assert stats.blocks_skipped == len(changed) + len(zeroed)
    assert same_bytes(dest, target)


@pytest.mark.parametrize("new_size", [7 * MiB + 777, 3 * MiB + 4321, 5 * MiB + 1234, 0, 1, BS])
def test_grow_and_shrink_to_unaligned_sizes(tmp: Path, new_size: int) -> None:
    old = 5 * MiB + 1234
    base = make_sparse(tmp / "base.img", old, [(0, 200 * KiB), (3 * MiB + 100, 500 * KiB),
                                                (old - 5000, 5000)])
    target = clone(base, tmp / "target.img")
    os.truncate(target, new_size)
    if new_size > 2:
        overwrite(target, new_size - 2, b"\x01\x02")  # data up to the new last byte
    dest = clone(base, tmp / "dest.img")
    err, patch = sync_cli(base, target, dest, tmp)
    assert os.path.getsize(dest) == new_size
    assert same_bytes(dest, target)
    assert allocated_blocks(dest, BS) <= nonzero_blocks(target, BS)
    assert summary(run_cli("apply", str(patch), str(dest)).stderr.decode())[:3] == (0, 0, 0)
    assert same_bytes(dest, target)


def test_full_patch_onto_an_existing_empty_file(tmp: Path) -> None:
    target = make_sparse(tmp / "target.img", 9 * MiB + 3, [(MiB, 300 * KiB), (9 * MiB, 3)])
    dest = make_sparse(tmp / "dest.img", 0, [])
    run_cli("diff", "--full", str(target), "-o", str(tmp / "full.patch"))
    run_cli("apply", str(tmp / "full.patch"), str(dest), "--verify")
    assert same_bytes(dest, target)
    run_cli("apply", str(tmp / "full.patch"), str(dest), "--verify")  # a repeated first copy
    assert same_bytes(dest, target)


def test_from_an_empty_destination(tmp: Path) -> None:
    empty = make_sparse(tmp / "dest.img", 0, [])
    target = make_sparse(tmp / "target.img", 9 * MiB + 3, [(MiB, 300 * KiB), (9 * MiB, 3)])
    sync_cli(empty, target, empty, tmp)
    assert same_bytes(empty, target)
    assert allocated_blocks(empty, BS) <= nonzero_blocks(target, BS)


def test_full_patch_onto_missing_destination_then_incremental(tmp: Path) -> None:
    v1 = make_sparse(tmp / "v1.img", 64 * MiB + 5, [(0, MiB), (40 * MiB, 2 * MiB)])
    v2 = clone(v1, tmp / "v2.img")
    overwrite(v2, 41 * MiB, pattern(MiB, 77))
    dest = tmp / "dest.img"
    run_cli("diff", "--full", str(v1), "-o", str(tmp / "full.patch"))
    run_cli("apply", str(tmp / "full.patch"), str(dest))
    assert same_bytes(dest, v1)
    # Applying the full patch again changes nothing.
    w, p, c, _ = summary(run_cli("apply", str(tmp / "full.patch"), str(dest)).stderr.decode())
    assert (w, p, c) == (0, 0, 0)
    sync_cli(v1, v2, dest, tmp)
    assert same_bytes(dest, v2)


@pytest.mark.parametrize("case", ["other size", "same size, other data"])
def test_full_patch_onto_existing_different_file_is_refused(tmp: Path, case: str) -> None:
    target = make_sparse(tmp / "target.img", 16 * MiB, [(0, MiB), (8 * MiB, MiB)])
    run_cli("diff", "--full", str(target), "-o", str(tmp / "full.patch"))
    if case == "other size":
        other = make_sparse(tmp / "other.img", 16 * MiB + 1, [(0, MiB)])
    else:  # differs in the very first block the patch writes
        other = make_sparse(tmp / "other.img", 16 * MiB, [(100, pattern(100, 5))])
    before = other.read_bytes()
    r = run_cli("apply", str(tmp / "full.patch"), str(other), check=False)
    assert error_line(r, 5, warnings_ok=True)
    assert other.read_bytes() == before


def test_full_patch_onto_file_differing_late_is_refused_untouched(tmp: Path) -> None:
    target = make_sparse(tmp / "target.img", 16 * MiB, [(0, MiB), (8 * MiB, MiB)])
    run_cli("diff", "--full", str(target), "-o", str(tmp / "full.patch"))
    other = make_sparse(tmp / "other.img", 16 * MiB, [(8 * MiB + BS, pattern(100, 5))])
    before = other.read_bytes()
    r = run_cli("apply", str(tmp / "full.patch"), str(other), check=False)
    assert r.returncode == 5, r.stderr
    assert other.read_bytes() == before


def test_full_patch_onto_same_size_file_with_data_in_target_holes(tmp: Path) -> None:
    target = make_sparse(tmp / "target.img", 4 * MiB, [(0, 100000)])
    other = make_sparse(tmp / "other.img", 4 * MiB, [(3 * MiB, 100000)])
    before = other.read_bytes()
    run_cli("diff", "--full", str(target), "-o", str(tmp / "full.patch"))
    r = run_cli("apply", str(tmp / "full.patch"), str(other), check=False)
    # Either refused (destination untouched) or the result is the target: never a mix.
    if r.returncode == 0:
        assert same_bytes(other, target)
    else:
        assert r.returncode == 5
        assert other.read_bytes() == before


# ---------------------------------------------------------------------------- pipes and stdio


def _cli() -> str:
    return f"{shlex.quote(sys.executable)} -m sparsepatch"


def _shell(cmd: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], capture_output=True)


@pytest.fixture
def pair(tmp: Path) -> tuple[Path, Path]:
    size = 96 * MiB + 999
    dest = make_sparse(tmp / "dest.img", size, [(0, MiB), (30 * MiB, 3 * MiB), (size - 10, 10)])
    src = clone(dest, tmp / "src.img")
    overwrite(src, 31 * MiB, pattern(MiB, 11))
    overwrite(src, 60 * MiB + 1, pattern(70 * KiB, 12))
    return dest, src


def test_pipeline_through_shell_pipes(pair: tuple[Path, Path]) -> None:
    dest, src = pair
    d, s, sp = shlex.quote(str(dest)), shlex.quote(str(src)), _cli()
    r = subprocess.run(f"{sp} signature {d} | {sp} diff - {s} | {sp} apply - {d}", shell=True,
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    assert same_bytes(dest, src)
    assert allocated_blocks(dest, BS) <= nonzero_blocks(src, BS)


def test_pipeline_with_every_input_a_stream(pair: tuple[Path, Path], tmp: Path) -> None:
    """Destination read from a pipe for the signature, source from a pipe for diff."""
    dest, src = pair
    d, s, sp = shlex.quote(str(dest)), shlex.quote(str(src)), _cli()
    p = shlex.quote(str(tmp / "p"))
    r = _shell(f"cat {d} | {sp} signature - -q | {sp} diff - {s} -q -o {p}")
    assert r.returncode == 0, r.stderr
    r = _shell(f"{sp} signature {d} -q -o {shlex.quote(str(tmp / 's'))} && "
               f"cat {s} | {sp} diff {shlex.quote(str(tmp / 's'))} - -q | cat | {sp} apply - {d}")
    assert r.returncode == 0, r.stderr
    assert same_bytes(dest, src)
    r = _shell(f"cat {p} | {sp} apply - {d}")  # the first patch (same content): a no-op now
    assert r.returncode == 0, r.stderr
    assert summary(r.stderr.decode())[:3] == (0, 0, 0)
    assert same_bytes(dest, src)


def test_pipes_that_deliver_bytes_slowly(pair: tuple[Path, Path], tmp: Path) -> None:
    """Inputs arriving in small pieces with pauses (as over a slow link) read whole."""
    dest, src = pair
    sp, d, s = _cli(), shlex.quote(str(dest)), shlex.quote(str(src))
    sig, patch = shlex.quote(str(tmp / "s")), shlex.quote(str(tmp / "p"))

    def slowly(path: str) -> str:
        return (f"(head -c 3 {path}; sleep 0.2; tail -c +4 {path} | head -c 200; sleep 0.2; "
                f"tail -c +204 {path})")

    r = _shell(f"{sp} signature {d} -q -o {sig} && {slowly(sig)} | {sp} diff - {s} -q -o {patch} && "
               f"{slowly(patch)} | {sp} info - --json > /dev/null && {slowly(patch)} | {sp} apply - {d} -q")
    assert r.returncode == 0, r.stderr
    assert same_bytes(dest, src)


def test_stream_inputs_give_the_same_content_as_files(pair: tuple[Path, Path], tmp: Path) -> None:
    dest, src = pair
    d, s, sp = shlex.quote(str(dest)), shlex.quote(str(src)), _cli()
    run_cli("signature", str(dest), "-o", str(tmp / "file.sig"))
    r = _shell(f"cat {d} | {sp} signature - -q > {shlex.quote(str(tmp / 'stream.sig'))}")
    assert r.returncode == 0, r.stderr
    # A stream has no mtime; everything else the signature says is the same.
    a = json.loads(run_cli("info", str(tmp / "file.sig"), "--json").stdout)
    b = json.loads(run_cli("info", str(tmp / "stream.sig"), "--json").stdout)
    assert a.pop("mtime_ns") == os.stat(dest).st_mtime_ns
    assert b.pop("mtime_ns") == 0
    assert a == b
    run_cli("diff", str(tmp / "file.sig"), str(src), "-o", str(tmp / "file.patch"))
    r = _shell(f"cat {s} | {sp} diff {shlex.quote(str(tmp / 'file.sig'))} - -q "
               f"> {shlex.quote(str(tmp / 'stream.patch'))}")
    assert r.returncode == 0, r.stderr
    assert (tmp / "file.patch").read_bytes() == (tmp / "stream.patch").read_bytes()


def test_output_files_are_complete_and_leave_no_temporaries(pair: tuple[Path, Path], tmp: Path) -> None:
    dest, src = pair
    out = tmp / "out"
    out.mkdir()
    run_cli("signature", str(dest), "-o", str(out / "d.sig"))
    run_cli("diff", str(out / "d.sig"), str(src), "-o", str(out / "d.patch"))
    assert sorted(os.listdir(out)) == ["d.patch", "d.sig"]
    # -o and stdout give the same bytes.
    assert run_cli("signature", str(dest)).stdout == (out / "d.sig").read_bytes()
    assert run_cli("diff", str(out / "d.sig"), str(src)).stdout == (out / "d.patch").read_bytes()
    # -o over an existing file replaces it.
    (out / "d.sig").write_bytes(b"old")
    run_cli("signature", str(dest), "-o", str(out / "d.sig"))
    assert (out / "d.sig").read_bytes() == run_cli("signature", str(dest)).stdout


def test_info_json(pair: tuple[Path, Path], tmp: Path) -> None:
    dest, src = pair
    sig, patch = tmp / "d.sig", tmp / "d.patch"
    run_cli("signature", str(dest), "-o", str(sig), "-b", "64K")
    d = json.loads(run_cli("info", str(sig), "--json").stdout)
    size = os.path.getsize(dest)
    assert d["kind"] == "signature"
    assert d["block_size"] == BS
    assert d["file_size"] == size
    assert d["blocks"] == -(-size // BS)
    assert d["data_blocks"] == len(nonzero_blocks(dest, BS))
    assert d["hole_blocks"] == d["blocks"] - d["data_blocks"]

    run_cli("diff", str(sig), str(src), "-o", str(patch))
    p = json.loads(run_cli("info", str(patch), "--json").stdout)
    assert p["kind"] == "patch"
    assert p["full"] is False
    assert p["block_size"] == BS
    assert (p["base_size"], p["target_size"]) == (size, os.path.getsize(src))
    changed = {b for b in range(d["blocks"])
               if _block(dest, b) != _block(src, b)}
    assert sum(p["blocks"].values()) == len(changed)
    assert p["blocks"]["zero"] == 0  # no data block of src is all zeros
    assert p["records"]["data"] >= 1
    assert set(p["records"]) == {"data", "zero", "copy", "stage"}
    assert p["patch_bytes"] == os.path.getsize(patch)
    assert p["base_identity"] == d["identity"]

    # stdin, and through click in-process, give the same document.
    r = _shell(f"{_cli()} info - --json < {shlex.quote(str(patch))}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == p
    res = CliRunner().invoke(cli_main, ["info", str(patch), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == p
    # The text form names the same kind.
    text = run_cli("info", str(patch)).stdout.decode()
    assert "kind: patch" in text


def _block(path: Path, b: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(b * BS)
        return f.read(BS)


def test_cli_runner_round_trip(pair: tuple[Path, Path], tmp: Path) -> None:
    dest, src = pair
    runner = CliRunner()
    sig, patch = str(tmp / "s"), str(tmp / "p")
    for args in (["signature", str(dest), "-o", sig], ["diff", sig, str(src), "-o", patch],
                 ["apply", patch, str(dest), "--verify"]):
        res = runner.invoke(cli_main, args)
        assert res.exit_code == 0, (args, res.output, res.exception)
    assert "verified" in res.stderr
    assert same_bytes(dest, src)


# ---------------------------------------------------------------------------- copies


def test_duplicated_data_travels_as_copy_records(tmp: Path) -> None:
    size = 128 * MiB
    base = make_sparse(tmp / "base.img", size, [(0, 4 * MiB), (20 * MiB, MiB)])
    target = clone(base, tmp / "target.img")
    moved = base.read_bytes()[: 4 * MiB]
    overwrite(target, 64 * MiB, moved)  # the 4 MiB extent now also lives at 64 MiB
    dest = clone(base, tmp / "dest.img")
    err, patch = sync_cli(base, target, dest, tmp)
    p = json.loads(run_cli("info", str(patch), "--json").stdout)
    assert p["records"]["copy"] >= 1
    assert p["blocks"]["copy"] == 4 * MiB // BS
    assert p["blocks"]["data"] == 0
    assert os.path.getsize(patch) < len(moved) // 16
    assert summary(err)[2] == 4 * MiB // BS
    assert same_bytes(dest, target)


# ---------------------------------------------------------------------------- verify


def test_verify_passes_on_a_good_apply(pair: tuple[Path, Path], tmp: Path) -> None:
    dest, src = pair
    err, _ = sync_cli(dest, src, dest, tmp, "--verify")
    assert "verified" in err
    assert same_bytes(dest, src)


def test_verify_catches_a_destination_corrupted_outside_the_patch(pair: tuple[Path, Path], tmp: Path) -> None:
    dest, src = pair
    sig, patch = tmp / "s", tmp / "p"
    run_cli("signature", str(dest), "-o", str(sig))
    run_cli("diff", str(sig), str(src), "-o", str(patch))
    overwrite(dest, 100, b"bit rot")  # block 0: the patch does not touch it
    r = run_cli("apply", str(patch), str(dest), "--verify", check=False)
    # 8 is documented: verify found a difference
    msg = error_line(r, 8, warnings_ok=True).replace(str(dest), "DEST")
    assert "verify" in msg or "does not match the target" in msg
    # Without --verify the same damage goes unnoticed: that is what --verify is for.
    r = run_cli("apply", str(patch), str(dest), check=False)
    assert r.returncode == 0


def test_verify_through_the_library(pair: tuple[Path, Path], tmp: Path) -> None:
    dest, src = pair
    api.signature(str(dest), str(tmp / "s"))
    api.diff(str(tmp / "s"), str(src), str(tmp / "p"))
    overwrite(dest, 2, b"x")
    with pytest.raises(SparsePatchError) as e:
        api.apply(str(tmp / "p"), str(dest), verify=True)
    assert e.value.exit_code == 8
    assert str(tmp / "p") not in str(e.value)
    assert "does not match" in str(e.value).replace(str(dest), "DEST")


# ---------------------------------------------------------------------------- determinism


def test_signature_and_diff_are_deterministic(pair: tuple[Path, Path], tmp: Path) -> None:
    dest, src = pair
    run_cli("signature", str(dest), "-o", str(tmp / "s1"))
    run_cli("signature", str(dest), "-o", str(tmp / "s2"))
    assert (tmp / "s1").read_bytes() == (tmp / "s2").read_bytes()
    run_cli("diff", str(tmp / "s1"), str(src), "-o", str(tmp / "p1"))
    run_cli("diff", str(tmp / "s2"), str(src), "-o", str(tmp / "p2"))
    assert (tmp / "p1").read_bytes() == (tmp / "p2").read_bytes()
    # A sparse copy of the source (same content, different allocation) gives the same patch.
    with open(src, "rb") as i, open(tmp / "src-dense.img", "wb") as o:  # holes written as zeros
        shutil.copyfileobj(i, o)
    assert allocated(tmp / "src-dense.img") > allocated(src)
    run_cli("diff", str(tmp / "s1"), str(tmp / "src-dense.img"), "-o", str(tmp / "p3"))
    assert (tmp / "p1").read_bytes() == (tmp / "p3").read_bytes()
    run_cli("diff", "--full", str(src), "-o", str(tmp / "f1"))
    run_cli("diff", "--full", str(src), "-o", str(tmp / "f2"))
    assert (tmp / "f1").read_bytes() == (tmp / "f2").read_bytes()
