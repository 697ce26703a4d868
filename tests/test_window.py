"""The journal window protocol (spec/FORMAT.md 9.4) on its own: a fake journal and a fake
sync, no file at all. Each test states a rule a crash relies on."""

from __future__ import annotations

from sparsepatch.window import JOURNAL_LOOKAHEAD, PUNCH_COST, SYNC_BUDGET, WriteWindow

SHIFT = 16  # 64 KiB blocks
BS = 1 << SHIFT
IDS = (b"B" * 16, b"T" * 16)


class FakeJournal:
    def __init__(self) -> None:
        self.slots: list[tuple[int, int]] = []

    def write(self, base: bytes, target: bytes, start: int, end: int) -> None:
        assert (base, target) == IDS
        self.slots.append((start, end))


class Log:
    """Records syncs and journal writes in the order they happen."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.journal = FakeJournal()
        orig = self.journal.write

        def write(base: bytes, target: bytes, start: int, end: int) -> None:
            orig(base, target, start, end)
            self.events.append((start, end))

        self.journal.write = write  # type: ignore[method-assign]

    def sync(self) -> None:
        self.events.append("sync")


def window(log: Log, accepted: tuple[int, int] | None = None) -> WriteWindow:
    return WriteWindow(log.journal, IDS, log.sync, SHIFT, accepted)


def test_journal_names_a_write_before_it_happens_and_reaches_ahead() -> None:
    log = Log()
    w = window(log)
    w.cover(10, 12)
    assert log.events == [(10, 10 + (JOURNAL_LOOKAHEAD >> SHIFT))]
    w.wrote(2 * BS)
    w.cover(20, 21)  # inside: no journal write, no sync
    assert len(log.events) == 1


def test_window_keeps_unsynced_writes_until_the_budget_forces_a_sync() -> None:
    log = Log()
    w = window(log)
    lookahead = JOURNAL_LOOKAHEAD >> SHIFT
    w.cover(0, 1)
    w.wrote(BS)
    far = lookahead + 100
    w.cover(far, far + 1)
    # Below the budget the new window must still start at block 0: that write is not durable.
    assert log.events[-1] == (0, far + lookahead)
    assert "sync" not in log.events
    w.wrote(SYNC_BUDGET)
    further = far + 2 * lookahead
    w.cover(further, further + 1)
    # The sync comes before the journal stops naming the old writes.
    assert log.events[-2:] == ["sync", (further, further + lookahead)]
    assert w.unsynced == 0


def test_planned_window_ends_where_the_budget_runs_out() -> None:
    log = Log()
    w = window(log)
    step = (SYNC_BUDGET // 4) >> SHIFT  # blocks per record: four records fill the budget
    for k in range(8):
        w.plan(k * 1000, k * 1000 + step, step << SHIFT)
    w.cover(0, step)
    assert log.events == [(0, 3000 + step)]


def test_punches_cost_little_in_the_plan() -> None:
    log = Log()
    w = window(log)
    for k in range(10):
        w.plan(k * 100, k * 100 + 50, PUNCH_COST)
    w.cover(0, 50)
    assert log.events == [(0, 950)]


def test_interrupted_window_ahead_is_kept_in_every_new_window() -> None:
    log = Log()
    w = window(log, accepted=(500, 600))
    assert w.accepts(500) and w.accepts(599) and not w.accepts(600) and not w.accepts(499)
    w.cover(10, 11)
    start, end = log.events[-1]  # type: ignore[misc]
    assert start <= 10 and end >= 600
    assert not w.may_release(10)  # its torn blocks are not repaired yet
    assert w.may_release(600)


def test_interrupted_window_behind_is_synced_before_it_is_dropped() -> None:
    log = Log()
    w = window(log, accepted=(0, 10))
    w.cover(20, 21)
    assert log.events[0] == "sync"
    assert log.events[1] == (20, 20 + (JOURNAL_LOOKAHEAD >> SHIFT))


def test_nothing_to_release_without_any_journal() -> None:
    log = Log()
    w = window(log)
    assert not w.may_release(0)
    w.cover(0, 1)
    assert w.may_release(0)
