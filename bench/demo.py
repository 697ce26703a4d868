"""End-to-end demo: update a sparse VM-like image through the real command line.

Builds, in a temporary directory, an 8 GiB sparse base image holding a few hundred MiB of
mixed data (log text, binary records, random bytes, written zeros) in scattered extents, and
a target that differs the way an image does after some use: about 5% of the data rewritten,
extents deleted, added, moved and duplicated, a couple of regions zeroed, and the file grown
to a size that is not a multiple of the block size. A sparse copy of the base stands for the
destination. Then it runs

    sparsepatch signature dest.img -o dest.sig
    sparsepatch diff dest.sig target.img -o update.patch
    sparsepatch apply update.patch dest.img --verify
    sparsepatch apply update.patch dest.img          (again: must change nothing)

checks that dest.img now equals target.img byte for byte and prints sizes and timings.
Exits non-zero if any step fails or the result differs. Needs only Python and a filesystem
that keeps files sparse (ext4, xfs, btrfs, tmpfs, ...).

    python bench/demo.py [--dir DIR] [--keep] [--seed N]
"""

from __future__ import annotations

import argparse
import bisect
import errno
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from sparsepatch.cli import human

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CHUNK = 4 * MiB

BASE_SIZE = 8 * GiB
TARGET_SIZE = BASE_SIZE + 5 * MiB + 1234  # grown, and not a multiple of any block size
ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------- content

WORDS = (
    "GET POST PUT DELETE api v1 v2 items users orders session cache miss hit ok error warn "
    "timeout retry upstream backend frontend worker queue job done started stopped disk net "
    "cpu mem load latency request response client server token auth login logout update"
).split()
HOSTS = [f"web{i:02d}" for i in range(12)] + [f"db{i:02d}" for i in range(4)]
LEVELS = ["INFO"] * 8 + ["WARN", "DEBUG", "ERROR"]
RECORD = struct.Struct("<QIIHH16s24x")  # 64 bytes: id, time, value, kind, flags, name, padding
NAMES = [f"{w}-{i}".encode() for i, w in enumerate(WORDS)]


def text_bytes(rng: random.Random, n: int) -> bytes:
    """Log-like lines: compressible, but no two extents alike."""
    m = n // 64 + 16
    t = rng.randrange(1_600_000_000, 1_700_000_000)
    hosts, levels = rng.choices(HOSTS, k=m), rng.choices(LEVELS, k=m)
    words, bits = rng.choices(WORDS, k=4 * m), rng.getrandbits
    lines = []
    for i in range(m):
        t += i & 1
        w = words[4 * i : 4 * i + 4]
        lines.append(f"{t} {hosts[i]} {levels[i]} pid={bits(15)} req={bits(32):08x} "
                     f"{w[0]} {w[1]} {w[2]} {w[3]} ms={bits(11)}\n")
    out = "".join(lines).encode()
    if len(out) < n:
        out += text_bytes(rng, n - len(out))
    return out[:n]


def record_bytes(rng: random.Random, n: int) -> bytes:
    """Fixed-size binary records, like a database table file."""
    first, t = rng.getrandbits(40), rng.randrange(1_600_000_000, 1_700_000_000)
    count = -(-n // RECORD.size)
    names, bits, pack = rng.choices(NAMES, k=count), rng.getrandbits, RECORD.pack
    return b"".join(pack(first + i, t + (i >> 4), bits(17), bits(3), i & 3, names[i])
                    for i in range(count))[:n]


def content(kind: str, seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    if kind == "text":
        return text_bytes(rng, n)
    if kind == "records":
        return record_bytes(rng, n)
    if kind == "random":
        return rng.randbytes(n)
    if kind == "zeros":
        return bytes(n)
    raise ValueError(kind)


# ---------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    kind: str
    seed: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class Space:
    """Occupied byte ranges of a file, to place new extents in holes."""

    def __init__(self, size: int):
        self.size = size
        self.starts: list[int] = []
        self.ends: list[int] = []

    def free(self, start: int, end: int, gap: int = 64 * KiB) -> bool:
        if start < 0 or end > self.size:
            return False
        k = bisect.bisect_left(self.starts, end + gap)
        return k == 0 or self.ends[k - 1] + gap <= start

    def take(self, start: int, end: int) -> None:
        k = bisect.bisect_left(self.starts, start)
        self.starts.insert(k, start)
        self.ends.insert(k, end)

    def place(self, rng: random.Random, length: int, align: int, lo: int = 0) -> int:
        for _ in range(10_000):
            off = rng.randrange(lo, self.size - length) // align * align
            if self.free(off, off + length):
                self.take(off, off + length)
                return off
        raise RuntimeError("no room for an extent")


def pick_length(rng: random.Random) -> tuple[int, int]:
    """(length, alignment) of a file-like extent: many small, fewer medium, a few large."""
    r = rng.random()
    if r < 0.6:
        return rng.randrange(1, 17) * 4 * KiB, 4 * KiB
    if r < 0.92:
        return rng.randrange(16, 513) * 4 * KiB, 4 * KiB
    return rng.randrange(2, 13) * MiB, MiB


def pick_kind(rng: random.Random, length: int) -> str:
    kinds = ["text", "records", "random", "zeros"]
    weights = [35, 20, 40, 5] if length <= 2 * MiB else [40, 20, 40, 0]
    return rng.choices(kinds, weights)[0]


@dataclass
class Plan:
    base: list[Extent]
    target: list[Extent]  # written in order: later ones overwrite earlier ones
    notes: dict[str, str]


def make_plan(seed: int) -> Plan:
    rng = random.Random(seed)
    space = Space(BASE_SIZE)
    base: list[Extent] = []
    for i in range(420):
        length, align = pick_length(rng)
        off = space.place(rng, length, align)
        base.append(Extent(off, length, pick_kind(rng, length), seed * 1_000_003 + i))
    base.sort(key=lambda e: e.offset)
    data = sum(e.length for e in base)

    tspace = Space(TARGET_SIZE)
    for e in base:
        tspace.take(e.offset, e.end)
    tail = 300 * KiB + 1234  # growth: new data right up to the new, unaligned end of file
    tspace.take(TARGET_SIZE - tail, TARGET_SIZE)
    big = [e for e in base if e.length >= 2 * MiB and e.kind != "zeros"]
    rng.shuffle(big)
    moved, duplicated = big[:2], big[2]
    others = [e for e in base if e not in big[:3]]
    deleted = rng.sample(others, 5)
    keep = [e for e in base if e not in moved and e not in deleted]

    target: list[Extent] = list(keep)
    for e in moved:  # a file the guest defragmented elsewhere
        target.append(replace(e, offset=tspace.place(rng, e.length, MiB)))
    # a file copied inside the guest
    target.append(replace(duplicated, offset=tspace.place(rng, duplicated.length, MiB)))
    new_bytes = 0
    n_new = 0
    while new_bytes < data // 30:
        length, align = pick_length(rng)
        off = tspace.place(rng, length, align)
        target.append(Extent(off, length, pick_kind(rng, length), rng.getrandbits(48)))
        new_bytes += length
        n_new += 1
    target.append(Extent(TARGET_SIZE - tail, tail, "text", rng.getrandbits(48)))

    # in-place rewrites, about 5% of the data: many 4 KiB metadata-like writes plus some
    # larger ones; a couple of regions zeroed (a guest wiping freed space)
    editable = [e for e in keep if e is not duplicated and e.kind != "zeros"]
    weights = [e.length for e in editable]
    budget = data // 20
    edited = 0
    n_edits = 0
    while edited < budget:
        e = rng.choices(editable, weights)[0]
        small = rng.random() < 0.7
        length = 4 * KiB if small else rng.randrange(16, 129) * 4 * KiB
        length = min(length, e.length)
        off = e.offset + rng.randrange(0, e.length - length + 1) // (4 * KiB) * (4 * KiB)
        kind = "zeros" if not small and n_edits % 25 == 7 else e.kind
        target.append(Extent(off, length, kind, rng.getrandbits(48)))
        edited += length
        n_edits += 1

    notes = {
        "extents": f"{len(base)} in the base ({human(data)} of data)",
        "changes": (f"{n_edits} rewrites ({human(edited)}), {len(deleted)} extents deleted, "
                    f"{n_new + 1} added ({human(new_bytes + tail)}), {len(moved)} moved, "
                    f"1 duplicated, file grown by {human(TARGET_SIZE - BASE_SIZE)}"),
    }
    return Plan(base, target, notes)


# ---------------------------------------------------------------------------- files


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def build(path: Path, size: int, extents: list[Extent]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for e in extents:
            pwrite_all(fd, content(e.kind, e.seed, e.length), e.offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def data_extents(fd: int) -> Iterator[tuple[int, int]]:
    size = os.fstat(fd).st_size
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def sparse_copy(src: Path, dst: Path) -> None:
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(dfd, os.fstat(sfd).st_size)
        for start, end in data_extents(sfd):
            for off in range(start, end, CHUNK):
                pwrite_all(dfd, os.pread(sfd, min(CHUNK, end - off), off), off)
        os.fsync(dfd)
    finally:
        os.close(sfd)
        os.close(dfd)


def merged(*lists: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(r for lst in lists for r in lst):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def compare(a: Path, b: Path) -> tuple[int | None, int]:
    """(offset of the first difference or None, bytes compared). Regions that are holes in
    both files are skipped; a hole in one is compared as the zeros it reads as."""
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        sa, sb = os.fstat(fa).st_size, os.fstat(fb).st_size
        if sa != sb:
            return min(sa, sb), 0
        compared = 0
        for start, end in merged(list(data_extents(fa)), list(data_extents(fb))):
            for off in range(start, end, CHUNK):
                n = min(CHUNK, end - off)
                x, y = os.pread(fa, n, off), os.pread(fb, n, off)
                if x != y:
                    i = next(i for i in range(len(x)) if x[i] != y[i])
                    return off + i, compared + i
                compared += n
        return None, compared
    finally:
        os.close(fa)
        os.close(fb)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# ---------------------------------------------------------------------------- run


def cli(work: Path, *args: str) -> tuple[float, str]:
    """Run the real command line in work; returns (seconds, stdout). Exits on failure."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "sparsepatch", *args], capture_output=True,
                       text=True, env=env, cwd=work)
    dt = time.monotonic() - t
    print(f"  $ sparsepatch {' '.join(args)}")
    for line in r.stderr.splitlines():
        print(f"    {line}")
    if r.returncode != 0:
        print(f"demo: FAILED: sparsepatch {args[0]} exited {r.returncode}", file=sys.stderr)
        sys.exit(r.returncode)
    return dt, r.stdout


def timed(fn: Callable[..., object], *args: object) -> float:
    t = time.monotonic()
    fn(*args)
    return time.monotonic() - t


def run(work: Path, seed: int) -> int:
    base, target, dest = work / "base.img", work / "target.img", work / "dest.img"
    sig, patch = work / "dest.sig", work / "update.patch"

    print(f"building sample images in {work} ...")
    plan = make_plan(seed)
    t_build = timed(build, base, BASE_SIZE, plan.base)
    if allocated(base) > BASE_SIZE // 2:
        print(f"demo: {work} does not keep files sparse; use --dir on ext4, xfs, btrfs or tmpfs",
              file=sys.stderr)
        return 1
    t_build += timed(build, target, TARGET_SIZE, plan.target)
    for k, v in plan.notes.items():
        print(f"  {k}: {v}")
    t_copy = timed(sparse_copy, base, dest)
    print(f"  dest.img: sparse copy of base.img ({t_build:.1f} s to build, {t_copy:.1f} s to copy)")
    print()

    steps: list[tuple[str, float]] = []
    steps.append(("signature", cli(work, "signature", dest.name, "-o", sig.name)[0]))
    steps.append(("diff", cli(work, "diff", sig.name, target.name, "-o", patch.name)[0]))
    steps.append(("apply --verify", cli(work, "apply", patch.name, dest.name, "--verify")[0]))
    steps.append(("apply again (no-op)", cli(work, "apply", patch.name, dest.name)[0]))
    info = json.loads(cli(work, "info", "--json", patch.name)[1])
    print()

    t = time.monotonic()
    bad, compared = compare(target, dest)
    t_cmp = time.monotonic() - t

    w = 22
    print(f"{'':{w}} {'apparent (bytes)':>16} {'allocated':>12}")
    for name, p in (("base.img", base), ("target.img", target), ("dest.img (result)", dest)):
        print(f"{name:{w}} {p.stat().st_size:>16,} {human(allocated(p)):>12}")
    print()
    blocks = info["blocks"]
    print(f"{'block size':{w}} {human(info['block_size']):>16}")
    print(f"{'signature':{w}} {human(sig.stat().st_size):>16}")
    # Since format 2 the patch carries only the pages it cannot find in the base: the rest
    # of a data block is the same page, a moved one or zeros.
    print(f"{'new data (raw)':{w}} {human(info['data_bytes']):>16}   "
          f"blocks: {blocks['data']:,} data, {blocks['zero']:,} zero, {blocks['copy']:,} copy")
    print(f"{'moved from the base':{w}} {human(info['moved_pages'] * 4096):>16}   "
          f"pages: {info['moved_pages']:,} moved, {info['stage_pages']:,} staged")
    print(f"{'patch':{w}} {human(patch.stat().st_size):>16}")
    print()
    for name, dt in steps:
        print(f"{name:{w}} {dt:>14.1f} s")
    print(f"{'total (4 commands)':{w}} {sum(dt for _, dt in steps):>14.1f} s")
    print()
    if bad is not None:
        print(f"FAIL: dest.img differs from target.img at byte {bad}", file=sys.stderr)
        return 1
    print(f"OK: dest.img equals target.img ({human(compared)} of data compared, "
          f"holes in both skipped, {t_cmp:.1f} s)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="parent of the temporary work directory (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--seed", type=int, default=2024, help="layout and content seed")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sparsepatch-demo-", dir=a.dir))
    try:
        return run(work, a.seed)
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
