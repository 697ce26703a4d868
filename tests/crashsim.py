"""Crash-state explorer for apply, after ALICE (OSDI 2014) and CrashMonkey (OSDI 2018).

A real apply (sparsepatch.api.apply, in this process) runs on a small image while every call
of sparse.py that changes a file or makes it durable is logged: write, punch, truncate,
fsync/fdatasync, create, unlink, folder fsync. From the files as they were before the run
and a prefix of that log, the explorer rebuilds what a power cut at that point could leave
on disk:

- an operation on a file is durable once that file was fsynced (or fdatasynced) after it;
  before that, each 4 KiB page it touched is kept or lost on its own, a kept page of a
  write may be torn at 512-byte sectors, and a size change by a write is kept or lost
  apart from its pages;
- a create or an unlink is durable only once its folder was fsynced; before that it is
  kept or lost, and a file whose create is lost has no content at all.

Kept operations are replayed in log order. On each such state an unmodified apply runs
again and must finish: exit success, the target's bytes, no allocated block where the
target has a zero block, and no journal left. Runs interrupted while resuming are explored
the same way (level 2): a resume from a crash state is recorded and its own crash states
tried.

A rename (apply --undo renames its spool to UNDO) is, like a create, durable only once its
folder was fsynced; before that it is kept or lost as a whole.

Not modelled: fallocate's reservations (space only, the content reads the same either
way), block devices, and filesystems that reorder a write to one
page before an earlier one to the same page (each write is kept or lost on its own,
which already allows more than a page cache does).

Every choice comes from a seed: a failure names the scenario, seed, crash point and
variant, and `python tests/crashsim.py --replay 'NAME:SEED:POINT.VARIANT[/POINT.VARIANT]'`
rebuilds that state (with --keep DIR, leaves it there to look at).

`python tests/crashsim.py` explores the full set (make crashtest); tests/test_crash.py runs
a sample, and shows that removing a journal write or a sync makes the explorer fail.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import os
import random
import shutil
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sparsepatch import api, sparse
from sparsepatch.errors import SparsePatchError

# The package exports a function named apply, which hides the module of that name.
window_mod = importlib.import_module("sparsepatch.window")
destination_mod = importlib.import_module("sparsepatch.destination")
apply_mod = importlib.import_module("sparsepatch.apply")
# The sizes a scenario scales down, and the module that owns each.
TUNABLES = {"SYNC_BUDGET": window_mod, "JOURNAL_LOOKAHEAD": window_mod, "WRITE_STEP": destination_mod,
            "SYNC_BATCH": apply_mod}

PAGE = 4096
SECTOR = 512
FULL = (1 << (PAGE // SECTOR)) - 1  # every sector of a page kept


# -- recording -------------------------------------------------------------------------

@dataclass
class Op:
    kind: str  # write, punch, truncate, sync, create, unlink, rename, syncdir, reserve
    path: str  # for a rename, the new name (data holds the old one)
    off: int = 0
    length: int = 0
    data: bytes = b""
    extends: bool = False  # a write past the end of file: its size change is a unit of its own
    caller: str = ""

    def describe(self) -> str:
        name = os.path.basename(self.path) or self.path
        if self.kind in ("write", "punch", "reserve"):
            what = f"{self.kind} {name} [{self.off}, {self.off + self.length})"
        elif self.kind == "truncate":
            what = f"truncate {name} to {self.length}"
        else:
            what = f"{self.kind} {name}"
        return f"{what} (from {self.caller})"


Drop = Callable[[str, str], bool]  # (sparse function, caller "module:function") -> leave it out


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _caller() -> str:
    f = sys._getframe(2)
    return f"{f.f_globals.get('__name__', '?')}:{f.f_code.co_name}"


@contextlib.contextmanager
def recording(log: list[Op], drop: Drop | None = None) -> Iterator[None]:
    """Wrap sparse.py's mutating and syncing calls: each is done, then logged. A call drop()
    picks is neither done nor logged: the code under test without that line."""
    saved = {n: getattr(sparse, n) for n in (
        "pwrite_full", "punch_hole", "set_size", "sync", "sync_data", "sync_dir", "open_path",
        "open_at", "unlink", "reserve", "rename")}

    def skip(name: str, caller: str) -> bool:
        return drop is not None and drop(name, caller)

    def pwrite_full(fd: int, data: Any, offset: int) -> None:
        caller = _caller()
        if skip("pwrite_full", caller):
            return
        size = os.fstat(fd).st_size
        saved["pwrite_full"](fd, data, offset)
        b = bytes(data)
        log.append(Op("write", _path_of(fd), offset, len(b), b, offset + len(b) > size, caller))

    def punch_hole(fd: int, offset: int, length: int, discard: bool = False) -> bool:
        caller = _caller()
        if skip("punch_hole", caller):
            return True
        ok = bool(saved["punch_hole"](fd, offset, length, discard))
        if ok and length > 0:
            log.append(Op("punch", _path_of(fd), offset, length, caller=caller))
        return ok

    def set_size(fd: int, size: int) -> None:
        caller = _caller()
        if skip("set_size", caller):
            return
        saved["set_size"](fd, size)
        log.append(Op("truncate", _path_of(fd), length=size, caller=caller))

    def syncer(name: str) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            caller = _caller()
            if skip(name, caller):
                return
            saved[name](fd)
            # An fsync of a folder's descriptor makes its creates and unlinks durable.
            kind = "syncdir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "sync"
            log.append(Op(kind, _path_of(fd), caller=caller))
        return sync

    def sync_dir(path: str | int) -> None:
        caller = _caller()
        if skip("sync_dir", caller):
            return
        saved["sync_dir"](path)
        where = _path_of(path) if isinstance(path, int) else os.path.realpath(path or ".")
        log.append(Op("syncdir", where, caller=caller))

    def open_path(path: str, flags: int, mode: int = 0o666) -> int:
        caller = _caller()
        new = bool(flags & os.O_CREAT) and not os.path.lexists(path)
        fd = int(saved["open_path"](path, flags, mode))
        if new:
            log.append(Op("create", _path_of(fd), caller=caller))
        return fd

    def open_at(dir_fd: int, name: str, flags: int, mode: int = 0o600) -> int:
        caller = _caller()
        new = bool(flags & os.O_CREAT) and not os.path.lexists(os.path.join(_path_of(dir_fd), name))
        fd = int(saved["open_at"](dir_fd, name, flags, mode))
        if new:
            log.append(Op("create", _path_of(fd), caller=caller))
        return fd

    def unlink(path: str, dir_fd: int | None = None) -> None:
        caller = _caller()
        if skip("unlink", caller):
            return
        where = path if dir_fd is None else os.path.join(_path_of(dir_fd), path)
        full = os.path.join(os.path.realpath(os.path.dirname(where)), os.path.basename(where))
        saved["unlink"](path, dir_fd)
        log.append(Op("unlink", full, caller=caller))

    def rename(src: str, dst: str, dir_fd: int) -> None:
        caller = _caller()
        if skip("rename", caller):
            return
        folder = _path_of(dir_fd)
        saved["rename"](src, dst, dir_fd)
        log.append(Op("rename", os.path.join(folder, dst), data=os.path.join(folder, src).encode(),
                      caller=caller))

    def reserve(fd: int, offset: int, length: int) -> None:
        caller = _caller()
        if skip("reserve", caller):
            return
        saved["reserve"](fd, offset, length)
        log.append(Op("reserve", _path_of(fd), offset, length, caller=caller))

    mine = {"pwrite_full": pwrite_full, "punch_hole": punch_hole, "set_size": set_size,
            "sync": syncer("sync"), "sync_data": syncer("sync_data"), "sync_dir": sync_dir,
            "open_path": open_path, "open_at": open_at, "unlink": unlink,
            "reserve": reserve, "rename": rename}
    for n, f in mine.items():
        setattr(sparse, n, f)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(sparse, n, f)


# -- files as the model sees them ------------------------------------------------------

@dataclass
class Image:
    size: int
    pages: dict[int, bytes]  # allocated pages, PAGE bytes each; the rest is holes

    def copy(self) -> Image:
        return Image(self.size, dict(self.pages))


State = dict[str, "Image | None"]  # absolute path -> content, None: no such file


def snapshot(path: str) -> Image | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        pages: dict[int, bytes] = {}
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            for p in range(start // PAGE, (end + PAGE - 1) // PAGE):
                pages[p] = os.pread(fd, PAGE, p * PAGE).ljust(PAGE, b"\0")
            pos = end
        return Image(size, pages)
    finally:
        os.close(fd)


def materialize(state: State) -> None:
    for path, img in state.items():
        if img is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, img.size)
            for p, data in img.pages.items():
                if p * PAGE < img.size:
                    os.pwrite(fd, data[: img.size - p * PAGE], p * PAGE)
        finally:
            os.close(fd)


def digest(state: State) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(state):
        img = state[path]
        h.update(path.encode() + b"\0")
        if img is None:
            h.update(b"-")
            continue
        h.update(img.size.to_bytes(8, "little"))
        for p in sorted(img.pages):
            if p * PAGE < img.size:
                h.update(p.to_bytes(8, "little") + img.pages[p][: img.size - p * PAGE])
    return h.digest()


def _clip(img: Image, size: int) -> None:
    """What is left past a shrink: nothing beyond size, zeros after it in its page."""
    for p in [p for p in img.pages if p * PAGE >= size]:
        del img.pages[p]
    last = size // PAGE
    if size % PAGE and last in img.pages:
        keep = size % PAGE
        img.pages[last] = img.pages[last][:keep] + bytes(PAGE - keep)


# -- crash states from a log -----------------------------------------------------------

Unit = tuple[int, int]  # (op index, page; -1 for the op as a whole, -2 for a write's size)


def _units(op: Op, i: int) -> list[Unit]:
    if op.kind in ("write", "punch"):
        pages = range(op.off // PAGE, (op.off + op.length + PAGE - 1) // PAGE)
        out = [(i, p) for p in pages]
        if op.kind == "write" and op.extends:
            out.append((i, -2))
        return out
    if op.kind in ("truncate", "create", "unlink", "rename"):
        return [(i, -1)]
    return []  # syncs, and reserve (space only: a lost one reads the same)


class Log:
    def __init__(self, initial: State, ops: list[Op]):
        self.initial = initial
        self.ops = ops
        # For each op, the index of the first later sync that makes it durable.
        self.durable_at: list[int] = []
        for i, op in enumerate(ops):
            at = len(ops) + 1
            for j in range(i + 1, len(ops)):
                o = ops[j]
                if op.kind in ("create", "unlink", "rename"):
                    if o.kind == "syncdir" and o.path == os.path.dirname(op.path):
                        at = j
                        break
                elif o.kind == "sync" and o.path == op.path:
                    at = j
                    break
            self.durable_at.append(at)

    def pending(self, k: int) -> list[Unit]:
        """Units of ops[:k] that a power cut after op k-1 could keep or lose."""
        out: list[Unit] = []
        for i in range(k):
            if self.durable_at[i] >= k:
                out += _units(self.ops[i], i)
        return out

    def state(self, k: int, choice: dict[Unit, int]) -> State:
        """The files after a power cut following ops[:k], with choice[unit] the sectors kept
        (0 lost, FULL kept) for each pending unit; durable ones are kept whole."""
        st: State = {p: (img.copy() if img else None) for p, img in self.initial.items()}
        for op in self.ops:
            if op.kind != "syncdir":
                st.setdefault(op.path, None)
            if op.kind == "rename":
                st.setdefault(op.data.decode(), None)

        def kept(u: Unit) -> int:
            return FULL if self.durable_at[u[0]] < k else choice.get(u, FULL)

        for i in range(k):
            op = self.ops[i]
            if op.kind == "create":
                if kept((i, -1)) and st.get(op.path) is None:
                    st[op.path] = Image(0, {})
                continue
            if op.kind == "unlink":
                if kept((i, -1)):
                    st[op.path] = None
                continue
            if op.kind == "rename":
                old = op.data.decode()
                if kept((i, -1)) and st.get(old) is not None:
                    st[op.path], st[old] = st[old], None
                continue
            img = st.get(op.path)
            if img is None or op.kind in ("sync", "syncdir", "reserve"):
                continue
            if op.kind == "truncate":
                if kept((i, -1)):
                    if op.length < img.size:
                        _clip(img, op.length)
                    img.size = op.length
            elif op.kind == "write":
                end = op.off + op.length
                size = max(img.size, end) if op.extends and kept((i, -2)) else img.size
                for p in range(op.off // PAGE, (end + PAGE - 1) // PAGE):
                    mask = kept((i, p))
                    if not mask:
                        continue
                    page = bytearray(img.pages.get(p, bytes(PAGE)))
                    landed = False
                    for s in range(PAGE // SECTOR):
                        if not mask >> s & 1:
                            continue
                        a = max(op.off, p * PAGE + s * SECTOR)
                        b = min(end, p * PAGE + (s + 1) * SECTOR, size)
                        if a < b:
                            page[a - p * PAGE : b - p * PAGE] = op.data[a - op.off : b - op.off]
                            landed = True
                    if landed:
                        img.pages[p] = bytes(page)
                img.size = size
            elif op.kind == "punch":
                end = op.off + op.length
                for p in range(op.off // PAGE, (end + PAGE - 1) // PAGE):
                    if not kept((i, p)) or p not in img.pages:
                        continue
                    a, b = max(op.off, p * PAGE), min(end, (p + 1) * PAGE)
                    if (a, b) == (p * PAGE, (p + 1) * PAGE):
                        del img.pages[p]
                    else:
                        page = bytearray(img.pages[p])
                        page[a - p * PAGE : b - p * PAGE] = bytes(b - a)
                        img.pages[p] = bytes(page)
        return st

    def choices(self, k: int, variant: int, rng: random.Random) -> dict[Unit, int]:
        """Variant 0 keeps every pending unit (the process was killed, the page cache
        survived), 1 loses them all, 2 keeps an in-order prefix, the rest are random
        subsets, some with torn pages."""
        units = self.pending(k)
        if variant == 0:
            return {u: FULL for u in units}
        if variant == 1:
            return {u: 0 for u in units}
        if variant == 2:
            cut = rng.randrange(len(units) + 1) if units else 0
            return {u: (FULL if n < cut else 0) for n, u in enumerate(units)}
        p_keep = rng.choice((0.15, 0.5, 0.85))
        out = {}
        for u in units:
            c = FULL if rng.random() < p_keep else 0
            if c and u[1] >= 0 and self.ops[u[0]].kind == "write" and rng.random() < 0.15:
                c = rng.randrange(1, FULL)
            out[u] = c
        return out


# -- scenarios -------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    block_size: int
    base: bytes | None  # None: no destination yet (a first copy, from a full patch)
    target: bytes
    stream: bool = False  # patch from stdin: no pre-read, no plan
    sync_budget: int = window_mod.SYNC_BUDGET
    lookahead: int = window_mod.JOURNAL_LOOKAHEAD
    write_step: int = destination_mod.WRITE_STEP
    journal_elsewhere: bool = False  # --journal in another folder (as for a block device)
    undo: bool = False  # apply --undo: the undo must come out whole and lead back to the base
    undo_batch: int = apply_mod.SYNC_BATCH
    undo_elsewhere: bool = False  # UNDO in another folder than the destination and its journal
    scratch_elsewhere: bool = False  # apply --scratch DIR: the scratch's folder is not the journal's


def _blocks(n: int, bs: int) -> int:
    return (n + bs - 1) // bs


def make_pair(seed: int, bs: int, base_size: int, target_size: int) -> tuple[bytes, bytes]:
    """A base with holes and data (some blocks only partly data) and a target that keeps,
    rewrites, zeroes and moves its blocks: DATA, ZERO and COPY records."""
    rng = random.Random(seed)
    base = bytearray(base_size)
    nb, nt = _blocks(base_size, bs), _blocks(target_size, bs)
    data_blocks = []
    for b in range(nb):
        if rng.random() < 0.55:
            data_blocks.append(b)
            for p in range(bs // PAGE):
                off = b * bs + p * PAGE
                if off < base_size and (p == 0 or rng.random() < 0.8):
                    base[off : min(off + PAGE, base_size)] = rng.randbytes(min(PAGE, base_size - off))
    target = bytearray(target_size)
    fate = {}
    for b in range(nt):
        r = rng.random()
        if b in data_blocks:
            fate[b] = "keep" if r < 0.35 else "new" if r < 0.6 else "zero" if r < 0.8 else "copy"
        else:
            fate[b] = "hole" if r < 0.55 else "new" if r < 0.85 else "copy"
    kept = [b for b in data_blocks if fate.get(b) == "keep" and (b + 1) * bs <= min(base_size, target_size)]
    for b in range(nt):
        lo, hi = b * bs, min((b + 1) * bs, target_size)
        f = fate[b]
        if f == "copy" and not kept:
            f = "new"
        if f == "keep":
            target[lo:hi] = base[lo:hi].ljust(hi - lo, b"\0")[: hi - lo]
        elif f == "new":
            target[lo:hi] = rng.randbytes(hi - lo)
        elif f == "copy":
            src = rng.choice(kept) * bs
            target[lo:hi] = base[src : src + hi - lo]
    return bytes(base), bytes(target)


def make_moves(seed: int, bs: int, size: int) -> tuple[bytes, bytes]:
    """A base of random pages and a target that swaps two regions, rotates three, shifts one
    up by a page and punches a source: DATA records of moved pages, and STAGE records for
    the sources overwritten before they are read."""
    rng = random.Random(seed)
    base = rng.randbytes(size)
    t = bytearray(base)
    r = size // 8  # region size, a multiple of the page size as size is
    t[0:r], t[4 * r : 5 * r] = base[4 * r : 5 * r], base[0:r]  # swap
    t[r : 2 * r], t[2 * r : 3 * r] = base[2 * r : 3 * r], base[5 * r : 6 * r]  # rotate with 5r
    t[5 * r : 6 * r] = base[r : 2 * r]
    t[6 * r + PAGE : 7 * r + PAGE] = base[6 * r : 7 * r]  # shift up one page
    t[3 * r : 4 * r] = bytes(r)  # punched; its pages moved elsewhere below
    t[7 * r + PAGE : 8 * r] = base[3 * r : 4 * r - PAGE]
    return base, bytes(t)


def scenarios() -> list[Scenario]:
    """In place, first copy, shrink, grow and a stream, at 4 and 16 KiB blocks; each with
    the default sync budget (one window for the whole run) and scaled down with the image
    ("tight": a budget of three blocks and writes of two, so windows move every few
    writes, as they do every 64 MiB on a real image)."""
    out = []
    for bs in (4096, 16384):
        small = 3 * bs
        for budget_name, budget in (("tight", small), ("default", window_mod.SYNC_BUDGET)):
            k = 1 if bs == 4096 else 4
            cases = [
                ("inplace", 160 * k * 1024 + 1000, 160 * k * 1024 + 1000, False, False),
                ("firstcopy", 0, 120 * k * 1024 + 777, True, False),
                ("shrink", 192 * k * 1024 + 5000, 100 * k * 1024 + 333, False, False),
                ("grow", 96 * k * 1024 + 100, 200 * k * 1024 + 2222, False, False),
                ("stream", 160 * k * 1024, 176 * k * 1024 + 4321, False, True),
            ]
            for n, (name, bsize, tsize, first, stream) in enumerate(cases):
                seed = 1000 * bs + 10 * n + (budget_name == "tight")
                base, target = make_pair(seed, bs, bsize, tsize)
                tight = budget_name == "tight"
                out.append(Scenario(
                    f"{name}-{bs // 1024}k-{budget_name}", bs, None if first else base, target,
                    stream, budget, 8 * bs if tight else window_mod.JOURNAL_LOOKAHEAD,
                    2 * bs if tight else destination_mod.WRITE_STEP))
    # Moved content: staging into the scratch before the first write, pages read in place
    # ahead of their own block's rewrite.
    for bs in (4096, 16384):
        base, target = make_moves(7000 + bs, bs, 64 * bs)
        out.append(Scenario(f"moves-{bs // 1024}k-tight", bs, base, target, False, 3 * bs, 8 * bs,
                            2 * bs))
    base, target = make_moves(7001, 16384, 64 * 16384)
    out.append(Scenario("moves-16k-default", 16384, base, target))
    for sc in [s for s in out if s.name in ("firstcopy-16k-tight", "inplace-4k-tight")]:
        out.append(Scenario(sc.name + "-journal-elsewhere", sc.block_size, sc.base, sc.target,
                            sc.stream, sc.sync_budget, sc.lookahead, sc.write_step, True))
    # apply --undo: the undo spool synced every four blocks, so that writes and spool syncs
    # interleave as they do every 32 MiB on a real image.
    for sc in [s for s in out if s.name in ("inplace-16k-tight", "shrink-4k-tight", "grow-4k-tight",
                                            "stream-16k-tight", "shrink-16k-default",
                                            "moves-16k-tight")]:
        out.append(Scenario(sc.name + "-undo", sc.block_size, sc.base, sc.target, sc.stream,
                            sc.sync_budget, sc.lookahead, sc.write_step, undo=True,
                            undo_batch=4 * sc.block_size))
    sc = scenario_in(out, "moves-16k-tight")
    out.append(Scenario(sc.name + "-scratch-elsewhere", sc.block_size, sc.base, sc.target, sc.stream,
                        sc.sync_budget, sc.lookahead, sc.write_step, scratch_elsewhere=True))
    sc = scenario_in(out, "inplace-16k-tight-undo")
    out.append(Scenario(sc.name + "-elsewhere", sc.block_size, sc.base, sc.target, sc.stream,
                        sc.sync_budget, sc.lookahead, sc.write_step, undo=True,
                        undo_batch=sc.undo_batch, undo_elsewhere=True))
    return out


def scenario_in(scs: list[Scenario], name: str) -> Scenario:
    return next(s for s in scs if s.name == name)


def scenario(name: str) -> Scenario:
    for s in scenarios():
        if s.name == name:
            return s
    raise SystemExit(f"no scenario {name!r}; there are: {', '.join(s.name for s in scenarios())}")


def write_sparse(path: str, content: bytes) -> None:
    """content at path, with a hole wherever a page is all zeros."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, len(content))
        for off in range(0, len(content), PAGE):
            page = content[off : off + PAGE]
            if page.strip(b"\0"):
                os.pwrite(fd, page, off)
    finally:
        os.close(fd)


# -- running apply ---------------------------------------------------------------------

class Stdin:
    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)


@dataclass
class Case:
    """A scenario set up in a folder: the patch made, and where the destination goes."""
    sc: Scenario
    folder: str
    patch: str
    patch_bytes: bytes
    dest: str
    kinds: set[str] = field(default_factory=set)
    journal: str | None = None

    @property
    def undo(self) -> str | None:
        if not self.sc.undo:
            return None
        folder = os.path.join(os.path.dirname(self.folder), "u") if self.sc.undo_elsewhere else self.folder
        return os.path.join(folder, "update.undo")

    @property
    def scratch(self) -> str | None:
        if not self.sc.scratch_elsewhere:
            return None
        return os.path.join(os.path.dirname(self.folder), "s")

    @property
    def spool(self) -> str:
        assert self.undo is not None
        return os.path.join(os.path.dirname(self.undo), ".update.undo.sparsepatch-undo")

    @contextlib.contextmanager
    def tuned(self) -> Iterator[None]:
        names = ("SYNC_BUDGET", "JOURNAL_LOOKAHEAD", "WRITE_STEP", "SYNC_BATCH")
        saved = [getattr(TUNABLES[n], n) for n in names]
        values = (self.sc.sync_budget, self.sc.lookahead, self.sc.write_step, self.sc.undo_batch)
        for n, v in zip(names, values, strict=True):
            setattr(TUNABLES[n], n, v)
        try:
            yield
        finally:
            for n, v in zip(names, saved, strict=True):
                setattr(TUNABLES[n], n, v)

    def apply(self) -> None:
        with self.tuned():
            if not self.sc.stream:
                api.apply(self.patch, self.dest, journal=self.journal, undo=self.undo,
                          scratch=self.scratch)
                return
            saved = sys.stdin
            sys.stdin = Stdin(self.patch_bytes)  # type: ignore[assignment]
            try:
                api.apply("-", self.dest, journal=self.journal, undo=self.undo,
                          scratch=self.scratch)
            finally:
                sys.stdin = saved

    def problem(self) -> str | None:
        """What differs from a finished apply, or None."""
        target = self.sc.target
        with open(self.dest, "rb") as f:
            got = f.read()
        if len(got) != len(target):
            return f"destination is {len(got)} bytes, the target {len(target)}"
        if got != target:
            at = next(i for i in range(len(got)) if got[i] != target[i])
            return f"destination differs from the target at byte {at} (block {at // self.sc.block_size})"
        img = snapshot(self.dest)
        assert img is not None
        bs = self.sc.block_size
        for p in sorted(img.pages):
            b = p * PAGE // bs
            if not target[b * bs : (b + 1) * bs].strip(b"\0"):
                return f"block {b} is zero in the target but allocated (page at byte {p * PAGE})"
        left = sorted(set(os.listdir(self.folder)) - {os.path.basename(self.dest),
                                                        os.path.basename(self.patch), "update.undo"})
        if left:
            return f"left behind: {', '.join(left)}"
        if self.undo is not None:
            if os.path.exists(self.spool):
                return f"left behind: {self.spool}"
            with open(self.undo, "rb") as f:
                return self.undo_problem(f.read())
        return None

    def undo_problem(self, undo: bytes) -> str | None:
        """What is wrong with an undo patch's bytes: invalid, or not leading from the target
        back to the base."""
        assert self.sc.base is not None
        scratch = tempfile.mkdtemp(prefix="undo.", dir=os.path.dirname(self.folder))
        try:
            u, d = os.path.join(scratch, "u"), os.path.join(scratch, "d")
            with open(u, "wb") as f:
                f.write(undo)
            write_sparse(d, self.sc.target)
            try:
                api.verify(u)
                api.apply(u, d)
            except SparsePatchError as e:
                return f"the undo patch is not valid: {e}"
            with open(d, "rb") as f:
                if f.read() != self.sc.base:
                    return "the undo patch does not lead back to the base"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return None

    def after_return(self, state: State) -> str | None:
        """What in state (the files after a power cut that followed a finished apply)
        differs from the target, or None."""
        img = state.get(self.dest)
        if img is None:
            return "the destination is gone"
        got = bytearray(img.size)
        for p, page in img.pages.items():
            got[p * PAGE : (p + 1) * PAGE] = page[: max(0, img.size - p * PAGE)]
        if bytes(got) != self.sc.target:
            return "the destination is not the target"
        undo = state.get(self.undo) if self.undo is not None else None
        if self.undo is not None:
            if undo is None:
                return "the undo patch is gone"
            raw = bytearray(undo.size)
            for p, page in undo.pages.items():
                raw[p * PAGE : (p + 1) * PAGE] = page[: max(0, undo.size - p * PAGE)]
            bad = self.undo_problem(bytes(raw))
            if bad:
                return bad
        left = sorted(p for p, i in state.items() if p not in (self.dest, self.undo) and i is not None)
        return f"left behind: {', '.join(left)}" if left else None

    def leftovers(self, state: State) -> str | None:
        """Files of the state besides the destination still there (a journal kept
        outside the folder included)."""
        left = sorted(p for p in state if p not in (self.dest, self.undo) and os.path.lexists(p))
        return f"left behind: {', '.join(left)}" if left else None

    def resume(self) -> str | None:
        """Run apply on the state on disk; what went wrong, or None."""
        return self.run() or self.problem()

    def run(self) -> str | None:
        try:
            self.apply()
        except SparsePatchError as e:
            return f"apply failed (exit {e.exit_code}): {e}"
        except Exception:
            return "apply crashed:\n" + traceback.format_exc()
        return None


def setup(sc: Scenario, root: str) -> Case:
    folder = tempfile.mkdtemp(prefix=f"{sc.name}.", dir=root)
    src = os.path.join(folder, "src")
    os.mkdir(src)
    target = os.path.join(src, "target.img")
    write_sparse(target, sc.target)
    patch = os.path.join(folder, "update.patch")
    if sc.base is None:
        api.diff(None, target, patch, full=True, block_size=sc.block_size)
    else:
        base = os.path.join(src, "base.img")
        write_sparse(base, sc.base)
        api.signature(base, os.path.join(src, "base.sig"), block_size=sc.block_size)
        api.diff(os.path.join(src, "base.sig"), target, patch, block_size=sc.block_size)
    info = api.info(patch)
    kinds = {k for k, n in info["records"].items() if n}
    with open(patch, "rb") as f:
        data = f.read()
    shutil.rmtree(src)
    work = os.path.realpath(os.path.join(folder, "w"))
    os.mkdir(work)
    os.rename(patch, os.path.join(work, "update.patch"))
    journal = None
    if sc.undo_elsewhere:
        os.mkdir(os.path.join(folder, "u"))
    if sc.scratch_elsewhere:
        os.mkdir(os.path.join(folder, "s"))
    if sc.journal_elsewhere:
        os.mkdir(os.path.join(folder, "j"))
        journal = os.path.realpath(os.path.join(folder, "j", "dest.journal"))
    return Case(sc, work, os.path.join(work, "update.patch"), data, os.path.join(work, "dest.img"),
                kinds, journal)


def initial_state(case: Case) -> State:
    st: State = {case.dest: None}
    if case.undo is not None:
        st[case.undo] = None
        st[case.spool] = None
    if case.sc.base is not None:
        write_sparse(case.dest, case.sc.base)
        st[case.dest] = snapshot(case.dest)
    return st


# -- exploring -------------------------------------------------------------------------

@dataclass
class Result:
    states: int = 0  # distinct crash states an apply was run on
    tried: int = 0  # crash states built, duplicates included
    failures: list[str] = field(default_factory=list)
    logs: int = 0
    ops: int = 0


def record(case: Case, start: State, drop: Drop | None) -> Log:
    """Put start on disk, run a recorded apply from it; the log of what it did."""
    materialize(start)
    ops: list[Op] = []
    with recording(ops, drop):
        err = case.run()
    err = err or case.problem()  # not recorded: it checks the undo by applying it elsewhere
    log = Log(start, ops)
    err = err or case.leftovers(log.state(len(ops), {}))
    if err:
        raise AssertionError(f"{case.sc.name}: the recorded run itself failed: {err}")
    return log


def explore(case: Case, seed: int, variants: int, nested: int, nested_variants: int,
            drop: Drop | None = None, stop_on_failure: bool = False,
            result: Result | None = None) -> Result:
    """Every crash point of a recorded apply, `variants` states each (fewer where fewer
    exist); then `nested` of those states, picked by seed, have their own resume
    recorded and explored with `nested_variants` states per point."""
    res = result or Result()
    seen: set[bytes] = set()
    start = initial_state(case)
    log = record(case, start, drop)
    res.logs += 1
    res.ops += len(log.ops)
    parents: list[tuple[int, int]] = []
    _points(case, log, seed, "", variants, seen, res, parents, stop_on_failure)
    if res.failures and stop_on_failure:
        return res
    rng = random.Random(f"{seed}:{case.sc.name}:nested")
    for k, v in rng.sample(parents, min(nested, len(parents))):
        label = f"{k}.{v}"
        st = log.state(k, log.choices(k, v, random.Random(f"{seed}:{case.sc.name}:{label}")))
        sub = record(case, st, drop)
        res.logs += 1
        res.ops += len(sub.ops)
        _points(case, sub, seed, label + "/", nested_variants, seen, res, None, stop_on_failure)
        if res.failures and stop_on_failure:
            break
    return res


def _points(case: Case, log: Log, seed: int, prefix: str, variants: int, seen: set[bytes],
            res: Result, parents: list[tuple[int, int]] | None, stop: bool) -> None:
    """Explore every crash point of log; parents gets (point, variant) of the states that
    kept a journal (their resume has a window to honour: worth exploring in turn)."""
    for k in range(len(log.ops) + 1):
        units = log.pending(k)
        writes = sum(1 for u in units if u[1] >= 0 and log.ops[u[0]].kind == "write")
        for v in range(variants if units else 1):
            label = f"{prefix}{k}.{v}"
            rng = random.Random(f"{seed}:{case.sc.name}:{label}")
            st = log.state(k, log.choices(k, v, rng))
            res.tried += 1
            if k == len(log.ops):
                # apply has returned: what it wrote must survive a power cut as it is.
                done = case.after_return(st)
                if done:
                    res.failures.append(f"{case.sc.name}:{seed}:{label} (power cut after apply "
                                        f"returned, {len(units)} units pending): {done}")
                    if stop:
                        return
            d = digest(st)
            if d in seen:
                continue
            seen.add(d)
            materialize(st)
            err = case.resume() or case.leftovers(st)
            res.states += 1
            if parents is not None and any(img is not None and path != case.dest
                                           for path, img in st.items()):
                parents.append((k, v))
            if err:
                after = log.ops[k - 1].describe() if k else "before the first operation"
                res.failures.append(
                    f"{case.sc.name}:{seed}:{label} (crash after op {k} of {len(log.ops)}: {after}; "
                    f"{len(units)} units pending, {writes} of writes): {err}")
                if stop:
                    return


def replay(root: str, spec: str, keep: str | None) -> int:
    """Rebuild one crash state named NAME:SEED:POINT.VARIANT[/POINT.VARIANT] and resume it."""
    name, seed_s, path = spec.split(":", 2)
    case = setup(scenario(name), root)
    seed = int(seed_s)
    st = initial_state(case)
    labels = path.split("/")
    prefix = ""
    for n, label in enumerate(labels):
        log = record(case, st, None)
        k, v = (int(x) for x in label.split("."))
        rng = random.Random(f"{seed}:{case.sc.name}:{prefix}{label}")
        print(f"level {n + 1}: {len(log.ops)} ops; crash after op {k}:")
        for i, op in enumerate(log.ops[:k]):
            print(f"  {i:4d} {op.describe()}")
        choice = log.choices(k, v, rng)
        lost = [u for u, c in choice.items() if c != FULL]
        print(f"  pending units: {len(choice)}, lost or torn: {lost}")
        st = log.state(k, choice)
        prefix += label + "/"
    materialize(st)
    if keep:
        shutil.copytree(case.folder, keep, dirs_exist_ok=True)
        print(f"state kept in {keep}")
    err = case.resume() or case.leftovers(st)
    print(err or "resume: target reached")
    return 1 if err else 0


def work_root() -> str:
    """tmpfs when there is one: the resumes fsync for real, and there that costs nothing."""
    for d in (os.environ.get("CRASHSIM_DIR"), "/dev/shm"):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return tempfile.gettempdir()


def run_all(seed: int, variants: int, nested: int, nested_variants: int,
            names: list[str] | None = None, out: Callable[[str], object] = print) -> Result:
    res = Result()
    root = tempfile.mkdtemp(prefix="crashsim.", dir=work_root())
    try:
        for sc in scenarios():
            if names and sc.name not in names:
                continue
            t = time.monotonic()
            before = res.states, len(res.failures)
            case = setup(sc, root)
            explore(case, seed, variants, nested, nested_variants, result=res)
            out(f"{sc.name:22s} records {'/'.join(sorted(case.kinds)):16s} "
                f"{res.states - before[0]:6d} states  {len(res.failures) - before[1]} failed  "
                f"{time.monotonic() - t:5.1f}s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", type=int, default=16, help="states per crash point")
    ap.add_argument("--nested", type=int, default=12, help="crash states whose resume is explored")
    ap.add_argument("--nested-variants", type=int, default=6)
    ap.add_argument("--scenario", action="append", help="only these (repeatable)")
    ap.add_argument("--min-states", type=int, default=0, help="fail if fewer were explored")
    ap.add_argument("--replay", metavar="NAME:SEED:POINT.VARIANT[/POINT.VARIANT]")
    ap.add_argument("--keep", metavar="DIR", help="with --replay: copy the state there")
    a = ap.parse_args()
    if a.replay:
        root = tempfile.mkdtemp(prefix="crashsim.", dir=work_root())
        try:
            return replay(root, a.replay, a.keep)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    t = time.monotonic()
    res = run_all(a.seed, a.variants, a.nested, a.nested_variants, a.scenario)
    for f in res.failures[:20]:
        print("FAIL", f)
    print(f"{res.states} distinct crash states explored ({res.tried} built) from {res.logs} "
          f"recorded runs of {res.ops} operations; {len(res.failures)} failed; "
          f"{time.monotonic() - t:.0f}s")
    if res.states < a.min_states:
        print(f"fewer than {a.min_states} states: widen --variants or --nested")
        return 1
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
