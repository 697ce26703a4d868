"""Workloads for bench/bench.py: pairs of files (base, target) built deterministically
from a seed, and the helpers that look at them without any sparsepatch code (data
extents, allocation, byte comparison, the zstd size of the changed blocks).

1. ext4: a real ext4 image (bench/ext4image.py) and a copy changed with debugfs.
2. scattered: a large sparse file with data in scattered extents; a few extents are
   rewritten, some punched, some moved to other aligned offsets.
3. holes: a huge sparse file with a little data, and a dense file holding the same bytes.
4. dense: a file with no holes; about 1% of it rewritten in scattered runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import blake3
import zstandard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ext4image  # noqa: E402

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BLOCK = 64 * KiB  # alignment of the workloads' extents (not the block size measured)
CHUNK = 4 * MiB
PAGE = 4 * KiB

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

# Half of every generated page is random, half is text over a 16-letter alphabet: the data
# compresses to about 3/4 of its size, like a mix of binaries and text.
_TEXT = bytes(b"etaoin shrdlucm\n"[b & 15] for b in range(256))


@dataclass
class Pair:
    name: str
    base: str
    target: str
    apparent: int
    data: int  # bytes of data written into the base
    notes: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)  # more files (workload 3: the dense one)


def content(seed: str, n: int) -> bytes:
    """n deterministic bytes, unique to seed: random pages alternating with text pages."""
    raw = bytearray(blake3.blake3(seed.encode()).digest(length=n))
    for off in range(PAGE, n, 2 * PAGE):
        raw[off : off + PAGE] = raw[off : off + PAGE].translate(_TEXT)
    return bytes(raw)


def write_at(fd: int, offset: int, length: int, seed: str) -> None:
    done = 0
    while done < length:
        n = min(CHUNK, length - done)
        os.pwrite(fd, content(f"{seed}/{done}", n), offset + done)
        done += n


def punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _PUNCH, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def sparse_copy(src: str, dst: str) -> None:
    """cp --sparse=always, keeping the timestamps (the copy stands for the same file)."""
    subprocess.run(["cp", "--sparse=always", "--preserve=timestamps", src, dst], check=True)


# ------------------------------------------------------------------ looking at files

def data_extents(path: str) -> list[tuple[int, int]]:
    """(start, end) byte ranges SEEK_DATA reports as data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out, pos = [], 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
        return out
    finally:
        os.close(fd)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def block_union(paths: list[str], bs: int = BLOCK) -> list[tuple[int, int]]:
    """Data extents of all paths, rounded out to whole blocks, merged: (first, end) blocks."""
    ranges = sorted((s // bs, -(-e // bs)) for p in paths for s, e in data_extents(p))
    merged: list[tuple[int, int]] = []
    for b0, b1 in ranges:
        if merged and b0 <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b1))
        else:
            merged.append((b0, b1))
    return merged


def _chunks(ranges: list[tuple[int, int]], bs: int) -> Iterator[tuple[int, int]]:
    per = CHUNK // bs
    for b0, b1 in ranges:
        for b in range(b0, b1, per):
            yield b * bs, min(b1 - b, per) * bs


def _pread(fd: int, n: int, off: int) -> bytes:
    parts, got = [], 0
    while got < n:
        k = os.pread(fd, n - got, off + got)
        if not k:
            break
        parts.append(k)
        got += len(k)
    return b"".join(parts)


def warm(path: str) -> int:
    """Read a file's data extents once (into the page cache); returns bytes read."""
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(CHUNK)
    total = 0
    try:
        for s, e in data_extents(path):
            for off in range(s, e, CHUNK):
                total += os.preadv(fd, [memoryview(buf)[: min(CHUNK, e - off)]], off)
    finally:
        os.close(fd)
    return total


def identical(a: str, b: str) -> bool:
    """Same bytes, as cmp says, but reading only the union of both files' data extents
    (everything outside it is a hole in both, so zeros in both)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        for off, n in _chunks(block_union([a, b]), BLOCK):
            if _pread(fa, n, off) != _pread(fb, n, off):
                return False
        return True
    finally:
        os.close(fa)
        os.close(fb)


@dataclass
class ChangedData:
    block_size: int
    blocks: int  # blocks of block_size whose content differs between base and target
    raw_bytes: int
    zstd_bytes: int  # the changed target blocks, in order, compressed at level 3 in one stream


def changed_data(base: str, target: str, bs: int, level: int = 3) -> ChangedData:
    """Compare base and target block by block (blocks of bs bytes, the block size the
    signature uses) over the union of their data extents and compress the changed target
    blocks with zstd in one stream."""
    fa, fb = os.open(base, os.O_RDONLY), os.open(target, os.O_RDONLY)
    tsize = os.path.getsize(target)
    cobj = zstandard.ZstdCompressor(level=level).compressobj()
    out = blocks = raw = 0
    try:
        for off, n in _chunks(block_union([base, target], bs), bs):
            a, b = _pread(fa, n, off), _pread(fb, n, off)
            for k in range(0, n, bs):
                if off + k >= tsize:
                    break
                ba, bb = a[k : k + bs], b[k : k + bs]
                if ba.ljust(bs, b"\0") != bb.ljust(bs, b"\0") or len(ba) != len(bb):
                    blocks += 1
                    raw += len(bb)
                    out += len(cobj.compress(bb))
        out += len(cobj.flush())
    finally:
        os.close(fa)
        os.close(fb)
    return ChangedData(bs, blocks, raw, out)


# ------------------------------------------------------------------ the workloads

def ext4_pair(work: str, apparent: int, data: int, change: float = 0.05, seed: int = 1) -> Pair:
    summary = ext4image.build_pair(work, apparent, data, change, seed=seed)
    base, ch = summary["base"], summary["change"]
    assert isinstance(base, dict) and isinstance(ch, dict)
    notes = [f"{base['files']:,} real files ({base['file_bytes'] / MiB:.0f} MiB) from "
             f"{', '.join(ext4image.DEFAULT_ROOTS)}; debugfs removed {ch['removed_files']}, replaced "
             f"{ch['replaced_files']} (new versions), added {ch['added_files']} files: "
             f"{ch['touched_fraction']:.1%} of the file bytes"]
    if base["repeated"]:
        notes.append("not enough distinct files: some are repeated under other names")
    notes += list(ch["notes"])
    return Pair("ext4", os.path.join(work, "base.img"), os.path.join(work, "changed.img"),
                apparent, int(base["file_bytes"]), notes)


def _layout(rng: random.Random, apparent: int, data: int, min_blocks: int,
            max_blocks: int) -> list[tuple[int, int]]:
    """Non-overlapping (offset, length) extents, block aligned, about data bytes in all:
    one extent placed at random inside each of equal slots of the file."""
    sizes: list[int] = []
    while sum(sizes) < data:
        sizes.append(rng.randint(min_blocks, max_blocks) * BLOCK)
    slot = apparent // len(sizes) // BLOCK * BLOCK
    out = []
    for i, n in enumerate(sizes):
        n = min(n, slot - BLOCK)
        room = (slot - n) // BLOCK
        out.append((i * slot + rng.randrange(room) * BLOCK, n))
    return out


def scattered_pair(work: str, apparent: int, data: int, seed: int = 3, rewrite: float = 0.01,
                   punched: float = 0.005, moved: float = 0.005) -> Pair:
    """Extents of 64 KiB..1 MiB scattered over the file. The target rewrites a fraction of
    the extents with new data, punches some out and moves some to a free aligned offset."""
    rng = random.Random(seed)
    extents = _layout(rng, apparent, data, 1, 16)
    base, target = os.path.join(work, "base.img"), os.path.join(work, "target.img")
    fd = os.open(base, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, apparent)
        for i, (off, n) in enumerate(extents):
            write_at(fd, off, n, f"{seed}/base/{i}")
    finally:
        os.close(fd)
    sparse_copy(base, target)
    k = len(extents)
    n_rw, n_punch, n_move = (max(1, round(f * k)) for f in (rewrite, punched, moved))
    picked = rng.sample(range(k), n_rw + n_punch + n_move)
    fd = os.open(target, os.O_RDWR)
    moved_bytes = 0
    try:
        for i in picked[:n_rw]:
            off, n = extents[i]
            write_at(fd, off, n, f"{seed}/new/{i}")
        for i in picked[n_rw : n_rw + n_punch]:
            punch(fd, *extents[i])
        taken = sorted(extents)
        for i in picked[n_rw + n_punch :]:
            off, n = extents[i]
            data_i = _pread(fd, n, off)
            punch(fd, off, n)
            # the free space after some other extent, up to the next one
            for _ in range(10_000):
                j = rng.randrange(len(taken) - 1)
                gap0, gap1 = taken[j][0] + taken[j][1] + BLOCK, taken[j + 1][0] - BLOCK
                if gap1 - gap0 >= n:
                    new = gap0 + rng.randrange((gap1 - gap0 - n) // BLOCK + 1) * BLOCK
                    break
            else:
                raise RuntimeError("no free space to move an extent to: make the file larger")
            os.pwrite(fd, data_i, new)
            taken = sorted([*taken, (new, n)])
            moved_bytes += n
    finally:
        os.close(fd)
    total = sum(n for _, n in extents)
    notes = [f"{k} extents of 64 KiB..1 MiB; target: {n_rw} rewritten "
             f"({sum(extents[i][1] for i in picked[:n_rw]) / MiB:.1f} MiB), {n_punch} punched, "
             f"{n_move} moved ({moved_bytes / MiB:.1f} MiB) to other 64 KiB-aligned offsets"]
    return Pair("scattered", base, target, apparent, total, notes)


def holes_pair(work: str, apparent: int, data: int, seed: int = 5, extent: int = 256 * KiB) -> Pair:
    """A huge sparse file holding data bytes in extents of 256 KiB, and a dense file holding
    the same bytes one after the other. Only signatures are taken: target = base."""
    rng = random.Random(seed)
    extents = _layout(rng, apparent, data, extent // BLOCK, extent // BLOCK)
    sparse_path, dense_path = os.path.join(work, "sparse.img"), os.path.join(work, "dense.img")
    fs = os.open(sparse_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    fdn = os.open(dense_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    pos = 0
    try:
        os.ftruncate(fs, apparent)
        for i, (off, n) in enumerate(extents):
            chunk = content(f"{seed}/holes/{i}", n)
            os.pwrite(fs, chunk, off)
            os.pwrite(fdn, chunk, pos)
            pos += n
    finally:
        os.close(fs)
        os.close(fdn)
    notes = [f"{len(extents)} extents of {extent // KiB} KiB scattered over the file; "
             f"the dense file holds the same {pos / MiB:.0f} MiB contiguously"]
    return Pair("holes", sparse_path, sparse_path, apparent, pos, notes, {"dense": dense_path})


def dense_pair(work: str, size: int, seed: int = 7, change: float = 0.01) -> Pair:
    """A file with no holes; the target rewrites about change of its bytes in runs of
    16 KiB..256 KiB at random 4 KiB-aligned offsets."""
    rng = random.Random(seed)
    base, target = os.path.join(work, "base.img"), os.path.join(work, "target.img")
    fd = os.open(base, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_at(fd, 0, size, f"{seed}/dense")
    finally:
        os.close(fd)
    sparse_copy(base, target)
    fd = os.open(target, os.O_RDWR)
    done = runs = 0
    try:
        while done < change * size:
            n = rng.randint(4, 64) * PAGE
            off = rng.randrange((size - n) // PAGE) * PAGE
            os.pwrite(fd, content(f"{seed}/dense-new/{runs}", n), off)
            done += n
            runs += 1
    finally:
        os.close(fd)
    notes = [f"{runs} runs of 16..256 KiB rewritten ({done / MiB:.1f} MiB, "
             f"{done / size:.1%}) at 4 KiB-aligned offsets"]
    return Pair("dense", base, target, size, size, notes)


def moved_pair(work: str, size: int, seed: int = 11, swapped: float = 0.01, cycled: float = 0.005,
               shifted: float = 0.01, new: float = 0.0025) -> Pair:
    """A dense base of distinct 4 KiB pages, and a target whose pages are moved over each
    other: pairs swapped (swapped x pages pairs), 3-cycles rotated (cycled x pages triples),
    then one run of shifted x pages moved one page up, each drawn independently of the others
    so that they overlap; last, new x pages are overwritten with new data. What is moved is in
    the base at another 4 KiB-aligned offset: format v2 sends it as references.
    extra: the zstd -3 sizes (one stream each) of the moved pages and of the new pages."""
    rng = random.Random(seed)
    n = size // PAGE
    base, target = os.path.join(work, "base.img"), os.path.join(work, "target.img")
    old = content(f"{seed}/moved", n * PAGE)
    with open(base, "wb") as f:
        f.write(old)
    perm: list[int] = list(range(n))
    n_swap, n_cyc, n_shift, n_new = (max(1, round(f * n)) for f in (swapped, cycled, shifted, new))
    picks = rng.sample(range(n), 2 * n_swap)
    for a, b in zip(picks[::2], picks[1::2], strict=True):
        perm[a], perm[b] = perm[b], perm[a]
    picks = rng.sample(range(n), 3 * n_cyc)
    for a, b, c in zip(picks[::3], picks[1::3], picks[2::3], strict=True):
        perm[a], perm[b], perm[c] = perm[c], perm[a], perm[b]
    s = rng.randrange(n - n_shift - 1)
    perm[s + 1 : s + n_shift + 1] = perm[s : s + n_shift]
    fresh = set(rng.sample(range(n), n_new))
    out = bytearray()
    moved, novel = bytearray(), bytearray()
    for i, src in enumerate(perm):
        if i in fresh:
            page = content(f"{seed}/moved-new/{i}", PAGE)
            novel += page
        else:
            page = old[src * PAGE : (src + 1) * PAGE]
            if src != i:
                moved += page
        out += page
    with open(target, "wb") as f:
        f.write(out)
    z = zstandard.ZstdCompressor(level=3)
    notes = [f"{n:,} distinct 4 KiB pages; target: {n_swap:,} pairs swapped, {n_cyc:,} 3-cycles "
             f"rotated, a run of {n_shift:,} pages shifted by one page, over each other: "
             f"{len(moved) // PAGE:,} pages moved ({len(moved) / MiB:.1f} MiB); "
             f"{n_new:,} pages of new data ({len(novel) / MiB:.1f} MiB)"]
    extra = {"moved_pages": str(len(moved) // PAGE), "moved_zstd": str(len(z.compress(bytes(moved)))),
             "new_pages": str(n_new), "new_zstd": str(len(z.compress(bytes(novel))))}
    return Pair("moved", base, target, size, size, notes, extra)


def fill_dense(path: str, size: int, seed: int = 13) -> None:
    """A fully allocated file of size bytes, written fast: fallocate, then 4 MiB writes cut
    from a 64 MiB pool of content() and stamped with the offset at every 4 KiB page, so that
    every page of the file is distinct (a signature of it has no duplicate blocks)."""
    pool = content(f"{seed}/pool", 16 * CHUNK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if _libc.fallocate(fd, 0, 0, size) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fallocate {path}: {os.strerror(err)}")
        for k, off in enumerate(range(0, size, CHUNK)):
            n = min(CHUNK, size - off)
            start = (k % 16) * CHUNK
            buf = bytearray(pool[start : start + n])
            for p in range(0, n, PAGE):
                buf[p : p + 8] = (off + p).to_bytes(8, "little")
            os.pwrite(fd, buf, off)
    finally:
        os.close(fd)


def memory_pair(work: str, size: int, seed: int = 13, change: float = 0.01) -> Pair:
    """A fully allocated file (fill_dense) and a copy of it with change of its bytes
    rewritten in runs of 16 KiB..256 KiB at 4 KiB-aligned offsets."""
    rng = random.Random(seed)
    base, target = os.path.join(work, "base.img"), os.path.join(work, "target.img")
    fill_dense(base, size, seed)
    subprocess.run(["cp", "--sparse=never", base, target], check=True)
    fd = os.open(target, os.O_RDWR)
    done = runs = 0
    try:
        while done < change * size:
            n = rng.randint(4, 64) * PAGE
            off = rng.randrange((size - n) // PAGE) * PAGE
            os.pwrite(fd, content(f"{seed}/memory-new/{runs}", n), off)
            done += n
            runs += 1
    finally:
        os.close(fd)
    notes = [f"fully allocated ({allocated(base) / GiB:.1f} GiB allocated), every 4 KiB page distinct; "
             f"target: {runs} runs of 16..256 KiB rewritten ({done / MiB:.1f} MiB, {done / size:.1%})"]
    return Pair("memory", base, target, size, size, notes)
