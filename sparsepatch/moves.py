"""Moved content for diff (spec/FORMAT.md 5.4): where each page of a changed target block
comes from. Pure: it sees page hashes, never a file.

A page of a changed DATA block is ZERO (all zeros), SAME (the base page at the same offset
has its hash), MOVED (some base page has its hash) or LITERAL (carried in the payload). The
source of a moved page is a base page whose block the patch leaves unchanged if there is
one, else the lowest base page with that hash. apply writes blocks in ascending order, so a
source in a block the patch changes is read in place if that block lies after the target
block, and staged (copied aside before the first write) if it lies at or before it.

Memory is in proportion to the change: the index holds only the hashes the changed blocks
want, filled by one pass over the base's page hashes."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .format import HASH_LEN, PAGE_LITERAL, PAGE_MOVED, PAGE_SAME, PAGE_SHIFT, PAGE_ZERO, ZERO_HASH


@dataclass
class PagePlan:
    """What diff decided for the pages of its DATA blocks: kinds and moved sources per
    block, and the base pages to stage (ascending, with their hashes)."""

    kinds: dict[int, bytes] = field(default_factory=dict)
    sources: dict[int, array] = field(default_factory=dict)
    stage: dict[int, bytes] = field(default_factory=dict)  # base page -> its hash
    # Per block, the changed blocks after it whose pages it reads in place: no record may
    # change them before the block is written (diff ends a DATA record before one).
    ahead: dict[int, set[int]] = field(default_factory=dict)
    moved: int = 0
    same: int = 0

    def stage_runs(self, limit: int) -> list[tuple[int, int, bytes]]:
        """(first page, count, hashes) of consecutive staged pages, at most limit each."""
        out: list[tuple[int, int, bytes]] = []
        for page in sorted(self.stage):
            h = self.stage[page]
            if out and out[-1][0] + out[-1][1] == page and out[-1][1] < limit:
                first, count, hashes = out[-1]
                out[-1] = (first, count + 1, hashes + h)
            else:
                out.append((page, 1, h))
        return out


def find_sources(wanted: set[bytes], base_pages: Iterable[tuple[int, bytes]],
                 changed: Callable[[int], bool], shift: int) -> dict[bytes, int]:
    """For each wanted page hash, its source page in the base: the first page in a block
    the patch leaves unchanged, else the first page. base_pages: (page number, hash),
    ascending."""
    down = shift - PAGE_SHIFT
    best: dict[bytes, int] = {}
    settled: set[bytes] = set()  # hashes whose source lies in an unchanged block
    for page, h in base_pages:
        if h not in wanted or h in settled:
            continue
        if not changed(page >> down):
            best[h] = page
            settled.add(h)
            if len(settled) == len(wanted):
                break
        elif h not in best:
            best[h] = page
    return best


def classify(plan: PagePlan, block: int, target_pages: bytes, base_pages: bytes,
             sources: dict[bytes, int], changed: Callable[[int], bool], shift: int) -> None:
    """Page kinds of changed target block `block` (target_pages: its page hashes; base_pages:
    the base block's at the same offset, ZERO_HASH for a hole) into plan."""
    per = len(target_pages) // HASH_LEN
    down = shift - PAGE_SHIFT
    kinds = bytearray(per)
    src = array("Q")
    for p in range(per):
        h = target_pages[p * HASH_LEN : (p + 1) * HASH_LEN]
        if h == ZERO_HASH:
            kinds[p] = PAGE_ZERO
        elif h == base_pages[p * HASH_LEN : (p + 1) * HASH_LEN]:
            kinds[p] = PAGE_SAME
            plan.same += 1
        elif h in sources:
            s = sources[h]
            kinds[p] = PAGE_MOVED
            src.append(s)
            plan.moved += 1
            if changed(s >> down):
                if s >> down <= block:
                    plan.stage[s] = h
                else:
                    plan.ahead.setdefault(block, set()).add(s >> down)
        else:
            kinds[p] = PAGE_LITERAL
    plan.kinds[block] = bytes(kinds)
    if src:
        plan.sources[block] = src
