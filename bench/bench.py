#!/usr/bin/env python3
"""Benchmark sparsepatch against rdiff, rsync (batch mode), xdelta3 and the hardware floor.

Workloads (bench/workloads.py; sizes are options, the ones used are printed):
  1 ext4       a real ext4 image (mkfs.ext4 -d of files from /usr) changed with debugfs (~5%)
  2 scattered  a large sparse file with data in scattered extents; 1% of the extents rewritten,
               some punched, some moved to other aligned offsets
  3 holes      a huge sparse file with a little data, against a dense file of the same data
               (signature only: holes must cost nothing)
  4 dense      a file with no holes, 1% rewritten
  5 osimage    Debian in a 16 GiB sparse ext4 image (bench/osimage.py, debootstrap), changed by
               apt-get inside it: install (os-install) and upgrade (os-upgrade), two rows
  6 rebuilt    the same files copied into a freshly made ext4 (os-rebuilt)
  7 moved      a dense file whose 4 KiB pages are swapped, rotated in 3-cycles and shifted by
               one page, over each other, plus a little new data
  8 memory     a fully allocated 8 GiB file, 1% rewritten: peak memory and speed at that size

Workloads 5-7 are format v2's: each reports R (zstd -3 of the target's 16 KiB blocks that
differ from the base at the same offset: what an aligned block patch has to send), xdelta3's
patch and sparsepatch's, and v2's targets as this version meets them. The OS images take
minutes and the network to build (root, loop devices, debootstrap); they are cached in
--os-dir and reused, and skipped, with the reason, when they can be neither found nor built.
On them xdelta3 only encodes (decoding writes 16 GiB) and is killed after --peer-timeout;
rdiff and rsync are not run. Workload 8 needs twice its size free on disk.

Every step runs as its own process, started from a small launcher that reports the wall
time, CPU time (user + sys, its worker process included) and peak RSS (os.wait4).
sparsepatch forks a worker process; a further run of each sparsepatch step samples the sum
of Pss over both every 5 ms, and the larger of that and the peak RSS is reported. The floor reads
only the data extents (SEEK_DATA/SEEK_HOLE) into a reused 4 MiB buffer with os.preadv and
hashes every block with BLAKE3, in one thread, in a plain Python loop: the least a
signature (of the base) or a diff (of the target) can do. Files are read once before the
warm measurements; the cold rows drop the page cache before each run (needs root).

One block size is used throughout: `sparsepatch signature -b`, the floor's blocks and the
comparison that finds the changed blocks ("zstd-3 of changed"). It is sparsepatch's default
(sparsepatch.api.DEFAULT_BLOCK_SIZE) unless --block-size gives another. The workloads' extents
stay 64 KiB-aligned whatever the block size.

    python bench/bench.py                 # scaled-down sizes, 6-10 minutes on 2 cores
    python bench/bench.py --quick         # small sizes and no OS images, a few minutes
    python bench/bench.py --full          # 32G/2G, 64G/4G, 1T/64M, 4G: the peers take hours
    python bench/bench.py --only 5,6,7,8 --os-dir /var/tmp/osimg   # format v2's workloads
    python bench/bench.py --only 2,3 --dir /var/tmp/b --json results.json
    python bench/bench.py --block-size 64K
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import osimage  # noqa: E402
import workloads as wl  # noqa: E402
from ext4image import parse_size  # noqa: E402

KiB, MiB, GiB = wl.KiB, wl.MiB, wl.GiB
SPARSEPATCH = [sys.executable, "-m", "sparsepatch"]
PEERS = ("rdiff", "rsync", "xdelta3")
NO_ROOM = "not run: no disk space for a dense result"
NAMES = {1: "ext4", 2: "scattered", 3: "holes", 4: "dense", 5: "osimage", 6: "rebuilt", 7: "moved",
         8: "memory"}
DENSE = (4, 7, 8)  # workloads whose data is their size
SIZELESS = (5, 6)  # the OS images: their size is osimage.py's
OS_CACHE = "/var/tmp/sparsepatch-osimg"
R_BLOCK = 16 * KiB  # the aligned block patch the format v2 targets compare with

# (apparent size, data) per workload
FULL = {1: ("32G", "2G"), 2: ("64G", "4G"), 3: ("1T", "64M"), 4: ("4G", "4G"), 7: ("1G", "1G"),
        8: ("8G", "8G")}
DEFAULT = {1: ("4G", "1G"), 2: ("8G", "512M"), 3: ("1T", "64M"), 4: ("1G", "1G"), 7: ("256M", "256M"),
           8: ("8G", "8G")}
QUICK = {1: ("512M", "96M"), 2: ("512M", "32M"), 3: ("1T", "16M"), 4: ("64M", "64M"), 7: ("64M", "64M"),
         8: ("1G", "1G")}

# The launcher: a fresh small interpreter forks and execs the command, so that the peak RSS
# the kernel reports is that of the command (a child inherits its parent's peak at exec).
_LAUNCHER = r"""
import os, sys, time
sample = sys.argv[1] == "--pss"
limit = float(sys.argv[2])
argv = sys.argv[3:]


def tree_pss(root):
    # Sum of Pss over the process and its descendants: a forked worker's pages that are
    # still shared with its parent count once, its own pages count in full.
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except (OSError, ValueError):
            pass
    return total


t = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
peak = 0
timed_out = 0
if sample or limit:
    while True:
        got, status, ru = os.wait4(pid, os.WNOHANG)
        if got:
            break
        if sample:
            peak = max(peak, tree_pss(pid))
        if limit and time.monotonic() - t > limit:
            timed_out = 1
            os.kill(pid, 9)
            _, status, ru = os.wait4(pid, 0)
            break
        time.sleep(0.005 if sample else 0.05)
else:
    _, status, ru = os.wait4(pid, 0)
print(time.monotonic() - t, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024,
      os.waitstatus_to_exitcode(status), peak, timed_out)
"""


@dataclass
class Run:
    wall: float = 0.0
    cpu: float = 0.0
    rss: int = 0
    ok: bool = True
    error: str = ""


@dataclass
class Step:
    workload: str
    tool: str
    step: str
    wall: float
    cpu: float
    rss: int
    ok: bool = True
    error: str = ""
    walls: list[float] = field(default_factory=list)
    sig_bytes: int | None = None
    patch_bytes: int | None = None
    identical: bool | None = None
    alloc_ratio: float | None = None  # result's allocated bytes / source's


def run(cmd: Sequence[str], pss: bool = False, timeout: float = 0) -> Run:
    """One run through the launcher. pss=True also samples, every 5 ms, the sum of Pss
    over the process and its children (sparsepatch forks a worker): a run for memory
    only, as the sampling takes CPU time from the run it measures. timeout (seconds, 0 for
    none): the launcher kills the command when it runs longer."""
    r = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, "--pss" if pss else "-",
                        str(timeout), *cmd], capture_output=True, text=True)
    try:
        wall, cpu, rss, code, peak, timed_out = r.stdout.split()
    except ValueError:
        return Run(ok=False, error=f"launcher failed: {r.stderr.strip()[-300:]}")
    if int(timed_out):
        return Run(float(wall), float(cpu), int(rss), False,
                   f"not run to the end: killed after {timeout:.0f} s (--peer-timeout)")
    err = r.stderr.strip().splitlines()
    return Run(float(wall), float(cpu), max(int(rss), int(peak)), int(code) == 0,
               "" if int(code) == 0 else f"exit {code}: {(err or [''])[-1][:200]}")


def best_step(workload: str, tool: str, step: str, runs: list[Run]) -> Step:
    """The fastest run (its wall and CPU time) and the highest peak RSS of all. Other work
    on the machine only ever adds time, so the fastest run is the best estimate of a
    program's own cost; sparsepatch and the floor are treated alike."""
    good = [r for r in runs if r.ok]
    if len(good) < len(runs):
        bad = next(r for r in runs if not r.ok)
        return Step(workload, tool, step, 0, 0, 0, False, bad.error)
    if not good:
        return Step(workload, tool, step, 0, 0, 0, False, "not run")
    best = min(good, key=lambda r: r.wall)
    return Step(workload, tool, step, best.wall, best.cpu, max(r.rss for r in runs), True, "",
                [r.wall for r in good])


FLOOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.py")


def floor_cmd(path: str, bs: int) -> list[str]:
    """The floor runs as its own small script (bench/floor.py), so that its process starts
    like a minimal Python program and not like this benchmark."""
    return [sys.executable, FLOOR, path, str(bs)]


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cold_cache_possible() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def sig_data_blocks(sig: str) -> int:
    out = subprocess.run([*SPARSEPATCH, "info", "--json", sig], check=True, capture_output=True)
    return int(json.loads(out.stdout)["data_blocks"])


def kib(n: int) -> str:
    return f"{n // KiB} KiB"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------- measuring a pair

class Bench:
    def __init__(self, root: str, repeat: int, peers: dict[str, bool], block_size: int,
                 peer_timeout: float = 0):
        self.root = root
        self.peer_timeout = peer_timeout
        self.bs = block_size
        self.repeat = repeat
        self.peers = peers
        self.steps: list[Step] = []
        self.info: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        if not step.ok:
            log(f"  {step.workload} {step.tool} {step.step}: FAILED ({step.error})")
        else:
            log(f"  {step.workload} {step.tool} {step.step}: {step.wall:.2f} s wall, {step.cpu:.2f} s CPU, "
                f"{step.rss / MiB:.0f} MiB")
        return step

    def get(self, workload: str, tool: str, step: str) -> Step | None:
        for s in self.steps:
            if (s.workload, s.tool, s.step) == (workload, tool, step):
                return s
        return None

    def sig_cmd(self, path: str, sig: str) -> list[str]:
        return [*SPARSEPATCH, "signature", path, "-o", sig, "-b", str(self.bs), "-q"]

    def floor_cmd(self, path: str) -> list[str]:
        return floor_cmd(path, self.bs)

    def result_check(self, step: Step, result: str, source: str) -> None:
        step.identical = wl.identical(result, source)
        step.alloc_ratio = wl.allocated(result) / max(wl.allocated(source), 1)

    def sparsepatch(self, p: wl.Pair, work: str) -> None:
        w = p.name
        sig, patch, dest = (os.path.join(work, n) for n in ("base.sig", "update.patch", "dest.img"))
        runs: dict[str, list[Run]] = {k: [] for k in ("fb", "sig", "ft", "diff", "apply")}
        for _ in range(self.repeat):
            runs["fb"].append(run(self.floor_cmd(p.base)))
            runs["sig"].append(run(self.sig_cmd(p.base, sig)))
            runs["ft"].append(run(self.floor_cmd(p.target)))
            runs["diff"].append(run([*SPARSEPATCH, "diff", sig, p.target, "-o", patch, "-q"]))
            wl.sparse_copy(p.base, dest)
            os.sync()
            runs["apply"].append(run([*SPARSEPATCH, "apply", patch, dest, "-q"]))
        # One more run of each step for memory: peak RSS, or the sum of its processes' Pss.
        memory = {"sig": run(self.sig_cmd(p.base, sig), pss=True),
                  "diff": run([*SPARSEPATCH, "diff", sig, p.target, "-o", patch, "-q"], pss=True)}
        wl.sparse_copy(p.base, dest)
        os.sync()
        memory["apply"] = run([*SPARSEPATCH, "apply", patch, dest, "-q"], pss=True)
        for k, m in memory.items():
            for r in runs[k]:
                r.rss = max(r.rss, m.rss)
        self.add(best_step(w, "floor", "base", runs["fb"]))
        self.add(best_step(w, "floor", "target", runs["ft"]))
        s = self.add(best_step(w, "sparsepatch", "signature", runs["sig"]))
        ok = s.ok
        s.sig_bytes = os.path.getsize(sig) if ok else None
        d = self.add(best_step(w, "sparsepatch", "diff", runs["diff"]))
        d.patch_bytes = os.path.getsize(patch) if d.ok else None
        a = self.add(best_step(w, "sparsepatch", "apply", runs["apply"]))
        if a.ok:
            self.result_check(a, dest, p.target)
        if ok:
            self.info[w]["sig_data_blocks"] = sig_data_blocks(sig)
        if w == "scattered" and ok:
            self.no_change(p, work, sig, dest, patch)
        if w == "ext4" and ok:
            self.cold(p, sig)
        for f in (dest,):
            if os.path.exists(f):
                os.unlink(f)

    def no_change(self, p: wl.Pair, work: str, sig: str, dest: str, patch: str) -> None:
        """Apply of a patch that changes nothing (diff of the base against itself), and the
        real patch applied a second time onto the updated copy."""
        same = os.path.join(work, "nochange.patch")
        d = run([*SPARSEPATCH, "diff", sig, p.base, "-o", same, "-q"])
        if not d.ok:
            self.add(best_step(p.name, "sparsepatch", "apply no-change patch", [d]))
            return
        again = [run([*SPARSEPATCH, "apply", patch, dest, "-q"]) for _ in range(self.repeat)]
        wl.sparse_copy(p.base, dest)
        os.sync()
        runs = [run([*SPARSEPATCH, "apply", same, dest, "-q"]) for _ in range(self.repeat)]
        s = self.add(best_step(p.name, "sparsepatch", "apply no-change patch", runs))
        s.patch_bytes = os.path.getsize(same)
        self.add(best_step(p.name, "sparsepatch", "apply again (already applied)", again))
        os.unlink(same)

    def cold(self, p: wl.Pair, sig: str) -> None:
        if not cold_cache_possible():
            self.notes.append("cold cache: not measured (/proc/sys/vm/drop_caches is not writable)")
            log("  cold cache: not measured (/proc/sys/vm/drop_caches is not writable)")
            return
        cs, cf = [], []
        # Cold data, warm code: after dropping the cache, start the interpreter with each
        # program's modules once, so that the cold rows compare reading the image only.
        warm_code = [[sys.executable, "-c", "import sparsepatch.cli, blake3, zstandard"],
                     self.floor_cmd(os.devnull)]
        for _ in range(self.repeat):
            drop_caches()
            for cmd in warm_code:
                run(cmd)
            cs.append(run(self.sig_cmd(p.base, sig)))
            drop_caches()
            for cmd in warm_code:
                run(cmd)
            cf.append(run(self.floor_cmd(p.base)))
        self.add(best_step(p.name, "sparsepatch", "signature (cold)", cs))
        self.add(best_step(p.name, "floor", "base (cold)", cf))
        wl.warm(p.base)
        wl.warm(p.target)

    def room_for(self, size: int, work: str) -> bool:
        st = os.statvfs(work)
        return st.f_bavail * st.f_frsize > size + 1 * GiB

    def rdiff(self, p: wl.Pair, work: str) -> None:
        w = p.name
        sig, delta, out = (os.path.join(work, n) for n in ("rdiff.sig", "rdiff.delta", "rdiff.out"))
        s = self.add(best_step(w, "rdiff", "signature", [run(["rdiff", "signature", p.base, sig])]))
        s.sig_bytes = os.path.getsize(sig) if s.ok else None
        d = self.add(best_step(w, "rdiff", "delta", [run(["rdiff", "delta", sig, p.target, delta])]))
        d.patch_bytes = os.path.getsize(delta) if d.ok else None
        if not self.room_for(p.apparent, work):
            self.add(Step(w, "rdiff", "patch", 0, 0, 0, False, NO_ROOM))
        elif d.ok:
            a = self.add(best_step(w, "rdiff", "patch", [run(["rdiff", "patch", p.base, delta, out])]))
            if a.ok:
                self.result_check(a, out, p.target)
        for f in (sig, delta, out):
            if os.path.exists(f):
                os.unlink(f)

    def rsync(self, p: wl.Pair, work: str) -> None:
        """--only-write-batch against a sparse copy of the base (left unchanged), then
        --read-batch into that copy, in place and sparse (rsync >= 3.1.3 takes both).
        --ignore-times on both sides: base and target can have the same size and mtime
        second here, and the reading side skips such a file without it."""
        w = p.name
        batch, dest = os.path.join(work, "rsync.batch"), os.path.join(work, "rsync-dest.img")
        wl.sparse_copy(p.base, dest)
        os.sync()
        s = self.add(best_step(w, "rsync", "write batch", [run(
            ["rsync", f"--only-write-batch={batch}", "--ignore-times", "--inplace", "--no-whole-file",
             p.target, dest])]))
        s.patch_bytes = os.path.getsize(batch) if s.ok else None
        if s.ok:
            a = self.add(best_step(w, "rsync", "read batch", [run(
                ["rsync", f"--read-batch={batch}", "--ignore-times", "--inplace", "--sparse", dest])]))
            if a.ok:
                self.result_check(a, dest, p.target)
        for f in (batch, batch + ".sh", dest):
            if os.path.exists(f):
                os.unlink(f)

    def xdelta3(self, p: wl.Pair, work: str, decode: bool = True) -> None:
        w = p.name
        delta, out = os.path.join(work, "xdelta3.delta"), os.path.join(work, "xdelta3.out")
        e = self.add(best_step(w, "xdelta3", "encode", [run(
            ["xdelta3", "-e", "-f", "-s", p.base, p.target, delta], timeout=self.peer_timeout)]))
        e.patch_bytes = os.path.getsize(delta) if e.ok else None
        if not decode:
            pass
        elif not self.room_for(p.apparent, work):
            self.add(Step(w, "xdelta3", "decode", 0, 0, 0, False, NO_ROOM))
        elif e.ok:
            d = self.add(best_step(w, "xdelta3", "decode", [run(
                ["xdelta3", "-d", "-f", "-s", p.base, delta, out])]))
            if d.ok:
                self.result_check(d, out, p.target)
        for f in (delta, out):
            if os.path.exists(f):
                os.unlink(f)

    def pair(self, p: wl.Pair, work: str) -> None:
        t = time.monotonic()
        for f in (p.base, p.target):
            wl.warm(f)
        log(f"  read once to warm the cache ({time.monotonic() - t:.1f} s)")
        cd = wl.changed_data(p.base, p.target, self.bs)
        info = self.info[p.name]
        info["changed"] = asdict(cd)
        log(f"  changed {kib(self.bs)} blocks: {cd.blocks:,} ({human(cd.raw_bytes)}), "
            f"zstd -3: {human(cd.zstd_bytes)}")
        if p.name in V2_NAMES:
            r = cd if self.bs == R_BLOCK else wl.changed_data(p.base, p.target, R_BLOCK)
            info["R"] = r.zstd_bytes
            log(f"  R (zstd -3 of the changed {kib(R_BLOCK)} blocks): {human(r.zstd_bytes)}")
        if p.name.startswith("os-"):
            m = osimage.measure(p.base, p.target)
            info["allows"] = m["allows"]
            log(f"  the data allows {human(m['allows'])} ({m['novel_pages']:,} 4 KiB pages not in the base, "
                "zstd -3 --long=27)")
        for k, v in p.extra.items():
            if v.isdigit():
                info[k] = int(v)
        self.sparsepatch(p, work)
        if p.name.startswith("os-"):
            # The peers read every byte of the 16 GiB images and rdiff patch and xdelta3 -d
            # write it all out: xdelta3's patch size is what the targets compare with.
            if self.peers["xdelta3"]:
                self.xdelta3(p, work, decode=False)
            return
        for peer in PEERS:
            if self.peers[peer]:
                getattr(self, peer)(p, work)

    def memory(self, p: wl.Pair, work: str) -> None:
        """Peak memory of signature, diff and apply on a large fully allocated file, and their
        speed against the floor. Each file is read once per run and no more than twice each:
        the file is larger than what the page cache here can hold for long."""
        w = p.name
        sig, patch = os.path.join(work, "base.sig"), os.path.join(work, "update.patch")
        diff = [*SPARSEPATCH, "diff", sig, p.target, "-o", patch, "-q"]
        runs: dict[str, list[Run]] = {k: [] for k in ("fb", "sig", "ft", "diff")}
        for _ in range(min(self.repeat, 2)):
            runs["fb"].append(run(self.floor_cmd(p.base)))
            runs["sig"].append(run(self.sig_cmd(p.base, sig)))
            runs["ft"].append(run(self.floor_cmd(p.target)))
            runs["diff"].append(run(diff))
        runs["sig"].append(run(self.sig_cmd(p.base, sig), pss=True))
        runs["diff"].append(run(diff, pss=True))
        self.add(best_step(w, "floor", "base", runs["fb"]))
        self.add(best_step(w, "floor", "target", runs["ft"]))
        # The Pss runs count for memory only: their sampling takes CPU time from the run.
        for k, step in (("sig", "signature"), ("diff", "diff")):
            s = best_step(w, "sparsepatch", step, runs[k][:-1])
            s.rss = max(s.rss, runs[k][-1].rss)
            if not runs[k][-1].ok:
                s = best_step(w, "sparsepatch", step, runs[k][-1:])
            self.add(s)
        s, d = self.get(w, "sparsepatch", "signature"), self.get(w, "sparsepatch", "diff")
        if s and s.ok:
            s.sig_bytes = os.path.getsize(sig)
            self.info[w]["sig_data_blocks"] = sig_data_blocks(sig)
        if d and d.ok:
            d.patch_bytes = os.path.getsize(patch)
            # Once, onto the base itself (a copy would need another file of this size).
            a = self.add(best_step(w, "sparsepatch", "apply",
                                   [run([*SPARSEPATCH, "apply", patch, p.base, "-q"], pss=True)]))
            if a.ok:
                self.result_check(a, p.base, p.target)

    def holes(self, p: wl.Pair) -> None:
        dense = p.extra["dense"]
        for f in (p.base, dense):
            wl.warm(f)
        runs: dict[str, list[Run]] = {k: [] for k in ("fs", "ss", "fd", "sd")}
        sig_s, sig_d = p.base + ".sig", dense + ".sig"
        for _ in range(self.repeat):
            runs["fs"].append(run(self.floor_cmd(p.base)))
            runs["ss"].append(run(self.sig_cmd(p.base, sig_s)))
            runs["fd"].append(run(self.floor_cmd(dense)))
            runs["sd"].append(run(self.sig_cmd(dense, sig_d)))
        for k, path, out in (("ss", p.base, sig_s), ("sd", dense, sig_d)):
            m = run(self.sig_cmd(path, out), pss=True)
            for r in runs[k]:
                r.rss = max(r.rss, m.rss)
        self.add(best_step("holes", "floor", "base", runs["fs"]))
        s = self.add(best_step("holes", "sparsepatch", "signature", runs["ss"]))
        self.add(best_step("holes-dense", "floor", "base", runs["fd"]))
        d = self.add(best_step("holes-dense", "sparsepatch", "signature", runs["sd"]))
        if s.ok:
            s.sig_bytes = os.path.getsize(sig_s)
            self.info["holes"]["sig_data_blocks"] = sig_data_blocks(sig_s)
        if d.ok:
            d.sig_bytes = os.path.getsize(sig_d)
            self.info["holes-dense"] = {"sig_data_blocks": sig_data_blocks(sig_d), "apparent": p.data,
                                        "data": p.data}


# ---------------------------------------------------------------- reporting

def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


OLD_ORDER = ["ext4", "scattered", "holes", "holes-dense", "dense"]
V2_NAMES = ["os-install", "os-upgrade", "os-rebuilt", "moved"]
ORDER = [*OLD_ORDER, *V2_NAMES, "memory"]


def steps_table(b: Bench) -> str:
    head = (f"| workload | tool | step ({kib(b.bs)} blocks) | wall s | CPU s | peak RSS | signature "
            "| patch | identical | allocated vs source |")
    rows = [head, "|---|---|---|--:|--:|--:|--:|--:|---|--:|"]
    for s in sorted(b.steps, key=lambda s: ORDER.index(s.workload)):
        if not s.ok:
            rows.append(f"| {s.workload} | {s.tool} | {s.step} | {s.error} | | | | | | |")
            continue
        same = {None: "", True: "yes", False: "**NO**"}[s.identical]
        rows.append(
            f"| {s.workload} | {s.tool} | {s.step} | {s.wall:.2f} | {s.cpu:.2f} | {s.rss / MiB:.0f} MiB "
            f"| {human(s.sig_bytes) if s.sig_bytes is not None else ''} "
            f"| {human(s.patch_bytes) if s.patch_bytes is not None else ''} | {same} "
            f"| {fmt(s.alloc_ratio, '.2f', 'x') if s.alloc_ratio is not None else ''} |")
    return "\n".join(rows)


def wall(b: Bench, w: str, tool: str, step: str) -> float | None:
    s = b.get(w, tool, step)
    return s.wall if s and s.ok else None


def patch_bytes(b: Bench, w: str) -> dict[str, int | None]:
    def pb(tool: str, step: str) -> int | None:
        s = b.get(w, tool, step)
        return s.patch_bytes if s and s.ok else None
    return {"sparsepatch": pb("sparsepatch", "diff"), "rdiff": pb("rdiff", "delta"),
            "rsync": pb("rsync", "write batch"), "xdelta3": pb("xdelta3", "encode")}


def totals(b: Bench, w: str) -> dict[str, float | None]:
    def tot(*parts: tuple[str, str]) -> float | None:
        ws = [wall(b, w, t, s) for t, s in parts]
        return None if any(x is None for x in ws) else sum(x for x in ws if x is not None)
    sp = "sparsepatch"
    return {sp: tot((sp, "signature"), (sp, "diff"), (sp, "apply")),
            "rdiff": tot(("rdiff", "signature"), ("rdiff", "delta"), ("rdiff", "patch")),
            "rsync": tot(("rsync", "write batch"), ("rsync", "read batch")),
            "xdelta3": tot(("xdelta3", "encode"), ("xdelta3", "decode"))}


def rss_limit(b: Bench, w: str) -> int | None:
    n = b.info.get(w, {}).get("sig_data_blocks")
    return None if n is None else 64 * MiB + 40 * n


def peak_sp(b: Bench, w: str) -> int | None:
    r = [s.rss for s in b.steps if s.workload == w and s.tool == "sparsepatch" and s.ok]
    return max(r) if r else None


def both(b: Bench, w: str, step: str, floor_step: str) -> str:
    """sparsepatch step ÷ floor: wall time (CPU time)."""
    s, f = b.get(w, "sparsepatch", step), b.get(w, "floor", floor_step)
    if not (s and f and s.ok and f.ok):
        return "–"
    return f"{fmt(ratio(s.wall, f.wall), '.2f', 'x')} ({fmt(ratio(s.cpu, f.cpu), '.2f', 'x')})"


def ratio_table(b: Bench) -> str:
    head = ("| workload | signature ÷ floor | diff ÷ floor | apply ÷ floor | sig+diff+apply | ÷ rdiff "
            "| ÷ rsync | ÷ xdelta3 | patch | patch ÷ rdiff | ÷ rsync | ÷ xdelta3 "
            f"| patch ÷ zstd-3 of changed {kib(b.bs)} blocks "
            "| patch ÷ (zstd-3 + 1 MiB) | peak RSS ÷ (64 MiB + 40 B/block) |")
    rows = [head, "|---" + "|--:" * (head.count("|") - 2) + "|"]
    for w in ORDER:
        if w not in b.info:
            continue
        tt, pb = totals(b, w), patch_bytes(b, w)
        z = b.info[w].get("changed", {}).get("zstd_bytes")
        sp = pb["sparsepatch"]
        peak, lim = peak_sp(b, w), rss_limit(b, w)
        rows.append(
            f"| {w} | {both(b, w, 'signature', 'base')} | {both(b, w, 'diff', 'target')} "
            f"| {both(b, w, 'apply', 'target')} "
            f"| {fmt(tt['sparsepatch'], '.2f', ' s')} "
            + "".join(f"| {fmt(ratio(tt['sparsepatch'], tt[p]), '.3f')} " for p in PEERS)
            + f"| {human(sp) if sp is not None else '–'} "
            + "".join(f"| {fmt(ratio(sp, pb[p]), '.3f')} " for p in PEERS)
            + f"| {fmt(ratio(sp, z), '.2f')} | {fmt(ratio(sp, None if z is None else z + MiB), '.2f')} "
            f"| {human(peak) if peak else '–'} ÷ {human(lim) if lim else '–'} "
            f"= {fmt(ratio(peak, lim), '.2f')} |")
    if wall(b, "ext4", "sparsepatch", "signature (cold)") is not None:
        rows.append(f"| ext4, cold cache | {both(b, 'ext4', 'signature (cold)', 'base (cold)')} |"
                    + " – |" * 14)
    return "\n".join(rows)


def targets(b: Bench) -> list[tuple[bool | None, str]]:
    out: list[tuple[bool | None, str]] = []

    def check(ok: bool | None, text: str) -> None:
        out.append((ok, text))

    def le(a: float | None, lim: float | None) -> bool | None:
        return None if a is None or lim is None else a <= lim

    for w in OLD_ORDER:
        if w not in b.info:
            continue
        r = ratio(wall(b, w, "sparsepatch", "signature"), wall(b, w, "floor", "base"))
        check(le(r, 1.0), f"{w}: signature <= 1.0x floor: {fmt(r, '.2f', 'x')}")
    for w in ("ext4", "scattered", "dense"):
        if w in b.info:
            r = ratio(wall(b, w, "sparsepatch", "diff"), wall(b, w, "floor", "target"))
            check(le(r, 1.3), f"{w}: diff <= 1.3x floor: {fmt(r, '.2f', 'x')}")
    if "scattered" in b.info:
        t = wall(b, "scattered", "sparsepatch", "apply no-change patch")
        check(None if t is None else t < 1.0, f"scattered: no-change apply < 1 s: {fmt(t, '.2f', ' s')}")
    if "holes" in b.info:
        r = ratio(wall(b, "holes", "sparsepatch", "signature"),
                  wall(b, "holes-dense", "sparsepatch", "signature"))
        check(le(r, 2.0), f"holes: signature <= 2x the dense file's: {fmt(r, '.2f', 'x')}")
    if "ext4" in b.info:
        pb = patch_bytes(b, "ext4")
        r = ratio(pb["sparsepatch"], pb["xdelta3"])
        check(le(r, 1.0), f"ext4: patch <= xdelta3's: {fmt(r, '.3f', 'x')}")
        for p in ("rdiff", "rsync"):
            r = ratio(pb["sparsepatch"], pb[p])
            check(le(r, 0.5), f"ext4: patch <= 0.5x {p}'s: {fmt(r, '.3f', 'x')}")
    for w in ("ext4", "scattered", "dense"):
        if w in b.info:
            sp = patch_bytes(b, w)["sparsepatch"]
            z = b.info[w]["changed"]["zstd_bytes"]
            lim = 1.05 * z + MiB
            check(le(sp, lim), f"{w}: patch <= 1.05x zstd-3 of changed data + 1 MiB: "
                               f"{human(sp) if sp is not None else '–'} vs {human(lim)}")
    for w in ("ext4", "scattered"):
        if w in b.info:
            tt = totals(b, w)
            for p in ("rdiff", "rsync"):
                r = ratio(tt[p], tt["sparsepatch"])
                check(None if r is None else r >= 20, f"{w}: sig+diff+apply >= 20x faster than {p}: "
                                                       f"{fmt(r, '.1f', 'x')}")
    for w in OLD_ORDER:
        if w not in b.info:
            continue
        peak, lim = peak_sp(b, w), rss_limit(b, w)
        check(le(peak, 150 * MiB), f"{w}: peak RSS <= 150 MiB: {human(peak) if peak else '–'}")
        check(le(peak, lim), f"{w}: peak RSS <= 64 MiB + 40 B/signature block: "
                             f"{human(peak) if peak else '–'} vs {human(lim) if lim else '–'}")
    cs, cf = wall(b, "ext4", "sparsepatch", "signature (cold)"), wall(b, "ext4", "floor", "base (cold)")
    if "ext4" in b.info:
        if cs is None:
            check(None, "ext4: cold signature within 10% of the cold floor: not measured")
        else:
            r = ratio(cs, cf)
            check(le(r, 1.1), f"ext4: cold signature within 10% of the cold floor: {fmt(r, '.2f', 'x')}")
    return out


# ---------------------------------------------------------------- format v2's targets

MEMORY_MIN = 8 * GiB  # the memory targets are stated for a fully allocated file this large


def v2_limit(b: Bench, w: str) -> tuple[float | None, str]:
    """The patch size format v2 must reach on w, and how it is stated."""
    i = b.info.get(w, {})
    r = i.get("R")
    if w == "os-rebuilt":
        return (None if r is None else 0.45 * r), "0.45 R"
    if w == "os-install":
        return (None if r is None else 0.85 * r), "0.85 R"
    if w == "os-upgrade":
        return (None if r is None else 0.68 * r), "0.68 R"
    if w == "moved" and "moved_zstd" in i:
        return 0.10 * i["moved_zstd"] + i["new_zstd"], "10% of moved zstd-3 + new data's zstd-3"
    return None, ""


def v2_table(b: Bench) -> str:
    head = (f"| workload | R = zstd-3 of changed {kib(R_BLOCK)} blocks | the data allows | xdelta3 patch "
            "| patch | patch ÷ R | patch ÷ xdelta3 | v2 target | patch ÷ target |")
    rows = [head, "|---" + "|--:" * 6 + "|---|--:|"]
    for w in V2_NAMES:
        if w not in b.info:
            continue
        i, pb = b.info[w], patch_bytes(b, w)
        sp, xd, r = pb["sparsepatch"], pb["xdelta3"], i.get("R")
        x = b.get(w, "xdelta3", "encode")
        xs = human(xd) if xd is not None else ("not run" if x is None else x.error.split(":")[0]
                                                 if "killed" not in x.error else "killed (timeout)")
        lim, how = v2_limit(b, w)
        allows = i.get("allows")
        if w == "moved":
            allows = i["new_zstd"]
        rows.append(f"| {w} | {human(r) if r is not None else '–'} "
                    f"| {human(allows) if allows is not None else '–'} | {xs} "
                    f"| {human(sp) if sp is not None else '–'} | {fmt(ratio(sp, r), '.2f')} "
                    f"| {fmt(ratio(sp, xd), '.2f')} | {how} = {human(lim) if lim else '–'} "
                    f"| {fmt(ratio(sp, lim), '.2f')} |")
    return "\n".join(rows)


def v2_targets(b: Bench) -> list[tuple[bool | None, str]]:
    out: list[tuple[bool | None, str]] = []

    def check(ok: bool | None, text: str) -> None:
        out.append((ok, text))

    def le(a: float | None, lim: float | None) -> bool | None:
        return None if a is None or lim is None else a <= lim

    def hm(n: float | None) -> str:
        return "–" if n is None else human(n)

    for w in V2_NAMES:
        if w not in b.info:
            continue
        sp = patch_bytes(b, w)["sparsepatch"]
        lim, how = v2_limit(b, w)
        check(le(sp, lim), f"{w}: patch <= {how}: {hm(sp)} vs {hm(lim)} ({fmt(ratio(sp, lim), '.2f', 'x')})")
        if w == "os-rebuilt":
            xd = patch_bytes(b, w)["xdelta3"]
            x = b.get(w, "xdelta3", "encode")
            why = f" (xdelta3 {x.error})" if x and not x.ok else ""
            check(le(sp, None if xd is None else 0.5 * xd),
                  f"{w}: patch <= 0.5x xdelta3's: {fmt(ratio(sp, xd), '.2f', 'x')}{why}")
    if "memory" in b.info:
        i = b.info["memory"]
        big = i["apparent"] >= MEMORY_MIN and i["base_allocated"] >= i["apparent"]
        why = "" if big else f" (N/A: {human(i['apparent'])} is below the {human(MEMORY_MIN)} stated)"
        n = i.get("sig_data_blocks")
        diff_lim = None if n is None else 64 * MiB + 16 * n
        for step, lim, how in (("signature", 64 * MiB, "64 MiB"),
                               ("diff", diff_lim, "64 MiB + 16 B/signature block"),
                               ("apply", 256 * MiB, "256 MiB")):
            st = b.get("memory", "sparsepatch", step)
            peak = st.rss if st and st.ok else None
            check(le(peak, lim) if big else None,
                  f"memory: {step} peak (Pss of its processes) <= {how}: {hm(peak)} vs {hm(lim)}{why}")
    for w in [*V2_NAMES, "memory"]:
        if w not in b.info:
            continue
        r = ratio(wall(b, w, "sparsepatch", "signature"), wall(b, w, "floor", "base"))
        check(le(r, 1.0), f"{w}: signature <= 1.0x floor: {fmt(r, '.2f', 'x')}")
        r = ratio(wall(b, w, "sparsepatch", "diff"), wall(b, w, "floor", "target"))
        check(le(r, 1.3), f"{w}: diff <= 1.3x floor: {fmt(r, '.2f', 'x')}")
    return out


# ---------------------------------------------------------------- main

class Skip(Exception):
    """A workload that cannot run here, and why."""

def os_pairs(n: int, cache: str) -> list[wl.Pair]:
    names = ("install", "upgrade") if n == 5 else ("rebuilt",)
    paths = {k: os.path.join(cache, f"{k}.img") for k in ("base", *names)}
    if not all(os.path.exists(x) for x in paths.values()):
        why = osimage.missing_tools()
        if why:
            raise Skip(f"the OS images are not in {cache} and cannot be built here: {why}")
        log(f"  building the OS images in {cache} (minutes; needs the network)")
        try:
            osimage.ensure(cache, names=names)
        except subprocess.CalledProcessError as e:
            raise Skip(f"building the OS images failed: {e}") from e
    pairs = []
    for k in names:
        note = {"install": f"base + apt-get install --no-install-recommends {' '.join(osimage.INSTALL)}",
                "upgrade": f"base + apt-get upgrade from {osimage.SUITE}-security",
                "rebuilt": "the base's files copied (cp -a) into a freshly made ext4"}[k]
        pairs.append(wl.Pair(f"os-{k}", paths["base"], paths[k], os.path.getsize(paths[k]),
                             wl.allocated(paths[k]),
                             [f"Debian {osimage.SUITE} minbase (debootstrap) in a sparse ext4 image; {note}; "
                              f"cached in {cache}"]))
    return pairs


def build(n: int, sizes: tuple[int, int], work: str, os_cache: str) -> list[wl.Pair]:
    apparent, data = sizes
    if n == 1:
        return [wl.ext4_pair(work, apparent, data)]
    if n == 2:
        return [wl.scattered_pair(work, apparent, data)]
    if n == 3:
        return [wl.holes_pair(work, apparent, data)]
    if n in SIZELESS:
        return os_pairs(n, os_cache)
    if n == 7:
        return [wl.moved_pair(work, apparent)]
    if n == 8:
        st = os.statvfs(work)
        free = st.f_bavail * st.f_frsize
        if free < 2 * apparent + 2 * GiB:
            raise Skip(f"needs {human(2 * apparent + 2 * GiB)} free in {work}, {human(free)} is")
        return [wl.memory_pair(work, apparent)]
    return [wl.dense_pair(work, apparent)]


def parse_only(text: str) -> list[int]:
    out = sorted({int(x) for x in text.split(",") if x.strip()})
    if not out or any(n not in NAMES for n in out):
        raise argparse.ArgumentTypeError(f"--only takes workload numbers 1-{len(NAMES)}, e.g. 2 or 1,3")
    return out


def merge(paths: list[str]) -> int:
    """The tables of several --json files, as one run."""
    sizes = set()
    b = Bench("", 0, {}, 0)
    for path in paths:
        with open(path) as fh:
            d = json.load(fh)
        sizes.add(d["block_size"])
        b.bs = d["block_size"]
        b.info.update(d["info"])
        b.steps += [Step(**s) for s in d["steps"]]
    if len(sizes) > 1:
        log(f"--merge: the runs used different block sizes ({sorted(sizes)}): not comparable")
        return 2
    for w in ORDER:
        if w in b.info and "notes" in b.info[w]:
            i = b.info[w]
            print(f"- {w}: {human(i['apparent'])} apparent, {human(i['data'])} data "
                  f"(base allocates {human(i['base_allocated'])}); " + "; ".join(i["notes"]))
    print()
    print(steps_table(b) + "\n")
    print(ratio_table(b) + "\n")
    for ok, text in targets(b):
        print(f"{'PASS' if ok else 'FAIL' if ok is False else 'N/A '} {text}")
    if any(w in b.info for w in V2_NAMES):
        print("\n" + v2_table(b) + "\n")
    for ok, text in v2_targets(b):
        print(f"{'PASS' if ok else 'FAIL' if ok is False else 'N/A '} {text}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about a minute")
    p.add_argument("--full", action="store_true",
                   help="the full sizes (32G/2G, 64G/4G, 1T/64M, 4G): peers take very long")
    p.add_argument("--only", type=parse_only,
                   help="workloads to run, e.g. 2 or 1,3 (default: all; with --quick all but 5 and 6)")
    p.add_argument("--os-dir", default=OS_CACHE,
                   help=f"where the OS images of workloads 5 and 6 are cached (default {OS_CACHE})")
    p.add_argument("--peer-timeout", type=float, default=900,
                   help="seconds a peer may take on workloads 5 and 6 before it is killed (default 900)")
    p.add_argument("--dir", help="where the files go (default: a new directory under /var/tmp)")
    p.add_argument("--repeat", type=int,
                   help="runs of every sparsepatch and floor step, fastest reported (5; 3 with --quick)")
    p.add_argument("--no-peers", action="store_true", help="measure sparsepatch and the floor only")
    p.add_argument("--keep", action="store_true", help="keep the files")
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="measure nothing: print the tables and targets of runs saved with --json, as one "
                        "(e.g. workloads run in separate processes)")
    for n, name in NAMES.items():
        if n in SIZELESS:
            continue
        p.add_argument(f"--size{n}", type=parse_size, help=f"apparent size of workload {n} ({name})")
        if n not in DENSE:
            p.add_argument(f"--data{n}", type=parse_size, help=f"data in workload {n} ({name})")
    p.add_argument("--block-size", type=parse_size,
                   help="block size of the signatures, the floor and the changed-data comparison "
                        "(default: sparsepatch's default block size)")
    a = p.parse_args(argv)
    if a.merge:
        return merge(a.merge)
    try:
        import sparsepatch
        from sparsepatch.api import DEFAULT_BLOCK_SIZE
    except ImportError:
        p.error(f"sparsepatch is not importable by {sys.executable}: run from its virtual environment")
    # Measure sparsepatch as installed: pip writes the bytecode at install time, but an
    # editable install under PYTHONDONTWRITEBYTECODE would compile every module on every run.
    compileall.compile_dir(os.path.dirname(sparsepatch.__file__), quiet=1)
    bs = a.block_size or DEFAULT_BLOCK_SIZE
    if bs & (bs - 1) or not 4 * KiB <= bs <= wl.CHUNK:
        p.error(f"--block-size {bs}: must be a power of two from 4 KiB to {human(wl.CHUNK)}")

    preset = FULL if a.full else QUICK if a.quick else DEFAULT
    if a.only is None:
        a.only = [n for n in NAMES if not (a.quick and n in SIZELESS)]
    sizes = {}
    for n in a.only:
        if n in SIZELESS:
            sizes[n] = (0, 0)
            continue
        ap, da = (parse_size(x) for x in preset[n])
        ap = getattr(a, f"size{n}") or ap
        da = ap if n in DENSE else (getattr(a, f"data{n}") or da)
        sizes[n] = (ap, da)

    peers = {}
    for peer in PEERS:
        peers[peer] = not a.no_peers and shutil.which(peer) is not None
        if not a.no_peers and not peers[peer]:
            log(f"{peer}: not installed, skipped (apt-get install {peer})")
    root = a.dir or tempfile.mkdtemp(prefix="sparsepatch-bench-", dir="/var/tmp")
    os.makedirs(root, exist_ok=True)
    a.repeat = a.repeat or (3 if a.quick else 5)
    bench = Bench(root, a.repeat, peers, bs, a.peer_timeout)
    t0 = time.monotonic()
    base_rss = run(["true"]).rss
    load0 = os.getloadavg()
    log(f"files in {root}; block size {kib(bs)}; {os.cpu_count()} CPUs, load average {load0[0]:.1f}; "
        f"peak RSS of an empty command through the launcher: {human(base_rss)}")
    try:
        for n in a.only:
            name = NAMES[n]
            work = os.path.join(root, name)
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            ap, da = sizes[n]
            log(f"workload {n} ({name}): " + ("the cached OS images" if n in SIZELESS else
                                                f"{human(ap)} apparent, {human(da)} data") + ": building")
            t = time.monotonic()
            try:
                pairs = build(n, sizes[n], work, a.os_dir)
            except Skip as e:
                bench.notes.append(f"workload {n} ({name}): skipped: {e}")
                log(f"  skipped: {e}")
                continue
            os.sync()
            built = round(time.monotonic() - t, 1)
            for pair in pairs:
                info: dict[str, Any] = {
                    "apparent": pair.apparent, "data": pair.data, "notes": pair.notes,
                    "base_allocated": wl.allocated(pair.base), "target_allocated": wl.allocated(pair.target),
                    "build_s": built}
                bench.info[pair.name] = info
                log(f"  {pair.name}: built in {info['build_s']} s; " + "; ".join(pair.notes))
                if n == 3:
                    bench.holes(pair)
                elif n == 8:
                    bench.memory(pair, work)
                else:
                    bench.pair(pair, work)
            if not a.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not a.keep and not a.dir:
            shutil.rmtree(root, ignore_errors=True)
        elif not a.keep:
            for n in a.only:
                shutil.rmtree(os.path.join(root, NAMES[n]), ignore_errors=True)
    elapsed = time.monotonic() - t0
    load1 = os.getloadavg()

    print(f"Block size: {kib(bs)} (`sparsepatch signature -b {bs}`, the floor's BLAKE3 blocks and the "
          f"changed-data comparison); workload extents are {kib(wl.BLOCK)}-aligned.\n")
    print("Sizes used:")
    for w in ORDER:
        if w not in bench.info or w == "holes-dense":
            continue
        i = bench.info[w]
        n = next(k for k, v in NAMES.items() if v == w or (k == 5 and w in ("os-install", "os-upgrade"))
                 or (k == 6 and w == "os-rebuilt"))
        print(f"- {n} {w}: {human(i['apparent'])} apparent, {human(i['data'])} data "
              f"(base allocates {human(i['base_allocated'])}); " + "; ".join(i["notes"]))
    print(f"\nEvery sparsepatch and floor step run {a.repeat} times, interleaved (the fastest run is shown, "
          f"with the highest peak RSS of all runs); peers once (they take seconds to minutes). "
          f"Peak RSS of an empty command through the launcher: {human(base_rss)}. Load average "
          f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end; {elapsed / 60:.1f} minutes in all.")
    for line in bench.notes:
        print(f"\n{line}")
    print("\n" + steps_table(bench) + "\n")
    print("Ratios. ÷ floor: wall time (CPU time in brackets); the floor is of the base for signature, of "
          "the target for diff and apply. sig+diff+apply ÷ peer: sparsepatch's three wall times over the "
          "peer's (rdiff signature+delta+patch, rsync write+read batch, xdelta3 encode+decode); patch ÷ "
          "peer: patch bytes over the peer's delta or batch bytes.\n")
    print(ratio_table(bench) + "\n")
    results = targets(bench)
    for ok, text in results:
        print(f"{'PASS' if ok else 'FAIL' if ok is False else 'N/A '} {text}")
    v2 = v2_targets(bench)
    if any(w in bench.info for w in [*V2_NAMES, "memory"]):
        print(f"\nFormat v2's workloads. R: zstd -3, in one stream, of the target's {kib(R_BLOCK)} blocks "
              "that differ from the base at the same offset (what an aligned block patch has to send). "
              "The data allows: the target's 4 KiB pages found nowhere in the base, as one "
              "zstd -3 --long=27 stream (for moved: the new data's zstd -3).\n")
        if any(w in bench.info for w in V2_NAMES):
            print(v2_table(bench) + "\n")
        print("Format v2's targets, as this version meets them:")
        for ok, text in v2:
            print(f"{'PASS' if ok else 'FAIL' if ok is False else 'N/A '} {text}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"info": bench.info, "steps": [asdict(s) for s in bench.steps],
                       "targets": [{"pass": ok, "text": t} for ok, t in results],
                       "v2_targets": [{"pass": ok, "text": t} for ok, t in v2],
                       "block_size": bs, "repeat": a.repeat, "launcher_rss": base_rss,
                       "seconds": elapsed}, fh, indent=2)
    bad = [s for s in bench.steps if not s.ok and not s.error.startswith("not run")]
    wrong = [s for s in bench.steps if s.identical is False]
    return 1 if bad or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
