"""One apply at a time per destination (exit 7 for the second), and the note apply gives when
the destination was modified after its signature was taken."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import error_line, make_sparse, pattern, run_cli

BS = 4096
N = 32
SIZE = N * BS
HELD = "another sparsepatch apply holds this destination"


@dataclass
class World:
    tmp: Path
    base: bytes
    target: bytes
    dest: Path
    sig: Path
    patch: Path

    @property
    def journal(self) -> Path:
        return self.dest.parent / f".{self.dest.name}.sparsepatch-journal"


@pytest.fixture
def world(tmp: Path) -> World:
    """Base: blocks 0..23 data. Target: blocks 2 and 10 rewritten, 15 zeroed, 28 new."""
    base_map: list[tuple[int, bytes | int]] = [(i * BS, pattern(BS, 100 + i)) for i in range(24)]
    base = make_sparse(tmp / "base.img", SIZE, base_map)
    target_map = [m for m in base_map if m[0] // BS not in (2, 10, 15)]
    target_map += [(2 * BS, pattern(BS, 2)), (10 * BS, pattern(BS, 10)), (28 * BS, pattern(BS, 28))]
    target = make_sparse(tmp / "target.img", SIZE, target_map)
    dest = make_sparse(tmp / "dest.img", SIZE, base_map)
    sig, patch = tmp / "dest.sig", tmp / "update.patch"
    run_cli("signature", str(dest), "-o", str(sig), "-b", "4K")
    run_cli("diff", str(sig), str(target), "-o", str(patch))
    return World(tmp, base.read_bytes(), target.read_bytes(), dest, sig, patch)


def warnings(r: subprocess.CompletedProcess[bytes]) -> list[str]:
    return [ln for ln in r.stderr.decode().splitlines() if ln.startswith("sparsepatch: warning:")]


FLOCK = struct.Struct("@hhqqi")  # struct flock for F_OFD_SETLK / F_OFD_GETLK


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the lock an apply takes on path (an OFD write lock over the whole file), from
    another open file description."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, 0, 0, 0, 0) + bytes(8))
        yield
    finally:
        os.close(fd)


def holds_lock(path: Path) -> bool:
    """Whether some open file holds a write lock over the whole of path, asked with
    F_OFD_GETLK (which, unlike trying the lock ourselves, cannot disturb the holder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, FLOCK.pack(fcntl.F_RDLCK, 0, 0, 0, 0) + bytes(8))
    finally:
        os.close(fd)
    kind, _, start, length, _ = FLOCK.unpack_from(out)
    return kind == fcntl.F_WRLCK and start == 0 and length == 0


def start_streaming_apply(w: World) -> subprocess.Popen[bytes]:
    """An apply reading its patch from a pipe that has only the header so far: it has opened
    and locked the destination and waits for records."""
    p = subprocess.Popen([sys.executable, "-m", "sparsepatch", "apply", "-", str(w.dest)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None
    p.stdin.write(w.patch.read_bytes()[:108])
    p.stdin.flush()
    for _ in range(600):
        if holds_lock(w.dest) or p.poll() is not None:
            break
        time.sleep(0.05)
    if not holds_lock(w.dest):
        p.kill()
        out = p.communicate()
        pytest.fail(f"the first apply never took the lock: {out!r}")
    return p


# ---------------------------------------------------------------------------- the lock


@pytest.mark.parametrize("mode", ["file", "stdin"])
def test_apply_refuses_a_destination_whose_lock_is_held(world: World, mode: str) -> None:
    before = world.dest.read_bytes()
    args = [str(world.patch)] if mode == "file" else ["-"]
    stdin = world.patch.read_bytes() if mode == "stdin" else None
    with locked(world.dest):
        line = error_line(
            run_cli("apply", *args, str(world.dest), input=stdin, check=False), 7, warnings_ok=True
        )
        assert line == f"sparsepatch: error: {world.dest}: {HELD}"
    assert world.dest.read_bytes() == before
    assert not world.journal.exists()
    run_cli("apply", *args, str(world.dest), input=stdin)
    assert world.dest.read_bytes() == world.target


def test_the_lock_belongs_to_the_file_not_to_its_name(world: World) -> None:
    (world.tmp / "symlink.img").symlink_to(world.dest)
    os.link(world.dest, world.tmp / "hardlink.img")
    before = world.dest.read_bytes()
    with locked(world.dest):
        for other in ("symlink.img", "hardlink.img"):
            line = error_line(
                run_cli("apply", str(world.patch), str(world.tmp / other), check=False), 7, warnings_ok=True
            )
            assert HELD in line
    assert world.dest.read_bytes() == before


def test_a_running_apply_keeps_a_second_one_out(world: World) -> None:
    first = start_streaming_apply(world)
    try:
        before = world.dest.read_bytes()
        line = error_line(
            run_cli("apply", str(world.patch), str(world.dest), check=False), 7, warnings_ok=True
        )
        assert HELD in line
        assert world.dest.read_bytes() == before
        out, err = first.communicate(world.patch.read_bytes()[108:], timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err
    assert world.dest.read_bytes() == world.target


def test_the_lock_dies_with_the_apply_that_held_it(world: World) -> None:
    first = start_streaming_apply(world)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    r = run_cli("apply", str(world.patch), str(world.dest), check=False)
    assert r.returncode == 0, r.stderr
    assert world.dest.read_bytes() == world.target


# ---------------------------------------------------------------------------- stale signatures


def modify_untouched_block(w: World, block: int = 20) -> bytes:
    """Overwrite a block the patch does not touch (same size); return the new block."""
    sig_mtime = json.loads(run_cli("info", str(w.sig), "--json").stdout)["mtime_ns"]
    new = pattern(BS, 999)
    with open(w.dest, "r+b") as f:
        f.seek(block * BS)
        f.write(new)
    assert os.path.getsize(w.dest) == SIZE
    assert os.stat(w.dest).st_mtime_ns != sig_mtime
    return new


@pytest.mark.parametrize("mode", ["file", "stdin"])
def test_apply_warns_when_the_destination_changed_after_its_signature(world: World, mode: str) -> None:
    new = modify_untouched_block(world)
    if mode == "file":
        r = run_cli("apply", str(world.patch), str(world.dest))
    else:
        r = run_cli("apply", "-", str(world.dest), input=world.patch.read_bytes())
    assert r.returncode == 0
    (note,) = warnings(r)
    assert str(world.dest) in note and "modified" in note and "mtime" in note, note
    assert "--verify" in note, note
    expected = bytearray(world.target)
    expected[20 * BS : 21 * BS] = new
    assert world.dest.read_bytes() == bytes(expected)


def test_verify_turns_the_stale_signature_into_an_error(world: World) -> None:
    modify_untouched_block(world)
    r = run_cli("apply", str(world.patch), str(world.dest), "--verify", check=False)
    line = error_line(r, 8, warnings_ok=True)
    assert str(world.dest) in line and "does not match the target" in line, line
    (note,) = warnings(r)
    assert "modified" in note and "mtime" in note


def test_no_warning_for_an_untouched_destination(world: World) -> None:
    r = run_cli("apply", str(world.patch), str(world.dest), "--verify")
    assert warnings(r) == []
    assert world.dest.read_bytes() == world.target
    # Applying again changes nothing: the new mtime is apply's own and is not worth a note.
    r = run_cli("apply", str(world.patch), str(world.dest))
    assert warnings(r) == []
    assert world.dest.read_bytes() == world.target


def test_a_new_mtime_alone_warns_but_verifies(world: World) -> None:
    st = os.stat(world.dest)
    os.utime(world.dest, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = run_cli("apply", str(world.patch), str(world.dest), "--verify")
    assert r.returncode == 0
    (note,) = warnings(r)
    assert "mtime" in note
    assert world.dest.read_bytes() == world.target
