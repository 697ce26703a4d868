#!/usr/bin/env python3
"""Measure sparsepatch at several block sizes on a realistic changed ext4 image.

For each block size: `signature` of the base, `diff` of that signature against the changed
image, `apply` of the patch onto a sparse copy of the base (cp --sparse=always), then cmp
of the result with the changed image. Records wall time, CPU time and peak memory of each
command, signature and patch sizes (and the patch's raw and compressed data bytes from
`sparsepatch info --json`), and the allocation of the result. Prints a Markdown table and
writes the numbers to WORK/results.json.

    python bench/blocksize.py --work /tmp/bs --size 4G --data 512M --change 0.05
    python bench/blocksize.py --work /tmp/big --size 32G --data 2G --block-sizes 64K

Times are of the real command line (a fresh interpreter each run) with the images in the
page cache, as they are right after being built. The commands run the sparsepatch that
this interpreter imports; set PYTHONPATH to measure another copy of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ext4image  # noqa: E402

from sparsepatch.cli import human  # noqa: E402

SPARSEPATCH = [sys.executable, "-m", "sparsepatch"]


# A forked child starts with its parent's peak RSS as its own (and exec keeps it), so the
# commands are started from a small interpreter that reports their wall time and peak RSS.
_TIMER = """
import os, subprocess, sys, time
t = time.monotonic()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(time.monotonic() - t, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
      os.waitstatus_to_exitcode(status))
"""


def run(args: Sequence[str]) -> tuple[float, float, int]:
    """Run a command, fail loudly on error: (wall seconds, CPU seconds, peak RSS in bytes)."""
    r = subprocess.run([sys.executable, "-c", _TIMER, *args], capture_output=True, text=True)
    wall, cpu, peak, code = r.stdout.split() if r.returncode == 0 else ("0", "0", "0", "-1")
    if int(code):
        raise RuntimeError(f"{' '.join(args)} exited {code}: {r.stderr.strip()}")
    return float(wall), float(cpu), int(peak)


def info(path: str) -> dict[str, Any]:
    out = subprocess.run([*SPARSEPATCH, "info", "--json", path], check=True, capture_output=True)
    return json.loads(out.stdout)


def module_path() -> str:
    """Which sparsepatch the commands run (PYTHONPATH can point at another copy)."""
    out = subprocess.run([sys.executable, "-c", "import sparsepatch; print(sparsepatch.__file__)"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def identical(a: str, b: str) -> bool:
    r = subprocess.run(["cmp", "-s", a, b])
    if r.returncode > 1:
        raise RuntimeError(f"cmp {a} {b} failed")
    return r.returncode == 0


def measure(base: str, changed: str, work: str, block_size: int, repeat: int = 1) -> dict[str, Any]:
    """One block size, timed repeat times (median reported; sizes do not vary)."""
    tag = f"{block_size >> 10}K"
    sig = os.path.join(work, f"base-{tag}.sig")
    patch = os.path.join(work, f"{tag}.patch")
    dest = os.path.join(work, f"dest-{tag}.img")
    times: dict[str, list[float]] = {"signature": [], "diff": [], "apply": []}
    cpu: dict[str, list[float]] = {"signature": [], "diff": [], "apply": []}
    rss: dict[str, int] = {"signature": 0, "diff": 0, "apply": 0}
    same = True
    for _ in range(repeat):
        for verb, args in (
            ("signature", ["signature", base, "-o", sig, "-b", str(block_size), "-q"]),
            ("diff", ["diff", sig, changed, "-o", patch, "-q"]),
        ):
            wall, used, peak = run([*SPARSEPATCH, *args])
            times[verb].append(wall)
            cpu[verb].append(used)
            rss[verb] = max(rss[verb], peak)
        subprocess.run(["cp", "--sparse=always", base, dest], check=True)
        wall, used, peak = run([*SPARSEPATCH, "apply", patch, dest, "-q"])
        times["apply"].append(wall)
        cpu["apply"].append(used)
        rss["apply"] = max(rss["apply"], peak)
        same = same and identical(dest, changed)
    si, pi = info(sig), info(patch)
    dest_alloc, dest_data = ext4image.allocation(dest)
    result = {
        "block_size": block_size,
        "signature_bytes": os.path.getsize(sig),
        "patch_bytes": os.path.getsize(patch),
        "patch_data_bytes": pi["data_bytes"],
        "patch_payload_bytes": pi["payload_bytes"],
        "patch_blocks": pi["blocks"],
        "patch_records": pi["records"],
        "base_data_blocks": si["data_blocks"],
        "times": times,
        "cpu": cpu,
        "median": {k: statistics.median(v) for k, v in times.items()},
        "median_cpu": {k: statistics.median(v) for k, v in cpu.items()},
        "peak_rss": rss,
        "identical": same,
        "result_allocated_bytes": dest_alloc,
        "result_data_extent_bytes": dest_data,
    }
    for path in (sig, patch, dest):
        os.unlink(path)
    return result


def table(results: Sequence[dict[str, Any]]) -> str:
    head = ("| block | signature | patch | sig + patch | patch data (raw) | changed blocks "
            "| signature s | diff s | apply s | CPU s sig/diff/apply | peak RSS sig/diff/apply | identical |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        b = r["patch_blocks"]
        m = r["median"]
        rss = "/".join(f"{r['peak_rss'][k] >> 20}" for k in ("signature", "diff", "apply"))
        cpu = "/".join(f"{r['median_cpu'][k]:.1f}" for k in ("signature", "diff", "apply"))
        rows.append(
            f"| {r['block_size'] >> 10}K | {human(r['signature_bytes'])} | {human(r['patch_bytes'])} "
            f"| {human(r['signature_bytes'] + r['patch_bytes'])} "
            f"| {human(r['patch_data_bytes'])} | {b['data']:,} data, {b['zero']:,} zero, {b['copy']:,} copy "
            f"| {m['signature']:.1f} | {m['diff']:.1f} | {m['apply']:.1f} | {cpu} | {rss} MiB "
            f"| {'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="directory for the images and outputs")
    p.add_argument("--size", type=ext4image.parse_size, default=ext4image.parse_size("4G"),
                   help="apparent image size (4G)")
    p.add_argument("--data", type=ext4image.parse_size, default=ext4image.parse_size("512M"),
                   help="bytes of real files in the base (512M)")
    p.add_argument("--change", type=float, default=0.05, help="changed fraction of --data (0.05)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--block-sizes", default="4K,16K,64K,256K")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per block size (median)")
    p.add_argument("--reuse", action="store_true", help="reuse WORK/base.img and changed.img")
    p.add_argument("--keep", action="store_true", help="keep the images afterwards")
    a = p.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    base = os.path.join(a.work, "base.img")
    changed = os.path.join(a.work, "changed.img")
    if a.reuse and os.path.exists(base) and os.path.exists(changed):
        with open(os.path.join(a.work, "images.json")) as fh:
            images = json.load(fh)
        build_s = None
    else:
        t = time.monotonic()
        images = ext4image.build_pair(a.work, a.size, a.data, a.change, seed=a.seed)
        build_s = time.monotonic() - t
    src_alloc, src_data = ext4image.allocation(changed)
    print(f"images: {human(images['base']['apparent_bytes'])} apparent, {images['base']['files']:,} files "
          f"({human(images['base']['file_bytes'])}), changed {images['change']['touched_fraction']:.1%}"
          f" of file bytes; changed image {human(src_alloc)} allocated, {human(src_data)} data extents"
          + (f"; built in {build_s:.0f} s" if build_s else ""), file=sys.stderr)
    results = []
    for text in a.block_sizes.split(","):
        bs = ext4image.parse_size(text)
        r = measure(base, changed, a.work, bs, a.repeat)
        r["source_allocated_bytes"], r["source_data_extent_bytes"] = src_alloc, src_data
        results.append(r)
        m = r["median"]
        print(f"{text}: signature {m['signature']:.1f} s, diff {m['diff']:.1f} s, apply "
              f"{m['apply']:.1f} s, patch {human(r['patch_bytes'])}", file=sys.stderr)
    with open(os.path.join(a.work, "results.json"), "w") as fh:
        json.dump({"images": images, "results": results, "repeat": a.repeat,
                   "sparsepatch": module_path()}, fh, indent=2)
    print(table(results))
    if not a.keep:
        for path in (base, changed):
            os.unlink(path)
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
