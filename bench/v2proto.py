#!/usr/bin/env python3
"""Prototype measurements for patch format v2: moved content, long-range compression, scratch.

Nothing here is the implementation. It models what diff and apply of each v2 design would do,
over pages held in memory, and prints the numbers bench/V2-DESIGN.md quotes.

    python bench/v2proto.py moved    --dir /var/tmp/osimg2 [--json out.json]
    python bench/v2proto.py compress --dir /var/tmp/osimg2 [--workloads install,...]
    python bench/v2proto.py synthetic --dir /var/tmp/osimg2

moved      per workload: where the changed data is found in the base (same offset, another
           4 KiB offset, a 16 KiB base block at any 4 KiB offset), fingerprint widths and their
           false candidates, signature sizes, patch size per design as a fraction of R, and the
           scratch apply needs (stage all, ordered, ordered in 64 MiB synced chunks).
compress   one zstd stream over the novel data vs frames; threads, determinism, peak RSS of the
           compressor (measured in a child process), decoder window.
synthetic  swaps, a 3-cycle and a shift by one 4 KiB page of real base data, plus new data.
dump       writes OUT/base.data (the base's data extents), OUT/NAME.changed (changed 16 KiB blocks)
           and OUT/NAME.novel (novel pages) for the zstd CLI comparisons in V2-DESIGN.md.
zmodes     on OUT/NAME.novel: exact page repeats removed, zstd's multithreaded job sizes, flushes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable

import blake3
import zstandard

PAGE = 4096
BS = 16384
PPB = BS // PAGE
ZERO16 = bytes(16)
WORKLOADS = ("install", "upgrade", "rebuilt")
# Bytes a v2 patch spends on references (proposal in V2-DESIGN.md): a copy run is
# target page u64 + source page u64 + count u32; each copied page carries its base and target page
# hash (16 B each); each changed 16 KiB block keeps base and target hash (the per-block checks stay).
RUN_BYTES = 20
PAGE_HASH = 32
BLOCK_META = 32
ZERO_RUN = 32  # a ZERO record: header and CRC


def h16(b: bytes) -> bytes:
    return blake3.blake3(b).digest(16)


def load_pages(path: str) -> dict[int, bytes]:
    """The non-zero 4 KiB pages of path's data extents, by page number."""
    out: dict[int, bytes] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            off = start // PAGE * PAGE
            while off < end:
                chunk = os.pread(fd, min(1 << 20, end - off), off)
                for k in range(0, len(chunk), PAGE):
                    p = chunk[k : k + PAGE]
                    if p.count(0) != len(p):
                        out[(off + k) // PAGE] = p.ljust(PAGE, b"\0")
                off += len(chunk)
            pos = end
    finally:
        os.close(fd)
    return out


class Image:
    """Page and block hashes of one image (pages: non-zero only)."""

    def __init__(self, pages: dict[int, bytes]):
        self.pages = pages
        self.ph = {n: h16(p) for n, p in pages.items()}
        self.blocks: dict[int, bytes] = {}  # v1 block hash: BLAKE3 of the 16 KiB content
        for b in sorted({n // PPB for n in pages}):
            self.blocks[b] = h16(b"".join(pages.get(b * PPB + k, bytes(PAGE)) for k in range(PPB)))

    def page_hash(self, n: int) -> bytes:
        return self.ph.get(n, ZERO16)

    def tree_hash(self, first_page: int) -> bytes:
        """The v2 block hash: BLAKE3 of the 4 page hashes, so that diff can hash any 16 KiB
        window at a 4 KiB offset from the page hashes it already has."""
        return h16(b"".join(self.page_hash(first_page + k) for k in range(PPB)))


def runs(pairs: Iterable[tuple[int, int]]) -> int:
    """Copy runs: consecutive target pages with consecutive sources."""
    n, last = 0, None
    for t, s in pairs:
        if last is None or (t, s) != (last[0] + 1, last[1] + 1):
            n += 1
        last = (t, s)
    return n


def zsize(data: bytes, level: int = 3, **params: int) -> int:
    if params:
        cp = zstandard.ZstdCompressionParameters.from_level(level, **params)
        return len(zstandard.ZstdCompressor(compression_params=cp).compress(data))
    return len(zstandard.ZstdCompressor(level=level).compress(data))


def ldm(data: bytes, wlog: int = 27) -> int:
    return zsize(data, window_log=wlog, enable_ldm=1)


def analyse(base: Image, target: Image, target_blocks: int) -> dict:
    """Classify every changed page and model each design."""
    res: dict = {}
    changed = sorted(b for b in set(base.blocks) | set(target.blocks)
                     if b < target_blocks and base.blocks.get(b) != target.blocks.get(b))
    zero_blocks = [b for b in changed if b not in target.blocks]
    data_blocks = [b for b in changed if b in target.blocks]
    res["changed_blocks"] = len(data_blocks)
    res["zero_blocks"] = len(zero_blocks)
    res["R"] = zsize(b"".join(b"".join(target.pages.get(b * PPB + k, bytes(PAGE)) for k in range(PPB))
                              for b in data_blocks))
    # v1: a COPY source is a base block that no record changes, by full block hash.
    stable_blocks: dict[bytes, int] = {}
    for b, h in sorted(base.blocks.items(), reverse=True):
        if target.blocks.get(b) == h and b < target_blocks:
            stable_blocks[h] = b
    v1_copy = [b for b in data_blocks if target.blocks[b] in stable_blocks]
    v1_data = [b for b in data_blocks if target.blocks[b] not in stable_blocks]

    index: dict[bytes, list[int]] = {}
    for n in sorted(base.ph):
        index.setdefault(base.ph[n], []).append(n)
    stable_page = {n for n, h in base.ph.items() if target.ph.get(n) == h}
    kinds = {"zero": 0, "same": 0, "moved": 0, "novel": 0}
    copies: list[tuple[int, int]] = []
    novel: list[int] = []
    zeroed: list[int] = []  # target pages set to zero over base data, inside changed blocks
    lookups: list[bytes] = []  # hashes diff looks up in the page index
    prev: tuple[int, int] | None = None
    for b in data_blocks:
        for n in range(b * PPB, b * PPB + PPB):
            th = target.page_hash(n)
            if th == ZERO16:
                kinds["zero"] += 1
                if n in base.ph:
                    zeroed.append(n)
                continue
            if base.page_hash(n) == th:
                kinds["same"] += 1
                continue
            lookups.append(th)
            cands = index.get(th)
            if not cands:
                kinds["novel"] += 1
                novel.append(n)
                prev = None
                continue
            kinds["moved"] += 1
            cont = prev[1] + 1 if prev and prev[0] == n - 1 else None
            stable = [c for c in cands if c in stable_page]
            if cont is not None and cont in cands and (cont in stable_page or not stable):
                s = cont
            elif stable:
                s = stable[0]
            else:
                s = cont if cont is not None and cont in cands else cands[0]
            copies.append((n, s))
            prev = (n, s)
    res["pages"] = kinds
    res["copy_runs"] = runs(copies)
    res["base_pages"] = len(base.ph)

    # Fingerprint widths: a lookup that hits a truncated fingerprint but not the full hash.
    fp = {}
    for w in (4, 6, 8):
        trunc = {h[:w] for h in base.ph.values()}
        full = set(base.ph.values())
        false = sum(1 for h in lookups if h[:w] in trunc and h not in full)
        fp[w] = {"false_candidates": false, "lookups": len(lookups),
                 "expected": len(lookups) * len(trunc) / 2 ** (8 * w)}
    res["fingerprints"] = fp

    # Design W: no page hashes in the signature; the v2 block hash is a tree over page hashes, and
    # diff looks up the tree hash of every 16 KiB window at a 4 KiB offset of the target.
    btree = {base.tree_hash(b * PPB) for b in base.blocks}
    looked = {n for n in (c[0] for c in copies)} | set(novel)
    window_found: set[int] = set()
    for b in data_blocks:
        for q in range(b * PPB - PPB + 1, b * PPB + PPB):
            if target.tree_hash(q) in btree and target.page_hash(q) != ZERO16:
                window_found.update(n for n in range(q, q + PPB) if n in looked)
    res["window_found_pages"] = len(window_found)

    # Literal data per design, compressed as one stream (level 3, window 2^27, LDM) and, for v1,
    # as the v1 per-record frames are modelled by R's stream: the patch files give v1 exactly.
    def lit(pages: Iterable[int]) -> bytes:
        return b"".join(target.pages[n] for n in pages)

    novel_raw = lit(novel)
    res["novel_raw"] = len(novel_raw)
    res["novel_ldm27"] = ldm(novel_raw, 27)
    res["novel_ldm24"] = ldm(novel_raw, 24)
    res["novel_z3"] = zsize(novel_raw)
    w_lit = sorted((set(novel) | {c[0] for c in copies}) - window_found)
    res["window_lit_ldm27"] = ldm(lit(w_lit), 27)
    v1_raw = b"".join(b"".join(target.pages.get(b * PPB + k, bytes(PAGE)) for k in range(PPB))
                      for b in v1_data)
    res["v1_data_ldm27"] = ldm(v1_raw, 27)
    res["v1_copy_blocks"] = len(v1_copy)

    meta = BLOCK_META * len(data_blocks) + ZERO_RUN * runs((b, b) for b in zero_blocks)
    ref_p = RUN_BYTES * res["copy_runs"] + PAGE_HASH * len(copies)
    w_copies = sorted((n, s) for n, s in copies if n in window_found)
    ref_w = RUN_BYTES * runs(w_copies) + PAGE_HASH * len(w_copies)
    res["design"] = {
        "v1 blocks + one LDM stream": res["v1_data_ldm27"] + meta + RUN_BYTES * runs((b, b) for b in v1_copy),
        "W: tree-hash windows + LDM stream": res["window_lit_ldm27"] + meta + ref_w,
        "P: page refs + LDM stream (wlog 27)": res["novel_ldm27"] + meta + ref_p,
        "P: page refs + LDM stream (wlog 24)": res["novel_ldm24"] + meta + ref_p,
        "P: page refs + zstd -3 stream": res["novel_z3"] + meta + ref_p,
    }
    res["refs_bytes"] = ref_p
    res["scratch"] = scratch(copies, novel, zeroed, zero_blocks)
    return res


def scratch(copies: list[tuple[int, int]], novel: list[int], zeroed: list[int],
            zero_blocks: list[int], chunk_pages: int = (64 << 20) // PAGE) -> dict:
    """What apply must keep of the base before overwriting it.

    Copies run first (DATA and ZERO after them, so their writes destroy no source). Copy p must
    precede the copy q that writes p's source: each target page has one writer, so every copy has
    at most one successor and the graph is a functional graph: its strongly connected parts are
    plain cycles, and one staged page breaks each."""
    written = {t for t, _ in copies} | set(novel) | set(zeroed)
    written.update(n for b in zero_blocks for n in range(b * PPB, b * PPB + PPB))
    writer = {t: i for i, (t, _) in enumerate(copies)}
    nxt = [writer.get(s, -1) for _, s in copies]
    sources = {s for _, s in copies}
    stage_all = len(sources & written)
    # Cycles: walk each unvisited node; a walk that meets itself closes a cycle.
    state = [0] * len(copies)  # 0 new, 1 on the current walk, 2 done
    cycles = 0
    broken = set()
    for i in range(len(copies)):
        path = []
        j = i
        while j >= 0 and state[j] == 0:
            state[j] = 1
            path.append(j)
            j = nxt[j]
        if j >= 0 and state[j] == 1:
            cycles += 1
            broken.add(j)  # stage j's source: j no longer waits for its successor
        for k in path:
            state[k] = 2
    nxt2 = [-1 if i in broken else n for i, n in enumerate(nxt)]
    # dist: the copies that must follow; order by it descending is a topological order.
    dist = [-1] * len(copies)
    for i in range(len(copies)):
        path = []
        j = i
        while j >= 0 and dist[j] < 0:
            path.append(j)
            j = nxt2[j]
        d = dist[j] if j >= 0 else -1
        for k in reversed(path):
            d += 1
            dist[k] = d
    levels = max(dist) + 1 if dist else 0
    order = sorted(range(len(copies)), key=lambda i: (-dist[i], copies[i][0]))
    pos = {i: k for k, i in enumerate(order)}
    # In 64 MiB chunks, synced between: a source needs staging only if its writer falls in the same
    # chunk as its reader (an unsynced reader could be lost after its source is overwritten).
    def same_chunk(i: int) -> bool:
        return nxt2[i] >= 0 and pos[i] // chunk_pages == pos[nxt2[i]] // chunk_pages

    staged_chunked = len(broken) + sum(1 for i in range(len(copies)) if same_chunk(i))
    # Cap the levels (each costs apply a sync): stage the source of every cap-th copy of a chain.
    cap = 16
    capped = len(broken) + sum(1 for d in dist if d > 0 and d % cap == 0)
    edges = sum(1 for n in nxt if n >= 0)
    return {"capped_levels": min(levels, cap), "capped_bytes": capped * PAGE,
            "copies": len(copies), "sources_overwritten_by_any": stage_all,
            "copy_edges": edges, "cycles": cycles, "levels": levels,
            "stage_all_bytes": stage_all * PAGE, "ordered_bytes": len(broken) * PAGE,
            "chunked_bytes": staged_chunked * PAGE}


def blocks_of(path: str) -> int:
    return -(-os.stat(path).st_size // BS)


def cmd_moved(a: argparse.Namespace) -> int:
    base = Image(load_pages(os.path.join(a.dir, "base.img")))
    data_bytes = len(base.blocks) * BS
    sig = {"v1 (16 B per data block)": 16 * len(base.blocks)}
    for w in (4, 6, 8, 16):
        sig[f"+ {w} B per non-zero page"] = 16 * len(base.blocks) + w * len(base.ph)
        sig[f"{w} B per page, block hash derived"] = w * len(base.blocks) * PPB
    out: dict = {"base": {"data_blocks": len(base.blocks), "pages": len(base.ph),
                          "signature_pct": {k: 100 * v / data_bytes for k, v in sig.items()}}}
    for name in a.workloads.split(","):
        path = os.path.join(a.dir, f"{name}.img")
        t0 = time.time()
        target = Image(load_pages(path))
        r = analyse(base, target, blocks_of(path))
        r["seconds"] = round(time.time() - t0, 1)
        patch = os.path.join(a.dir, f"{name}.patch")
        if os.path.exists(patch):
            r["v1_patch"] = os.path.getsize(patch)
        out[name] = r
        report(name, r)
        del target
    print(json.dumps(out["base"], indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def report(name: str, r: dict) -> None:
    mib = 2 ** 20
    R = r["R"]
    k = r["pages"]
    total = sum(k.values())
    look = k["moved"] + k["novel"]
    print(f"== {name}: {r['changed_blocks']} changed blocks, {r['zero_blocks']} zeroed, R {R / mib:.1f} MiB")
    shares = ", ".join(f"{n} {v} ({100 * v / total:.1f}%)" for n, v in k.items())
    print(f"  pages of changed blocks: {shares}")
    print(f"  of the {look} pages looked up: moved {100 * k['moved'] / max(look, 1):.1f}%, "
          f"found by 16 KiB tree windows {100 * r['window_found_pages'] / max(look, 1):.1f}%, "
          f"v1 COPY blocks {r['v1_copy_blocks']}")
    print(f"  copy runs {r['copy_runs']}, refs {r['refs_bytes'] / mib:.2f} MiB; novel raw "
          f"{r['novel_raw'] / mib:.1f} MiB")
    for w, f in r["fingerprints"].items():
        print(f"  fp {w} B: false candidates {f['false_candidates']} of {f['lookups']} "
              f"(expected {f['expected']:.3g})")
    if "v1_patch" in r:
        print(f"  v1 patch file {r['v1_patch'] / mib:.1f} MiB = {r['v1_patch'] / R:.3f} R")
    for d, v in r["design"].items():
        print(f"  {d}: {v / mib:.1f} MiB = {v / R:.3f} R")
    s = r["scratch"]
    print(f"  scratch: copies {s['copies']}, sources overwritten {s['sources_overwritten_by_any']}, "
          f"copy->copy edges {s['copy_edges']}, cycles {s['cycles']}, levels {s['levels']}; stage all "
          f"{s['stage_all_bytes'] / mib:.1f} MiB, ordered {s['ordered_bytes'] / mib:.2f} MiB, "
          f"ordered in synced 64 MiB chunks {s['chunked_bytes'] / mib:.1f} MiB, ordered with at most "
          f"{s['capped_levels']} levels {s['capped_bytes'] / mib:.2f} MiB")
    sys.stdout.flush()


def novel_of(a: argparse.Namespace, name: str, base: Image) -> bytes:
    path = os.path.join(a.dir, f"{name}.img")
    target = Image(load_pages(path))
    out = []
    for b in sorted(target.blocks):
        if base.blocks.get(b) == target.blocks[b]:
            continue
        for n in range(b * PPB, b * PPB + PPB):
            th = target.page_hash(n)
            if th != ZERO16 and base.page_hash(n) != th and th not in base_hashes(base):
                out.append(target.pages[n])
    return b"".join(out)


_BH: dict[int, set[bytes]] = {}


def base_hashes(base: Image) -> set[bytes]:
    if id(base) not in _BH:
        _BH[id(base)] = set(base.ph.values())
    return _BH[id(base)]


CHILD = r"""
import hashlib, resource, sys, time, zstandard
path, level, wlog, ldm, threads, frame = sys.argv[1:7]
level, wlog, ldm, threads, frame = int(level), int(wlog), int(ldm), int(threads), int(frame)
kw = {"enable_ldm": 1} if ldm else {}
if wlog:
    kw["window_log"] = wlog
cp = zstandard.ZstdCompressionParameters.from_level(level, threads=threads, **kw)
def hwm():
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's over fork and exec.
    with open("/proc/self/status") as st:
        return next(int(x.split()[1]) for x in st if x.startswith("VmHWM"))
base_rss = hwm()
h, n, t0 = hashlib.sha256(), 0, time.time()
c0 = time.process_time()
class Sink:
    def write(self, b):
        global n
        h.update(b); n += len(b)
        return len(b)
with open(path, "rb") as f:
    left = 0
    w = None
    while True:
        if w is None or (frame and left <= 0):
            if w is not None:
                w.flush(zstandard.FLUSH_FRAME)
            w = zstandard.ZstdCompressor(compression_params=cp).stream_writer(Sink(), closefd=False)
            left = frame or (1 << 62)
        buf = f.read(min(1 << 20, left))
        if not buf:
            break
        w.write(buf)
        left -= len(buf)
    w.flush(zstandard.FLUSH_FRAME)
ru = resource.getrusage(resource.RUSAGE_SELF)
print(n, h.hexdigest()[:16], round(time.time() - t0, 2), round(ru.ru_utime + ru.ru_stime, 2),
      hwm() // 1024, base_rss // 1024)
"""


def child(path: str, level: int, wlog: int, ldm_on: int, threads: int, frame: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(level), str(wlog), str(ldm_on),
                          str(threads), str(frame)], check=True, capture_output=True, text=True).stdout
    n, digest, wall, cpu, rss, rss0 = out.split()
    return {"bytes": int(n), "sha": digest, "wall": float(wall), "cpu": float(cpu),
            "rss_mib": int(rss), "rss0_mib": int(rss0)}


def cmd_compress(a: argparse.Namespace) -> int:
    base = Image(load_pages(os.path.join(a.dir, "base.img")))
    results: dict = {}
    for name in a.workloads.split(","):
        raw = novel_of(a, name, base)
        with tempfile.NamedTemporaryFile(dir=a.tmp, delete=False) as f:
            f.write(raw)
            path = f.name
        mib = 2 ** 20
        print(f"== {name}: novel data {len(raw) / mib:.1f} MiB")
        rows = []
        configs = [("stream L3 default window", 3, 0, 0, 0, 0),
                   ("stream wlog 24 LDM", 3, 24, 1, 0, 0),
                   ("stream wlog 25 LDM", 3, 25, 1, 0, 0),
                   ("stream wlog 26 LDM", 3, 26, 1, 0, 0),
                   ("stream wlog 27 LDM", 3, 27, 1, 0, 0),
                   ("stream wlog 27 no LDM", 3, 27, 0, 0, 0)]
        for fr in (1, 8, 32, 128) if name == a.threads_on else ():
            configs.append((f"frames {fr} MiB, wlog {min(27, 20 + fr.bit_length() - 1)} LDM", 3,
                            min(27, 20 + fr.bit_length() - 1), 1, 0, fr << 20))
        for th in ([1, 2, 4] if name == a.threads_on else []):
            configs.append((f"stream wlog 27 LDM threads={th}", 3, 27, 1, th, 0))
        for label, *cfg in configs:
            r = child(path, *cfg)
            r["label"] = label
            rows.append(r)
            print(f"  {label}: {r['bytes'] / mib:.2f} MiB, wall {r['wall']} s, cpu {r['cpu']} s, "
                  f"peak RSS {r['rss_mib']} MiB (python {r['rss0_mib']}), sha {r['sha']}")
            sys.stdout.flush()
        if name == a.threads_on:
            again = [child(path, 3, 27, 1, th, 0)["sha"] for th in (1, 2, 4)]
            print(f"  rerun wlog 27 threads 1,2,4: {again}")
        os.unlink(path)
        results[name] = rows
    return 0


def cmd_synthetic(a: argparse.Namespace) -> int:
    """Real base pages rearranged: swap two 32 MiB regions, rotate three 16 MiB regions, shift
    48 MiB by one page, and 4 MiB of new content (base pages with one byte changed per 512)."""
    src = load_pages(os.path.join(a.dir, "base.img"))
    seq = [src[n] for n in sorted(src)][: 256 * 256]  # 256 MiB of real data, densely packed
    bpages = dict(enumerate(seq))
    t = list(seq)
    m32, m16 = 8192, 4096
    t[0:m32], t[m32:2 * m32] = seq[m32:2 * m32], seq[0:m32]  # swap
    a0 = 4 * m32
    ra, rb, rc = seq[a0:a0 + m16], seq[a0 + m16:a0 + 2 * m16], seq[a0 + 2 * m16:a0 + 3 * m16]
    t[a0:a0 + 3 * m16] = rc + ra + rb  # 3-cycle
    s0 = a0 + 3 * m16
    t[s0 + 1:s0 + 12288] = seq[s0:s0 + 12287]  # 48 MiB of content shifted by one 4 KiB page
    new0 = s0 + 12288 + 2048
    for k in range(new0, new0 + 1024):
        p = bytearray(seq[k])
        for j in range(0, PAGE, 512):
            p[j] ^= 0x5A
        t[k] = bytes(p)
    tpages = dict(enumerate(t))
    base, target = Image(bpages), Image(tpages)
    r = analyse(base, target, len(t) // PPB)
    assert len(t) == len(seq)
    moved = [n for n in range(len(t)) if t[n] != seq[n] and not new0 <= n < new0 + 1024]
    moved_z3 = zsize(b"".join(t[n] for n in moved))
    new_z3 = zsize(b"".join(t[new0:new0 + 1024]))
    report("synthetic", r)
    p = r["design"]["P: page refs + LDM stream (wlog 27)"]
    print(f"  moved pages {len(moved)}, their zstd -3 {moved_z3 / 2**20:.1f} MiB; new data zstd -3 "
          f"{new_z3 / 2**20:.2f} MiB; design P {p / 2**20:.2f} MiB; (P - new) / moved = "
          f"{(p - new_z3) / moved_z3:.3%}")
    return 0


def cmd_dump(a: argparse.Namespace) -> int:
    base_path = os.path.join(a.dir, "base.img")
    base = Image(load_pages(base_path))
    with open(os.path.join(a.out, "base.data"), "wb") as f:
        for n in sorted(base.pages):
            f.write(base.pages[n])
    known = base_hashes(base)
    for name in a.workloads.split(","):
        target = Image(load_pages(os.path.join(a.dir, f"{name}.img")))
        with open(os.path.join(a.out, f"{name}.changed"), "wb") as ch, \
                open(os.path.join(a.out, f"{name}.novel"), "wb") as nov:
            for b in sorted(target.blocks):
                if base.blocks.get(b) == target.blocks[b]:
                    continue
                for n in range(b * PPB, b * PPB + PPB):
                    ch.write(target.pages.get(n, bytes(PAGE)))
                    th = target.page_hash(n)
                    if th != ZERO16 and base.page_hash(n) != th and th not in known:
                        nov.write(target.pages[n])
    return 0


def cmd_zmodes(a: argparse.Namespace) -> int:
    mib = 2 ** 20
    for name in a.workloads.split(","):
        with open(os.path.join(a.out, f"{name}.novel"), "rb") as f:
            d = f.read()
        seen: set[bytes] = set()
        uniq = []
        for k in range(0, len(d), PAGE):
            h = h16(d[k : k + PAGE])
            if h not in seen:
                seen.add(h)
                uniq.append(d[k : k + PAGE])
        u = b"".join(uniq)
        print(f"== {name}: {len(d) // PAGE - len(uniq)} pages repeat exactly")
        for wl in (24, 25, 27):
            print(f"  repeats removed, wlog {wl} LDM: {ldm(u, wl) / mib:.2f} MiB")
        modes: list[tuple[int, int, dict[str, int]]] = [
            (2, 0, {"overlap_log": 9}), (2, 0, {"overlap_log": 9, "job_size": 256 << 20}),
            (2, 0, {"job_size": 512 << 20}), (0, 1 << 20, {}),
            (2, 8 << 20, {"overlap_log": 9, "job_size": 256 << 20})]
        for threads, every, kw in modes:
            cp = zstandard.ZstdCompressionParameters.from_level(3, window_log=27, enable_ldm=1,
                                                                threads=threads, **kw)
            out = io.BytesIO()
            w = zstandard.ZstdCompressor(compression_params=cp).stream_writer(out, closefd=False)
            step = every or len(d)
            for k in range(0, len(d), step):
                w.write(d[k : k + step])
                if every:
                    w.flush(zstandard.FLUSH_BLOCK)
            w.flush(zstandard.FLUSH_FRAME)
            print(f"  wlog 27 LDM threads={threads} {kw} flush every {every >> 20} MiB: "
                  f"{len(out.getvalue()) / mib:.2f} MiB")
            sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for n in ("moved", "compress", "synthetic", "dump", "zmodes"):
        s = sub.add_parser(n)
        s.add_argument("--dir", default="/var/tmp/osimg2")
        s.add_argument("--workloads", default=",".join(WORKLOADS))
        s.add_argument("--json")
        s.add_argument("--tmp", default="/var/tmp")
        s.add_argument("--threads-on", default="install")
        s.add_argument("--out", default="/var/tmp/v2")
    a = p.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cmds = {"moved": cmd_moved, "compress": cmd_compress, "synthetic": cmd_synthetic, "dump": cmd_dump,
            "zmodes": cmd_zmodes}
    return cmds[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
