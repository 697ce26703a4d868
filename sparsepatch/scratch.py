"""The scratch of an apply that moves content (spec/FORMAT.md, sections 6 and 9.7): the base
pages a patch's STAGE records list, copied aside before the first write, because the patch
overwrites them before a later block reads them (a swap, a rotation, a shift).

The scratch lives beside the destination (a block device's in the private state directory,
or in `apply --scratch DIR`) and is trusted like the journal: looked up in a folder held
open, never through a symbolic link, created with O_EXCL, an existing one used only if it
is a regular file with one link owned by us or the destination's owner. Its content is the
staged pages in STAGE order, 4096 bytes each, nothing else: each page is checked against
its STAGE hash when it is read, so the file needs no header of its own. The journal's
slots say how many pages it holds; the scratch is removed after the journal."""

from __future__ import annotations

import bisect
import os
from array import array

from . import sparse
from .errors import FormatError, IOFailure, UsageError, WrongBase, io_errors, io_failure
from .format import HASH_LEN, PAGE_SHIFT, PAGE_SIZE, Record

STAGE_STEP = 256  # pages read and written at once while staging (1 MiB)


def scratch_name(dest: str) -> str:
    return f".{os.path.basename(dest)}.sparsepatch-scratch"


def shared_scratch_name(dest: str, st: os.stat_result) -> str:
    """The name in `--scratch DIR`, which many destinations may share: the file name alone
    would let an update of another `vm.img` take over (and empty) the scratch that holds
    the only copy of an interrupted apply's staged pages. The destination's device and
    inode tell them apart, and stay the same while its journal does."""
    return f".{os.path.basename(dest)}.{st.st_dev:x}-{st.st_ino}.sparsepatch-scratch"


def device_scratch_name(rdev: int, size: int) -> str:
    """Named like a device's journal (journal.device_journal_name), for the same reasons."""
    return f"blockdev-{os.major(rdev)}-{os.minor(rdev)}-{size}.scratch"


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class Staged:
    """The pages the STAGE records list, in order (they ascend), with their hashes:
    24 bytes a page."""

    def __init__(self) -> None:
        self.pages = array("Q")
        self.hashes = bytearray()
        self.read = bytearray()  # per page: a MOVED page reads it (mark_read)

    def add(self, rec: Record) -> None:
        self.pages.extend(range(rec.first_block, rec.first_block + rec.count))
        self.hashes += rec.meta
        self.read.extend(bytes(rec.count))

    def mark_read(self, rec: Record) -> None:
        """Note the staged pages that DATA record rec's moved pages read."""
        if rec.moved_pages and self.pages:
            for s in rec.sources:
                i = self.find(s)
                if i >= 0:
                    self.read[i] = 1

    def check_read(self, name: str) -> None:
        """After the last record: every staged page is read by some moved page. Each costs
        the scratch 4096 bytes for the patch's 16: pages nothing reads would let a small
        patch fill the scratch's filesystem."""
        unused = self.read.find(0)
        if unused >= 0:
            page = self.pages[unused]
            raise FormatError(f"{name}: a STAGE record lists base page {page} (byte "
                              f"{page << PAGE_SHIFT}), which no MOVED page reads")

    def __len__(self) -> int:
        return len(self.pages)

    def find(self, page: int) -> int:
        """The index of base page `page` in the scratch, or -1 if it is not staged."""
        i = bisect.bisect_left(self.pages, page)
        return i if i < len(self.pages) and self.pages[i] == page else -1

    def hash(self, i: int) -> bytes:
        return bytes(self.hashes[i * HASH_LEN : (i + 1) * HASH_LEN])

    def runs(self, step: int = STAGE_STEP) -> list[tuple[int, int, int]]:
        """(first index, first page, count) of consecutive pages, at most step each."""
        out: list[tuple[int, int, int]] = []
        for i, p in enumerate(self.pages):
            if out and out[-1][1] + out[-1][2] == p and out[-1][2] < step:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
            else:
                out.append((i, p, 1))
        return out


class Scratch:
    """The scratch file of one destination: dir_fd, its folder held open; name, its name
    there; path, for messages. owners and not_files as for the journal (journal.Journal)."""

    def __init__(self, dir_fd: int, name: str, path: str, owners: frozenset[int],
                 not_files: dict[tuple[int, int], str] | None = None):
        self.dir_fd = dir_fd
        self.name = name
        self.path = path
        self.folder = os.path.dirname(path) or "."
        self.owners = owners
        self.not_files = not_files or {}
        self.fd: int | None = None

    def _trust(self, fd: int) -> None:
        st = os.fstat(fd)
        what = self.not_files.get((st.st_dev, st.st_ino))
        if what is not None:
            os.close(fd)
            raise UsageError(f"{self.path}: is {what}; the scratch must be another file")
        why = sparse.not_ours(fd, self.owners)
        if why is not None:
            os.close(fd)
            raise IOFailure(f"{self.path}: refusing the scratch: {why}")

    def open_existing(self, pages: int) -> None:
        """The scratch an interrupted run staged, which the journal says holds pages pages.
        Its pages are in it alone now (the run may have overwritten them in the
        destination): missing or cut short, it is refused."""
        fd = sparse.open_side(self.dir_fd, self.name, self.path, "scratch")
        if fd is None:
            raise WrongBase(
                f"{self.path}: the scratch of the interrupted apply is missing: it held "
                f"{pages} staged base pages ({mib(pages << PAGE_SHIFT)}) that the destination "
                "may no longer have; if the interrupted apply was given --scratch DIR, give it "
                "again; else restore it, or restore the destination to the base and delete the "
                "journal"
            )
        self._trust(fd)
        size = os.fstat(fd).st_size
        if size != pages << PAGE_SHIFT:
            os.close(fd)
            raise WrongBase(
                f"{self.path}: the scratch of the interrupted apply is {size} bytes, the journal "
                f"says {pages << PAGE_SHIFT} ({pages} pages): it was cut or replaced; restore it, "
                "or restore the destination to the base and delete the journal"
            )
        self.fd = fd

    def free(self) -> tuple[int, int]:
        """(bytes free for us in the scratch's folder, its st_dev)."""
        with io_errors(f"{self.folder}: cannot tell the free space for the scratch"):
            st = os.fstatvfs(self.dir_fd)
            dev = os.fstat(self.dir_fd).st_dev
        return st.f_bavail * st.f_frsize, dev

    def create(self, size: int) -> None:
        """An empty scratch, its space reserved. One left by a run killed before its first
        journal write (nothing depends on it) is checked and emptied."""
        fd = sparse.open_side(self.dir_fd, self.name, self.path, "scratch")
        if fd is not None:
            self._trust(fd)
        else:
            fd = sparse.create_side(self.dir_fd, self.name, self.path, "scratch")
        self.fd = fd
        try:
            sparse.set_size(fd, 0)
            if size:
                sparse.reserve(fd, 0, size)
        except OSError as e:
            self.remove()
            raise io_failure(e, f"{self.path}: cannot write the scratch ({mib(size)})") from None

    def write(self, index: int, data: bytes | memoryview) -> None:
        assert self.fd is not None
        try:
            sparse.pwrite_full(self.fd, data, index << PAGE_SHIFT)
        except OSError as e:
            self.remove()
            raise io_failure(e, f"{self.path}: cannot write the scratch") from None

    def sync(self) -> None:
        """The pages and the scratch's name durable: before the journal names it."""
        assert self.fd is not None
        with io_errors(f"{self.path}: cannot sync the scratch"):
            sparse.sync(self.fd)
            sparse.sync_dir(self.dir_fd)

    def read(self, index: int) -> bytes:
        assert self.fd is not None
        try:
            page = os.pread(self.fd, PAGE_SIZE, index << PAGE_SHIFT)
        except OSError as e:
            raise io_failure(e, f"{self.path}: cannot read the scratch") from None
        return page.ljust(PAGE_SIZE, b"\0")

    def remove(self) -> None:
        """Unlink the scratch this run opened or created, if the name still is that file."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with io_errors(f"{self.path}: cannot remove the scratch"):
            sparse.remove_side(self.dir_fd, self.name, fd)

    def remove_leftover(self) -> None:
        """Remove a scratch no journal names: left by a run stopped after removing its
        journal (the destination is the target) or before writing its first slot. Only one
        we would trust goes; anything else there is not ours to remove."""
        try:
            fd = sparse.open_side(self.dir_fd, self.name, self.path, "scratch")
        except IOFailure:
            return
        if fd is None:
            return
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in self.not_files or sparse.not_ours(fd, self.owners) is not None:
            os.close(fd)
            return
        self.fd = fd
        self.remove()

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd = None
        self.dir_fd = -1
