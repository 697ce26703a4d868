"""Moved pages on the apply side (spec/FORMAT.md, section 9.7): where the base page a MOVED
page names is read from, and the staging of the pages the patch overwrites before it reads
them. The Applier decides and writes blocks; a Stager answers "give me base page P" and,
before the first write, copies the staged pages into the scratch, durably.

A staged page is read from the destination (checked by its STAGE hash) until the scratch
holds it, from the scratch after that (checked again: the scratch can be damaged between
runs); any other moved page is read in place, where the rules keep it as the base had it."""

from __future__ import annotations

import os

from .destination import Destination
from .errors import IOFailure, WrongBase
from .format import PAGE_SHIFT, ZERO_PAGE, Record, page_hash
from .journal import Journal
from .scratch import Scratch, Staged, mib


class Stager:
    """The STAGE list of one reading of the patch and the scratch that holds its pages.
    resumed_pages: how many pages the interrupted run's scratch holds (-1: none, stage
    afresh); until the scratch holds the staged pages they are read from the destination,
    still the base there."""

    def __init__(self, dest: Destination, journal: Journal, scratch: Scratch | None,
                 resumed_pages: int = -1):
        self.dest = dest
        self.journal = journal
        self.scratch = scratch
        self.resumed_pages = resumed_pages
        self.ready = resumed_pages >= 0
        self.missing: set[int] = set()  # staged pages that were not the base's when staged
        self.scratch_bytes = 0
        self.restart()

    def restart(self) -> None:
        """A new reading of the patch: its STAGE records are read again."""
        self.staged = Staged()
        self.checked = False

    def add(self, rec: Record) -> None:
        self.staged.add(rec)

    def check_whole(self) -> None:
        """At the first record that is not STAGE: the STAGE list is whole. A resumed run's
        scratch must hold exactly its pages."""
        self.checked = True
        if self.resumed_pages >= 0 and self.resumed_pages != len(self.staged):
            where = self.scratch.path if self.scratch is not None else self.journal.path
            raise WrongBase(
                f"{where}: the interrupted apply staged {self.resumed_pages} pages, this patch "
                f"stages {len(self.staged)}; the journal does not belong to this patch's moves"
            )

    def page(self, page: int, rec: Record) -> bytes | bytearray:
        """Base page `page`, the source of a moved page of rec."""
        i = self.staged.find(page)
        if i < 0:
            return self.dest.read_pages(page)
        off = page << PAGE_SHIFT
        if not self.ready:
            data = self.dest.read_pages(page)
            if page_hash(data) != self.staged.hash(i):
                raise WrongBase(
                    f"{self.dest.name}: base page at byte {off}, which the patch stages, does not "
                    f"hold the base's content: it is not the patch's base ({rec.where()})"
                )
            return data
        if i in self.missing:
            raise WrongBase(
                f"{self.dest.name}: base page at byte {off}, which the patch stages, did not hold "
                f"the base's content when it was staged: it is not the patch's base ({rec.where()})"
            )
        assert self.scratch is not None
        staged = self.scratch.read(i)
        if page_hash(staged) != self.staged.hash(i):
            raise WrongBase(
                f"{self.scratch.path}: staged page {i} (base page at byte {off}) does not hold "
                f"the content it was staged with: the scratch was damaged ({rec.where()})"
            )
        return staged

    def pins(self, rec: Record, shift: int) -> frozenset[int]:
        """The blocks after rec whose pages rec's moved pages read in place (not staged):
        they must be durable before such a block is overwritten."""
        if not rec.moved_pages:
            return frozenset()
        down = shift - PAGE_SHIFT
        end = rec.first_block + rec.count
        return frozenset(s >> down for s in rec.sources
                         if s >> down >= end and self.staged.find(s) < 0)

    def stage(self, growth: int) -> None:
        """Copy the staged base pages into the scratch, durably, before the first write:
        room first (with growth, the bytes the destination will grow by, when it shares the
        scratch's filesystem), then each page read and checked by its STAGE hash (one that
        differs is noted missing: the destination may already be the target there), then
        the scratch synced and named in every journal slot from now on."""
        n = len(self.staged)
        self.ready = True
        if not n:
            return
        scratch = self.scratch
        assert scratch is not None
        size = self.dest.size()
        last = self.staged.pages[-1]
        if last << PAGE_SHIFT >= size:
            # Not there, so not the base's: only a destination already the target (cut to
            # its size) lacks them, and that one has nothing to write.
            raise WrongBase(f"{self.dest.name}: is {size} bytes, but the patch stages its base "
                            f"page at byte {last << PAGE_SHIFT}: it is not the patch's base")
        need = n << PAGE_SHIFT
        free, dev = scratch.free()
        growth = growth if dev == os.fstat(self.dest.fd).st_dev else 0
        if free < need + growth:
            also = f" (and {mib(growth)} for {self.dest.name} to grow)" if growth else ""
            raise IOFailure(f"apply: scratch needs {mib(need)}{also} in {scratch.folder}, "
                            f"{mib(free)} free")
        scratch.create(need)
        for i, page, count in self.staged.runs():
            buf = self.dest.read_pages(page, count)
            view = memoryview(buf)
            for j in range(count):
                piece = view[j << PAGE_SHIFT : (j + 1) << PAGE_SHIFT]
                if page_hash(piece) != self.staged.hash(i + j):
                    self.missing.add(i + j)
                    piece[:] = ZERO_PAGE
            scratch.write(i, memoryview(buf))
        scratch.sync()
        self.journal.scratch_pages = n
        self.scratch_bytes = need

    def finish(self) -> None:
        """After the journal is gone: the scratch goes too (a leftover one no journal names
        as well, when this run found its pages staged already)."""
        if self.scratch is None:
            return
        if self.scratch.fd is None and len(self.staged):
            self.scratch.remove_leftover()
        self.scratch.remove()
