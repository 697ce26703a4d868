"""Interrupted runs: apply killed with SIGKILL at random moments, then run again, must give
the target bit for bit; an interrupted `diff -o P` must never leave a file named P."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import KiB, MiB, allocated, allocated_blocks, extents, make_sparse, pattern, run_cli

BS = 64 * KiB
CLI = [sys.executable, "-m", "sparsepatch"]


def clone(src: Path, dst: Path) -> None:
    """A sparse copy of src at dst (replacing dst)."""
    with open(src, "rb") as i, open(dst, "wb") as o:
        o.truncate(os.path.getsize(src))
        for start, end in extents(src):
            i.seek(start)
            o.seek(start)
            o.write(i.read(end - start))


def same_bytes(a: Path, b: Path) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


@dataclass
class Big:
    folder: Path
    base: Path
    target: Path
    target_blocks: set[int]  # blocks of the target holding non-zero bytes
    patch: Path
    full_patch: Path
    sig: Path


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    """A 320 MiB base with 100 MiB of data and a grown target ~110 MiB of whose data is new,
    reached by data, zero and copy records."""
    d = tmp_path_factory.mktemp("resume")
    base_ext = [(i * 12 * MiB, 4 * MiB) for i in range(25)]
    base = make_sparse(d / "base.img", 320 * MiB + 4321, list(base_ext))
    tgt: list[tuple[int, bytes | int]] = []
    for i, (off, n) in enumerate(base_ext):
        if i % 5 == 1:
            tgt.append((off, n))  # unchanged
        elif i % 5:
            tgt.append((off, pattern(n, 1000 + i)))  # rewritten; i % 5 == 0: deleted
    tgt += [(i * 12 * MiB + 6 * MiB, pattern(4 * MiB, 2000 + i)) for i in range(0, 25, 2)]
    tgt += [(330 * MiB, pattern(4 * MiB, 12 * MiB)), (80 * MiB, pattern(2 * MiB, 72 * MiB))]
    target = make_sparse(d / "target.img", 340 * MiB + 777, tgt)
    sig, patch, full = d / "base.sig", d / "update.patch", d / "full.patch"
    run_cli("signature", str(base), "-o", str(sig))
    run_cli("diff", str(sig), str(target), "-o", str(patch))
    run_cli("diff", "--full", str(target), "-o", str(full))
    info = json.loads(run_cli("info", str(patch), "--json").stdout)
    assert all(info["records"][k] >= 1 for k in ("data", "zero", "copy")), info
    assert info["data_bytes"] >= 100 * MiB
    nonzero = {b for b in allocated_blocks(target, BS)
               if _read(target, b * BS, BS).strip(b"\0")}
    return Big(d, base, target, nonzero, patch, full, sig)


def _read(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def _journals(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if "journal" in n]


def _duration(args: list[str]) -> float:
    """Wall time of one uninterrupted run, to spread the kills over a whole run."""
    t = time.monotonic()
    subprocess.run(CLI + args, check=True, capture_output=True)
    return time.monotonic() - t


def _kill_after(args: list[str], delay: float, stdin: Path | None = None) -> bool:
    """Start the command (stdin from a file if given), SIGKILL it after delay seconds; True
    if it was still running."""
    with open(stdin or os.devnull, "rb") as f:
        p = subprocess.Popen(CLI + args, stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        assert p.stderr is not None
        p.stderr.close()
        return True
    assert p.stderr is not None
    err = p.stderr.read()
    p.stderr.close()
    assert p.returncode == 0, err  # finished before the kill: it must have succeeded
    return False


def _kill_when(args: list[str], ready: Callable[[], bool], extra: float,
               stdin: Path | None = None) -> bool:
    """Start the command (stdin from a file if given) and SIGKILL it `extra` seconds after
    ready() first holds; False if it finished before that."""
    with open(stdin or os.devnull, "rb") as f:
        p = subprocess.Popen(CLI + args, stdin=f, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not ready():
            if p.poll() is not None:
                assert p.returncode == 0
                return False
            assert time.monotonic() < deadline, "the command neither got going nor finished"
            time.sleep(0.0005)
        time.sleep(extra)
        return p.poll() is None
    finally:
        p.kill()
        p.wait()


def _kill_while_writing(args: list[str], folder: Path, extra: float) -> bool:
    """Kill apply `extra` seconds after its resume journal appears (it is then writing)."""
    return _kill_when(args, lambda: bool(_journals(folder)), extra)


def _finish(args: list[str]) -> dict[str, object]:
    r = run_cli(*args, "--json", "-q")
    assert b"Traceback" not in r.stderr
    return dict(json.loads(r.stdout))


def _check_result(big: Big, dest: Path) -> None:
    assert same_bytes(dest, big.target)
    assert allocated_blocks(dest, BS) <= big.target_blocks  # still sparse after the interruptions
    # Nothing hidden either (space reserved and never written, or kept past the end).
    assert allocated(dest) <= allocated(big.target) + 16 * BS
    assert not _journals(dest.parent)


@pytest.mark.slow
def test_apply_killed_at_random_moments_then_resumed(big: Big, tmp: Path) -> None:
    dest = tmp / "dest.img"
    clone(big.base, dest)
    whole = _duration(["apply", str(big.patch), str(dest)])
    assert same_bytes(dest, big.target)
    rng = random.Random(20261126)
    interrupted = resumed = 0
    for trial in range(12):
        clone(big.base, dest)
        for _ in range(1 + trial % 3):  # one to three kills before the run that finishes
            delay = whole * rng.uniform(0.2, 0.9)
            interrupted += _kill_after(["apply", str(big.patch), str(dest)], delay)
        if trial % 4 == 3:  # and once for sure while it writes
            interrupted += _kill_while_writing(["apply", str(big.patch), str(dest)], tmp,
                                               rng.uniform(0, 0.2 * whole))
        stats = _finish(["apply", str(big.patch), str(dest)])
        resumed += bool(stats["resumed"])
        _check_result(big, dest)
        # And once more: nothing left to do.
        again = _finish(["apply", str(big.patch), str(dest)])
        assert (again["blocks_written"], again["blocks_punched"], again["blocks_copied"]) == (0, 0, 0)
    # The kills really landed inside runs, and some of them mid-write.
    assert interrupted >= 3, interrupted
    assert resumed >= 1, resumed


@pytest.mark.slow
def test_first_copy_killed_at_random_moments_then_resumed(big: Big, tmp: Path) -> None:
    dest = tmp / "copy.img"
    whole = _duration(["apply", str(big.full_patch), str(dest)])
    assert same_bytes(dest, big.target)
    rng = random.Random(7)
    interrupted = resumed = 0
    for trial in range(10):
        dest.unlink()
        for _ in range(1 + trial % 2):
            delay = whole * rng.uniform(0.2, 0.9)
            interrupted += _kill_after(["apply", str(big.full_patch), str(dest)], delay)
        if trial % 4 == 3:
            interrupted += _kill_while_writing(["apply", str(big.full_patch), str(dest)], tmp,
                                rng.uniform(0, 0.2 * whole))
        stats = _finish(["apply", str(big.full_patch), str(dest)])
        resumed += bool(stats["resumed"])
        _check_result(big, dest)
    assert interrupted >= 3, interrupted
    assert resumed >= 1, resumed


@pytest.mark.slow
def test_resume_with_the_patch_from_stdin(big: Big, tmp: Path) -> None:
    dest = tmp / "dest.img"
    clone(big.base, dest)
    rng = random.Random(3)
    whole = _duration(["apply", str(big.patch), str(dest)])
    resumed = 0
    for trial in range(3):
        clone(big.base, dest)
        if trial:
            _kill_after(["apply", "-", str(dest)], rng.uniform(0.1 * whole, whole), stdin=big.patch)
        else:  # once for sure while it writes
            _kill_when(["apply", "-", str(dest)], lambda: bool(_journals(tmp)), 0.0, stdin=big.patch)
        with open(big.patch, "rb") as f:
            r = subprocess.run(CLI + ["apply", "-", str(dest), "--json", "-q"], stdin=f,
                               capture_output=True)
        assert r.returncode == 0, r.stderr
        resumed += json.loads(r.stdout)["resumed"]
        _check_result(big, dest)
    assert resumed >= 1


@pytest.mark.slow
def test_killed_diff_never_leaves_its_output_name(big: Big, tmp: Path) -> None:
    out = tmp / "out.patch"
    whole = _duration(["diff", str(big.sig), str(big.target), "-o", str(out)])
    finished = out.read_bytes()
    out.unlink()
    rng = random.Random(11)

    def parts() -> list[str]:
        return [n for n in os.listdir(tmp) if n.endswith(".part")]

    interrupted = 0
    for trial in range(6):
        args = ["diff", str(big.sig), str(big.target), "-o", str(out)]
        if trial % 2:  # anywhere in the run
            interrupted += _kill_after(args, whole * rng.uniform(0.2, 1.0))
        else:  # once the output has begun
            interrupted += _kill_when(args, lambda: bool(parts()), rng.uniform(0, 0.5 * whole))
        names = os.listdir(tmp)
        if out.exists():  # the run finished before the kill: then the output is whole
            assert out.read_bytes() == finished
            out.unlink()
        leftovers = [n for n in names if n != out.name]
        assert all(n.startswith(".out.patch.") and n.endswith(".part") for n in leftovers), names
        for n in leftovers:
            os.unlink(tmp / n)
    assert interrupted >= 1
    # A killed run over an existing output leaves the old file as it was.
    out.write_bytes(b"previous patch")
    _kill_after(["diff", str(big.sig), str(big.target), "-o", str(out)], 0.6 * whole)
    assert out.read_bytes() in (b"previous patch", finished)
    run_cli("diff", str(big.sig), str(big.target), "-o", str(out))
    assert out.read_bytes() == finished


def test_interrupted_diff_removes_its_temporary_file(big: Big, tmp: Path) -> None:
    """Ctrl-C (SIGINT) once the output has begun: a clean exit, nothing left behind."""
    out = tmp / "out.patch"
    out.write_bytes(b"previous patch")
    p = subprocess.Popen(CLI + ["diff", str(big.sig), str(big.target), "-o", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not [n for n in os.listdir(tmp) if n.endswith(".part")]:
        assert p.poll() is None, "diff finished before its temporary file was seen"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate()
    if p.returncode == 0:  # it completed in the instant before the signal
        pytest.skip("diff completed before the interrupt arrived")
    assert p.returncode == 130, err
    assert b"Traceback" not in err
    assert b"interrupted" in err
    assert sorted(os.listdir(tmp)) == ["out.patch"]
    assert out.read_bytes() == b"previous patch"


@pytest.mark.slow
def test_interrupted_apply_refuses_another_patch_until_finished(big: Big, tmp: Path) -> None:
    other = tmp / "other.img"
    clone(big.base, other)
    with open(other, "r+b") as f:
        f.seek(5 * MiB)
        f.write(pattern(MiB, 5))
    run_cli("diff", str(big.sig), str(other), "-o", str(tmp / "other.patch"))
    dest = tmp / "dest.img"
    clone(big.base, dest)
    whole = _duration(["apply", str(big.patch), str(dest)])
    for extra in (0.1 * whole, 0.0, 0.0):  # until a kill lands mid-write, leaving a journal
        clone(big.base, dest)
        if _kill_while_writing(["apply", str(big.patch), str(dest)], tmp, extra):
            break
    else:
        pytest.fail("apply always finished before it could be killed")
    assert _journals(tmp)
    snapshot = tmp / "snapshot.img"
    clone(dest, snapshot)
    r = run_cli("apply", str(tmp / "other.patch"), str(dest), check=False)
    assert r.returncode == 5, r.stderr
    lines = r.stderr.decode().splitlines()
    assert [ln for ln in lines if ln.startswith("sparsepatch: error:")] == lines[-1:], lines
    assert "journal" in lines[-1] or "interrupted" in lines[-1]
    assert same_bytes(dest, snapshot)
    stats = _finish(["apply", str(big.patch), str(dest)])
    assert stats["resumed"]
    _check_result(big, dest)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["update", "first copy"])
def test_patch_stream_cut_short_then_whole_patch(big: Big, tmp: Path, which: str) -> None:
    """The link carrying `... | sparsepatch apply - DEST` drops part-way (the stream just ends);
    running apply again with the whole patch finishes the job."""
    patch = big.patch if which == "update" else big.full_patch
    data = patch.read_bytes()
    dest = tmp / "dest.img"
    for cut in (len(data) // 2, len(data) - 200, len(data) - 1):
        if which == "update":
            clone(big.base, dest)
        elif dest.exists():
            dest.unlink()
        r = subprocess.run(CLI + ["apply", "-", str(dest)], input=data[:cut], capture_output=True)
        assert r.returncode == 4, r.stderr
        assert b"Traceback" not in r.stderr
        _finish(["apply", str(patch), str(dest)])
        _check_result(big, dest)
