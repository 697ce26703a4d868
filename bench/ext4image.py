#!/usr/bin/env python3
"""Build a realistic pair of ext4 images for measuring sparsepatch: a sparse base image
holding real files copied from this system, and a changed copy of it, as a VM disk looks
after a package upgrade (files removed, files replaced by new versions, new files added).

Everything is deterministic for a given seed and system: file lists are sorted before a
seeded shuffle, and the change is drawn from the same generator. The file systems are
built with e2fsprogs alone (mkfs.ext4 -d and debugfs -w), so no mount or root is needed
beyond read access to the source files.

    python bench/ext4image.py --size 4G --data 512M --change 0.05 --out /tmp/img
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

DEFAULT_ROOTS = ("/usr/bin", "/usr/lib", "/usr/share")
MAX_FILE = 64 << 20  # leave out the few huge files so that no single one dominates
FS_UUID = "5b1e8f4c-4a51-4a0e-9d3c-2f6f7f0a5e01"
HASH_SEED = "0c9e4b7a-8d2f-4f3e-a1b6-7c5d3e2f1a09"
FAKE_TIME = "1700000000"  # e2fsprogs honours E2FSPROGS_FAKE_TIME for the times it stamps
# debugfs splits its commands on white space and quotes: keep names it reads verbatim.
_SAFE = re.compile(r"[A-Za-z0-9._+@,=:%~/-]+")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M or 4G")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class SourceFile:
    path: str  # where it is on this system
    rel: str  # where it goes in the image, relative to its root, e.g. "usr/lib/x/libx.so"
    size: int


@dataclass
class ImageInfo:
    path: str
    apparent_bytes: int
    allocated_bytes: int  # st_blocks, which includes preallocated (unwritten) extents
    data_extent_bytes: int  # what SEEK_DATA reports as data
    files: int
    file_bytes: int
    repeated: bool = False  # real files had to be repeated under other names


@dataclass
class ChangeInfo:
    removed_files: int = 0
    removed_bytes: int = 0
    replaced_files: int = 0
    replaced_bytes: int = 0  # size of the new versions written
    added_files: int = 0
    added_bytes: int = 0
    new_dirs: int = 0
    added_reused: bool = False  # additions repeat files of the base under a new prefix
    notes: list[str] = field(default_factory=list)

    @property
    def touched_bytes(self) -> int:
        return self.removed_bytes + self.replaced_bytes + self.added_bytes


def candidate_files(roots: Sequence[str] = DEFAULT_ROOTS, max_file: int = MAX_FILE) -> list[SourceFile]:
    """Regular, readable, non-empty files under roots with names debugfs can take, sorted."""
    found: dict[str, SourceFile] = {}
    for root in roots:
        root = os.path.abspath(root)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                rel = path.lstrip("/")
                if not _SAFE.fullmatch(rel) or rel in found:
                    continue
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size <= max_file:
                    continue
                if not os.access(path, os.R_OK):
                    continue
                found[rel] = SourceFile(path, rel, st.st_size)
    return [found[k] for k in sorted(found)]


def fill(files: Iterable[SourceFile], want: float,
         slack: float = 0.02) -> tuple[list[SourceFile], list[SourceFile]]:
    """Take files in order while they fit in want bytes (plus slack), until want is met:
    (taken, the rest in order). Skipping the files that do not fit keeps one large file
    from overshooting a small target."""
    taken: list[SourceFile] = []
    rest: list[SourceFile] = []
    got = 0
    for f in files:
        if got < want and got + f.size <= want * (1 + slack):
            taken.append(f)
            got += f.size
        else:
            rest.append(f)
    return taken, rest


def choose(pool: Sequence[SourceFile], amount: int,
           seed: int) -> tuple[list[SourceFile], list[SourceFile], bool]:
    """A seeded random selection of about amount bytes of files, and the rest of the pool
    (in shuffled order). When the pool is too small, its files are repeated under
    copyN/ prefixes (the third value says so)."""
    order = list(pool)
    random.Random(seed).shuffle(order)
    chosen, rest = fill(order, amount)
    total = sum(f.size for f in chosen)
    repeated = False
    copy = 1
    while total < amount * 0.98:
        more, _ = fill((SourceFile(f.path, f"copy{copy}/{f.rel}", f.size) for f in order),
                       amount - total)
        if not more:
            break
        repeated = True
        chosen += more
        total += sum(f.size for f in more)
        copy += 1
    return chosen, rest, repeated


def stage(files: Iterable[SourceFile], staging: str) -> None:
    """Copy files into staging/<rel>, keeping modes and times."""
    for f in files:
        dst = os.path.join(staging, f.rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(f.path, dst)


def _env() -> dict[str, str]:
    return {**os.environ, "E2FSPROGS_FAKE_TIME": FAKE_TIME}


def allocation(path: str) -> tuple[int, int]:
    """(st_blocks bytes, SEEK_DATA extent bytes) of a file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        off = data = 0
        while off < st.st_size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            data += end - start
            off = end
        return st.st_blocks * 512, data
    finally:
        os.close(fd)


def mkfs(image: str, apparent: int, source_dir: str, extra: Sequence[str] = ()) -> None:
    """A sparse file of the given size holding an ext4 file system populated from source_dir
    (mkfs.ext4 defaults, with a fixed UUID and directory hash seed)."""
    with open(image, "wb") as f:
        f.truncate(apparent)
    cmd = ["mkfs.ext4", "-q", "-F", "-U", FS_UUID, "-E", f"hash_seed={HASH_SEED}",
           "-d", source_dir, *extra, image]
    subprocess.run(cmd, check=True, env=_env())


def build_base(image: str, apparent: int, data: int, *, seed: int = 1,
               roots: Sequence[str] = DEFAULT_ROOTS, staging: str | None = None,
               pool: Sequence[SourceFile] | None = None,
               mkfs_extra: Sequence[str] = ()) -> tuple[ImageInfo, list[SourceFile], list[SourceFile]]:
    """Build the base image with about data bytes of real files. Returns its description,
    the files in it and the unused rest of the pool (for additions)."""
    pool = candidate_files(roots) if pool is None else pool
    chosen, rest, repeated = choose(pool, data, seed)
    staging = staging or image + ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        stage(chosen, staging)
        mkfs(image, apparent, staging, mkfs_extra)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    alloc, extents = allocation(image)
    info = ImageInfo(image, apparent, alloc, extents, len(chosen), sum(f.size for f in chosen), repeated)
    return info, chosen, rest


def _new_version(src: str, dst: str, rng: random.Random) -> int:
    """A plausible next version of a file: a few bytes inserted near the start (shifting
    everything after) and a few scattered bytes changed."""
    with open(src, "rb") as f:
        data = bytearray(f.read())
    at = rng.randrange(0, min(len(data), 4096) + 1)
    data[at:at] = rng.randbytes(rng.randrange(1, 65))
    for _ in range(max(1, len(data) >> 16)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    with open(dst, "wb") as f:
        f.write(data)
    return len(data)


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def change_image(image: str, base_files: Sequence[SourceFile], rest: Sequence[SourceFile],
                 fraction: float, *, seed: int = 2, work_dir: str | None = None,
                 mix: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
                 fsck: bool = True) -> ChangeInfo:
    """Change image in place with debugfs -w so that removed + replaced + added bytes come
    to about fraction of the base's file bytes, split by mix (remove, replace, add).
    Removals and replacements come first, so new data reuses freed blocks as it would."""
    rng = random.Random(seed)
    total = sum(f.size for f in base_files)
    want_rm, want_rep, want_add = (fraction * total * m for m in mix)
    work_dir = work_dir or image + ".changes"
    shutil.rmtree(work_dir, ignore_errors=True)
    os.makedirs(work_dir)
    ci = ChangeInfo()
    cmds: list[str] = []
    try:
        order = sorted(base_files, key=lambda f: f.rel)
        rng.shuffle(order)
        removed, order = fill(order, want_rm)
        for f in removed:
            cmds.append(f"rm /{f.rel}")
            ci.removed_files += 1
            ci.removed_bytes += f.size
        replaced, order = fill(order, want_rep)
        for f in replaced:
            local = os.path.join(work_dir, f"v{ci.replaced_files}")
            ci.replaced_bytes += _new_version(f.path, local, rng)
            cmds += [f"rm /{f.rel}", f"write {local} /{f.rel}"]
            ci.replaced_files += 1
        dirs = {d for f in base_files for d in _parents(f.rel)}
        present = {f.rel for f in base_files}
        adds = [f for f in rest if f.rel not in present]
        if sum(f.size for f in adds) < want_add:
            ci.added_reused = True
            ci.notes.append("pool exhausted: additions repeat base files under added/")
            adds += [SourceFile(f.path, f"added/{f.rel}", f.size) for f in order]
        added, _ = fill(adds, want_add)
        for f in added:
            for d in _parents(f.rel):
                if d not in dirs:
                    cmds.append(f"mkdir /{d}")
                    dirs.add(d)
                    ci.new_dirs += 1
            cmds.append(f"write {f.path} /{f.rel}")
            ci.added_files += 1
            ci.added_bytes += f.size
        script = os.path.join(work_dir, "debugfs.cmds")
        with open(script, "w") as fh:
            fh.write("\n".join(cmds) + "\n")
        r = subprocess.run(["debugfs", "-w", "-f", script, image], capture_output=True, text=True,
                           env=_env())
        # debugfs exits 0 even when a command fails; its errors are the lines that are not
        # an echoed command, the banner or an "Allocated inode" notice.
        errors = [ln for ln in (r.stdout + r.stderr).splitlines()
                  if ln.strip() and not ln.startswith(("debugfs", "Allocated inode"))]
        if r.returncode or errors:
            raise RuntimeError(f"debugfs failed on {image}: " + "; ".join(errors[:5]))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if fsck:
        r = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"e2fsck finds {image} inconsistent after the change:\n{r.stdout}")
    return ci


def build_pair(out_dir: str, apparent: int, data: int, fraction: float, *, seed: int = 1,
               roots: Sequence[str] = DEFAULT_ROOTS) -> dict[str, object]:
    """out_dir/base.img and out_dir/changed.img (a sparse copy of base, then changed)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, "base.img")
    changed = os.path.join(out_dir, "changed.img")
    info, files, rest = build_base(base, apparent, data, seed=seed, roots=roots)
    subprocess.run(["cp", "--sparse=always", base, changed], check=True)
    ci = change_image(changed, files, rest, fraction, seed=seed + 1)
    alloc, extents = allocation(changed)
    summary: dict[str, object] = {
        "base": asdict(info),
        "changed": {"path": changed, "allocated_bytes": alloc, "data_extent_bytes": extents},
        "change": {**asdict(ci), "touched_bytes": ci.touched_bytes,
                   "touched_fraction": round(ci.touched_bytes / max(info.file_bytes, 1), 4)},
        "seed": seed, "roots": list(roots),
    }
    with open(os.path.join(out_dir, "images.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("4G"), help="apparent size (4G)")
    p.add_argument("--data", type=parse_size, default=parse_size("512M"),
                   help="bytes of real files in the base (512M)")
    p.add_argument("--change", type=float, default=0.05,
                   help="removed + replaced + added bytes as a fraction of --data (0.05)")
    p.add_argument("--out", required=True, help="directory for base.img, changed.img, images.json")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--root", action="append", dest="roots",
                   help=f"where to take files from (repeatable; default {' '.join(DEFAULT_ROOTS)})")
    a = p.parse_args(argv)
    summary = build_pair(a.out, a.size, a.data, a.change, seed=a.seed, roots=a.roots or DEFAULT_ROOTS)
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
