"""Property: for random sparse files and random edits, apply(diff(signature(base), target))
gives the target byte for byte, sparsely; a second apply changes nothing; a full patch
onto a missing file gives the target too."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conftest import allocated_blocks
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sparsepatch import api

KiB = 1 << 10
MAX_SIZE = 2 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def punch(f: object, off: int, n: int) -> None:
    """Deallocate [off, off + n) of an open file (it then reads as zeros)."""
    fd = f.fileno()  # type: ignore[attr-defined]
    f.flush()  # type: ignore[attr-defined]
    size = os.fstat(fd).st_size
    n = min(n, size - off)
    if n > 0 and _libc.fallocate(fd, 0x01 | 0x02, off, n) != 0:  # KEEP_SIZE | PUNCH_HOLE
        raise OSError(ctypes.get_errno(), "fallocate")


def nonzero_blocks(data: bytes, bs: int) -> set[int]:
    return {i // bs for i in range(0, len(data), bs) if data[i : i + bs].strip(b"\0")}


# ---------------------------------------------------------------------------- strategies


FRAC = 10_000  # positions are drawn as fractions of the file as it is when the edit runs


@dataclass(frozen=True)
class Op:
    kind: str
    at: int = 0  # where, in 1/FRAC of the current size
    to: int = 0  # move/dup destination, or the new size for resize, in 1/FRAC
    n: int = 0  # bytes, or blocks for move/dup
    seed: int = 0


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, int, int, int]], list[Op]]:
    bs = draw(st.sampled_from([4 * KiB, 16 * KiB]))
    edge = st.sampled_from([0, 1, bs - 1, bs, bs + 1, 3 * bs + 5])
    size = draw(st.one_of(edge, *[st.integers(0, MAX_SIZE)] * 4))
    offsets = st.integers(0, max(size, 1) - 1)
    lengths = st.integers(1, 256 * KiB)
    extents = draw(st.lists(st.tuples(st.sampled_from(["data", "data", "zero"]), offsets, lengths,
                                      st.integers(0, 2**16)), min_size=1, max_size=8))
    # Spread over the whole file: small integers are drawn far more often than large ones.
    fractions = st.integers(0, FRAC).map(lambda x: x * 7919 % (FRAC + 1))
    ops = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["rewrite", "punch", "zero", "move", "dup", "dup", "dup", "resize"]))
        if kind in ("move", "dup"):
            ops.append(Op(kind, draw(fractions), draw(fractions), draw(st.integers(1, 8))))
        elif kind == "resize":
            ops.append(Op(kind, to=draw(st.integers(0, 2 * FRAC)), n=draw(st.integers(0, bs))))
        else:
            ops.append(Op(kind, draw(fractions), n=draw(lengths), seed=draw(st.integers(0, 2**16))))
    return bs, size, extents, ops


def build_base(path: Path, size: int, extents: list[tuple[str, int, int, int]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for kind, off, n, seed in extents:
            n = min(n, size - off)
            if n <= 0:
                continue
            f.seek(off)
            f.write(random.Random(seed).randbytes(n) if kind == "data" else bytes(n))


def edit(path: Path, bs: int, ops: list[Op]) -> None:
    with open(path, "r+b") as f:
        for op in ops:
            size = os.fstat(f.fileno()).st_size
            off = size * op.at // FRAC
            if op.kind == "resize":  # anywhere from empty to twice the size, plus a bit
                f.truncate(min(MAX_SIZE * 2, size * op.to // FRAC + op.n))
            elif op.kind in ("move", "dup"):  # whole blocks, so that they can travel as copies
                f.flush()
                blocks = -(-size // bs)
                full = sorted(allocated_blocks(path, bs)) or [0]  # prefer blocks holding data
                src, dst = full[len(full) * op.at // (FRAC + 1)], (blocks + 2) * op.to // FRAC
                f.seek(src * bs)
                moved = f.read(op.n * bs)
                if op.kind == "move":
                    punch(f, src * bs, len(moved))
                f.seek(dst * bs)
                f.write(moved)
            elif op.kind == "rewrite":
                f.seek(off)
                f.write(random.Random(op.seed).randbytes(op.n))
            elif op.kind == "zero":
                f.seek(off)
                f.write(bytes(min(op.n, size - off)))
            else:
                punch(f, off, op.n)


# ---------------------------------------------------------------------------- the property


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_round_trip(scenario: tuple[int, int, list[tuple[str, int, int, int]], list[Op]]) -> None:
    bs, size, extents, ops = scenario
    with tempfile.TemporaryDirectory(prefix="sparsepatch-rt-") as t:
        tmp = Path(t)
        base, target, dest = tmp / "base.img", tmp / "target.img", tmp / "dest.img"
        build_base(base, size, extents)
        build_base(dest, size, extents)
        build_base(target, size, extents)
        edit(target, bs, ops)
        want = target.read_bytes()

        api.signature(str(dest), str(tmp / "dest.sig"), block_size=bs)
        api.diff(str(tmp / "dest.sig"), str(target), str(tmp / "p"))
        for kind, n in api.info(str(tmp / "p"))["records"].items():
            event(f"{kind} records: {'yes' if n else 'no'}")
        event(f"size: {'grows' if len(want) > size else 'shrinks' if len(want) < size else 'same'}")
        stats = api.apply(str(tmp / "p"), str(dest), verify=True)
        assert dest.read_bytes() == want
        assert stats.target_size == len(want)
        # Sparse: an allocated block of the result holds target data, or was allocated in
        # the base (a block of written zeros the patch had no reason to touch).
        assert allocated_blocks(dest, bs) <= nonzero_blocks(want, bs) | allocated_blocks(base, bs)
        assert sorted(os.listdir(tmp)) == ["base.img", "dest.img", "dest.sig", "p", "target.img"]

        again = api.apply(str(tmp / "p"), str(dest))
        assert (again.blocks_written, again.blocks_punched, again.blocks_copied) == (0, 0, 0)
        assert again.bytes_written == 0
        assert dest.read_bytes() == want

        api.diff(None, str(target), str(tmp / "full"), full=True, block_size=bs)
        copy = tmp / "copy.img"
        api.apply(str(tmp / "full"), str(copy), verify=True)
        assert copy.read_bytes() == want
        assert allocated_blocks(copy, bs) <= nonzero_blocks(want, bs)
        again = api.apply(str(tmp / "full"), str(copy))
        assert (again.blocks_written, again.blocks_punched, again.blocks_copied) == (0, 0, 0)
        assert copy.read_bytes() == want
