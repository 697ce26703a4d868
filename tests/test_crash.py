"""Power cuts during apply, from the crash-state explorer (tests/crashsim.py): a sample of
the states `make crashtest` explores, and proof that the explorer notices a missing
journal write or sync."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import crashsim as cs
import pytest

SAMPLE_STATES = 1000


@pytest.fixture
def root() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="crashsim.", dir=cs.work_root())
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_sample_of_crash_states_all_resume_to_the_target() -> None:
    lines: list[str] = []
    res = cs.run_all(seed=7, variants=4, nested=2, nested_variants=2, out=lines.append)
    assert not res.failures, "\n".join(res.failures[:10])
    assert res.states >= SAMPLE_STATES, "\n".join(lines)
    # Runs interrupted while resuming were explored too.
    assert res.logs > len(cs.scenarios())


def test_the_log_holds_everything_apply_did(root: str) -> None:
    """Replaying the whole log must give the files apply left: nothing it changed bypassed
    sparse.py, or the explorer would rebuild states that never existed."""
    for name in ("grow-16k-tight", "shrink-4k-tight", "firstcopy-16k-default"):
        case = cs.setup(cs.scenario(name), root)
        log = cs.record(case, cs.initial_state(case), None)
        kinds = {op.kind for op in log.ops}
        assert {"write", "sync", "syncdir", "create", "unlink"} <= kinds, kinds
        replayed = log.state(len(log.ops), {})
        assert replayed == {p: cs.snapshot(p) for p in replayed}, name


def test_a_state_holds_only_what_was_made_durable(root: str) -> None:
    """The model itself: before a sync a write may be lost or torn, after it it is kept;
    a file created in an unsynced folder may be gone."""
    case = cs.setup(cs.scenario("firstcopy-16k-tight"), root)
    log = cs.record(case, cs.initial_state(case), None)
    first_write = next(i for i, op in enumerate(log.ops)
                       if op.kind == "write" and op.path == case.dest)
    k = first_write + 1
    units = log.pending(k)
    assert (0, -1) not in units  # the journal's create: synced with its folder
    page = next(u for u in units if u[0] == first_write and u[1] >= 0)
    torn = log.state(k, {page: 0b1})[case.dest]  # one sector of one page reached the disk
    assert torn is not None
    got = torn.pages[page[1]]
    data = log.ops[first_write].data
    start = page[1] * cs.PAGE - log.ops[first_write].off
    assert got[: cs.SECTOR] == data[start : start + cs.SECTOR]
    assert got[cs.SECTOR :] == bytes(cs.PAGE - cs.SECTOR)
    sync = next(i for i in range(k, len(log.ops))
                if log.ops[i].kind == "sync" and log.ops[i].path == case.dest)
    assert not [u for u in log.pending(sync + 1) if u[0] == first_write]
    # Before the journal's folder is synced, its creation can be lost.
    create = next(i for i, op in enumerate(log.ops) if op.kind == "create" and op.path != case.dest)
    assert (create, -1) in log.pending(create + 1)
    assert log.state(create + 1, {(create, -1): 0})[log.ops[create].path] is None


# What a bug would be: each drops one call of the real code, by who makes it.
REMOVALS = {
    "journal write": lambda fn, caller: fn == "pwrite_full" and caller == "sparsepatch.journal:write",
    "journal fsync": lambda fn, caller: fn == "sync" and caller == "sparsepatch.journal:write",
    "fdatasync before the window moves": (
        lambda fn, caller: fn == "sync_data" and caller == "sparsepatch.destination:sync_data"),
    "journal folder fsync": lambda fn, caller: fn == "sync_dir" and caller == "sparsepatch.journal:write",
    "final fsync": lambda fn, caller: fn == "sync" and caller == "sparsepatch.destination:finish",
}


# apply --undo: the base content of a block must be durable in the spool before the block
# is written, the spool's name in its folder, and UNDO's name before the journal goes.
UNDO_REMOVALS = {
    "undo spool fsync": lambda fn, caller: fn == "sync" and caller == "sparsepatch.undo:sync",
    "undo spool folder fsync": lambda fn, caller: fn == "sync_dir" and caller == "sparsepatch.undo:_create",
    "undo rename folder fsync": lambda fn, caller: fn == "sync_dir" and caller == "sparsepatch.undo:finish",
}
REMOVALS.update(UNDO_REMOVALS)

# Moved content: the staged base pages must be durable in the scratch, and its name in the
# folder, before the journal names the scratch and the first block they came from is written.
MOVE_REMOVALS = {
    "scratch fsync": lambda fn, caller: fn == "sync" and caller == "sparsepatch.scratch:sync",
    "scratch folder fsync": lambda fn, caller: fn == "sync_dir" and caller == "sparsepatch.scratch:sync",
}
REMOVALS.update(MOVE_REMOVALS)


@pytest.mark.parametrize(("name", "removed"), [
    *(("inplace-16k-tight", r) for r in sorted(REMOVALS)
      if r not in UNDO_REMOVALS and r not in MOVE_REMOVALS),
    *(("moves-16k-tight-scratch-elsewhere", r) for r in sorted(MOVE_REMOVALS)),
    *(("inplace-16k-tight-undo-elsewhere", r) for r in sorted(UNDO_REMOVALS)),
    # At 4 KiB a block is one page: only a torn sector makes it neither base nor target.
    *(("stream-4k-tight", r)
      for r in ("journal write", "journal fsync", "fdatasync before the window moves")),
])
def test_the_explorer_fails_when_a_write_or_sync_is_removed(root: str, removed: str, name: str) -> None:
    case = cs.setup(cs.scenario(name), root)
    res = cs.explore(case, seed=3, variants=8, nested=3, nested_variants=3,
                     drop=REMOVALS[removed], stop_on_failure=True)
    assert res.failures, f"{res.states} states explored without {removed}, and none failed"
    assert f"{name}:3:" in res.failures[0]  # names what to replay


def test_the_same_exploration_passes_with_every_write_and_sync(root: str) -> None:
    """The control for the test above: its failures come from the removal alone."""
    for name in ("inplace-16k-tight", "stream-4k-tight", "inplace-16k-tight-undo-elsewhere"):
        case = cs.setup(cs.scenario(name), root)
        res = cs.explore(case, seed=3, variants=8, nested=3, nested_variants=3)
        assert not res.failures, res.failures[:3]
        assert res.states >= 100


def test_shrink_truncated_before_its_last_zero_block_was_punched(root: str) -> None:
    """A power cut keeps the final truncate of a shrink but loses the punch of the last,
    partial block before it: the resume must still leave a hole there, not a page of zeros
    (a punch clipped at the end of file stops inside the page)."""
    case = cs.setup(cs.scenario("shrink-4k-tight"), root)
    log = cs.record(case, cs.initial_state(case), None)
    trunc = next(i for i, op in enumerate(log.ops) if op.kind == "truncate")
    size = log.ops[trunc].length
    assert size % cs.PAGE
    last = size // cs.PAGE
    punch = max(i for i, op in enumerate(log.ops[:trunc])
                if op.kind == "punch" and op.off <= last * cs.PAGE < op.off + op.length)
    st = log.state(trunc + 1, {(punch, last): 0})
    cs.materialize(st)
    assert case.resume() is None
    assert last not in (cs.snapshot(case.dest) or cs.Image(0, {})).pages
    assert not os.path.exists(os.path.join(case.folder, ".dest.img.sparsepatch-journal"))


def test_a_first_copy_survives_a_power_cut_once_apply_returned(root: str) -> None:
    """With the journal in another folder (--journal, as a block device's is), nothing
    else syncs the new destination's name into its folder: a power cut after apply
    reported success could lose the whole file."""
    case = cs.setup(cs.scenario("firstcopy-16k-tight-journal-elsewhere"), root)
    res = cs.explore(case, seed=5, variants=3, nested=0, nested_variants=0)
    assert not res.failures, res.failures[:3]
