"""The journal window of an apply (spec/FORMAT.md, 9.4): which block range the journal names
as possibly being written, when it moves, and when the destination must be synced first.
No file access of its own: it is given a journal to write and a callable that makes the
destination's writes durable (and checks them), so it can be tested with neither."""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable
from typing import Protocol

SYNC_BUDGET = 64 << 20  # bytes written between two fdatasyncs of the destination
JOURNAL_LOOKAHEAD = 64 << 20  # without a plan, how far past a write a journal window reaches
PUNCH_COST = 4096  # a punch is metadata: cheap, but not free to make durable


class JournalSlots(Protocol):
    """What the window needs of the journal: writing a slot durably."""

    def write(self, base: bytes, target: bytes, start: int, end: int) -> None: ...


class WriteWindow:
    """Owns the window [start, end) of blocks the journal names, the bytes written since the
    destination was last synced, and the plan of where this run's writes lie.

    The window must hold every block written since the last sync (those may be torn or
    lost). So it starts at the first such write, and moves on only after a sync, once
    SYNC_BUDGET bytes were written; its end reaches as far as the writes the budget will
    allow, read from the plan when a dry run made one. Windows then change once per budget,
    not once per scattered record (each change costs a journal fsync)."""

    def __init__(self, journal: JournalSlots, identities: tuple[bytes, bytes],
                 sync: Callable[[], None], shift: int, accepted: tuple[int, int] | None = None):
        self.journal = journal
        self.identities = identities
        self.sync = sync
        self.shift = shift
        self.accepted = accepted  # the window an interrupted run left, if any
        self.current: tuple[int, int] | None = None  # what this run wrote to the journal last
        self.unsynced = 0  # bytes written since the last sync
        # From the dry run, the write span of each record that writes: (first, end, bytes).
        self.plan_first, self.plan_end, self.plan_bytes = array("Q"), array("Q"), array("Q")

    def plan(self, first: int, end: int, nbytes: int) -> None:
        """Note that a record will write blocks [first, end), nbytes of them (in order)."""
        self.plan_first.append(first)
        self.plan_end.append(end)
        self.plan_bytes.append(nbytes)

    def wrote(self, nbytes: int) -> None:
        self.unsynced += nbytes

    def accepts(self, block: int) -> bool:
        """Whether the interrupted run's window vouches for block (it may be torn)."""
        return self.accepted is not None and self.accepted[0] <= block < self.accepted[1]

    def cover(self, first: int, end: int) -> None:
        """Make sure the journal names [first, end) before anything there is written."""
        if self.current is not None and self.current[0] <= first and end <= self.current[1]:
            return
        if self.current is None and self.accepted is not None and self.accepted[1] <= first:
            # This run's first window would drop the interrupted run's, whose writes may not
            # be durable yet (its blocks read as target from the page cache): sync them first.
            self.sync()
        start = first if self.current is None else self.current[0]
        if self.unsynced >= SYNC_BUDGET:
            self.sync()  # durable before the window stops covering it
            self.unsynced = 0
            start = first
        end = max(end, self._horizon(first))
        if self.accepted is not None and self.accepted[1] > first:
            # Part of an interrupted run's window is still ahead of us: keep accepting it if
            # this run is interrupted too, or its torn blocks would be refused next time.
            start, end = min(start, self.accepted[0]), max(end, self.accepted[1])
        self.current = (start, end)
        self.journal.write(*self.identities, start, end)

    def _horizon(self, first: int) -> int:
        """End of the writes, from first on, that fit in what is left of the sync budget."""
        if not self.plan_first:
            return first + (JOURNAL_LOOKAHEAD >> self.shift)
        k = bisect.bisect_left(self.plan_first, first)
        budget = SYNC_BUDGET - self.unsynced
        end = first + 1
        while k < len(self.plan_first) and budget > 0:
            end = max(end, self.plan_end[k])
            budget -= self.plan_bytes[k]
            k += 1
        return end

    def may_release(self, at: int) -> bool:
        """After a refusal at block `at` (raised before its record wrote anything): whether
        the journal may go. Not while an interrupted run's window lies ahead, not yet
        repaired; and there is nothing to remove if neither run wrote one."""
        if self.accepted is not None and self.accepted[1] > at:
            return False
        return self.current is not None or self.accepted is not None
