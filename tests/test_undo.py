"""apply --undo: the undo patch it writes leads back to the base bit for bit (and as sparse),
is an ordinary patch (info, verify, -k), and stays complete and valid when apply is killed
and run again."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from conftest import KiB, MiB, allocated_blocks, error_line, make_sparse, pattern, run_cli
from test_resume import CLI, _duration, _kill_after, _kill_when, clone, same_bytes

# name: (base size, base extents, target size, target extents)
CASES = {
    "in-place": (8 * MiB + 1234, [(0, MiB), (3 * MiB, 2 * MiB), (7 * MiB, MiB)],
                 8 * MiB + 1234, [(0, 512 * KiB), (3 * MiB, pattern(MiB, 5)), (5 * MiB, 2 * MiB)]),
    "grow": (4 * MiB + 7, [(0, 512 * KiB), (2 * MiB, MiB), (4 * MiB, 7)],
             9 * MiB + 99, [(0, pattern(512 * KiB, 1)), (3 * MiB, MiB), (6 * MiB, 3 * MiB)]),
    # The tail the shrink cuts off has a block with a hole page between two data pages.
    "shrink": (9 * MiB + 99, [(0, 512 * KiB), (3 * MiB, MiB), (5 * MiB, 4 * KiB),
                              (5 * MiB + 8 * KiB, 4 * KiB), (6 * MiB, 3 * MiB + 99)],
               4 * MiB + 7, [(0, pattern(512 * KiB, 9)), (2 * MiB, MiB)]),
}


def make_pair(tmp: Path, case: str) -> tuple[Path, Path, Path]:
    """base, target and the patch between them."""
    bsize, bext, tsize, text = CASES[case]
    base = make_sparse(tmp / "base.img", bsize, bext)
    target = make_sparse(tmp / "target.img", tsize, text)
    run_cli("signature", str(base), "-o", str(tmp / "base.sig"))
    run_cli("diff", str(tmp / "base.sig"), str(target), "-o", str(tmp / "update.patch"))
    return base, target, tmp / "update.patch"


BS = 16 * KiB  # the default block size: the unit apply writes and punches


def assert_is_base(dest: Path, base: Path) -> None:
    assert same_bytes(dest, base)
    # Holes where the base had them: no block allocated that the base had as a hole.
    assert allocated_blocks(dest, BS) <= allocated_blocks(base, BS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_undo_restores_the_base_bit_for_bit_and_sparse(tmp: Path, case: str) -> None:
    base, target, patch = make_pair(tmp, case)
    dest, undo = tmp / "dest.img", tmp / "update.undo"
    clone(base, dest)
    run_cli("apply", str(patch), str(dest), "--undo", str(undo))
    assert same_bytes(dest, target)
    assert [n for n in os.listdir(tmp) if "sparsepatch" in n] == []  # no spool, no journal left

    info = json.loads(run_cli("info", str(undo), "--json").stdout)
    pinfo = json.loads(run_cli("info", str(patch), "--json").stdout)
    assert (info["base_size"], info["target_size"]) == (pinfo["target_size"], pinfo["base_size"])
    assert info["base_identity"] == pinfo["target_identity"]
    assert info["target_identity"] == pinfo["base_identity"]
    assert info["records"]["copy"] == 0
    run_cli("verify", str(undo))

    run_cli("apply", str(undo), str(dest), "--verify")
    assert_is_base(dest, base)
    # And forward again: the patch applies to the restored image.
    run_cli("apply", str(patch), str(dest), "--verify")


def test_undo_from_a_patch_on_stdin(tmp: Path) -> None:
    base, target, patch = make_pair(tmp, "shrink")
    dest, undo = tmp / "dest.img", tmp / "update.undo"
    clone(base, dest)
    with open(patch, "rb") as f:
        r = subprocess.run(CLI + ["apply", "-", str(dest), "--undo", str(undo)], stdin=f,
                           capture_output=True)
    assert r.returncode == 0, r.stderr
    assert same_bytes(dest, target)
    run_cli("apply", str(undo), str(dest))
    assert_is_base(dest, base)


def test_undo_is_authenticated_with_the_patch_key(tmp: Path) -> None:
    base, target, _ = make_pair(tmp, "grow")
    key, other = tmp / "key", tmp / "other"
    key.write_bytes(os.urandom(32))
    other.write_bytes(os.urandom(32))
    patch = tmp / "signed.patch"
    run_cli("diff", str(tmp / "base.sig"), str(target), "-o", str(patch), "-k", str(key))
    dest, undo = tmp / "dest.img", tmp / "signed.undo"
    clone(base, dest)
    run_cli("apply", str(patch), str(dest), "-k", str(key), "--undo", str(undo))
    assert json.loads(run_cli("info", str(undo), "--json").stdout)["authenticated"] is True
    run_cli("verify", str(undo), "-k", str(key))
    assert "MAC" in error_line(run_cli("verify", str(undo), "-k", str(other), check=False), 4)
    error_line(run_cli("apply", str(undo), str(dest), check=False), 4)  # no key: refused
    assert same_bytes(dest, target)
    run_cli("apply", str(undo), str(dest), "-k", str(key))
    assert_is_base(dest, base)


def test_undo_of_a_full_patch_is_refused(tmp: Path) -> None:
    _, target, _ = make_pair(tmp, "grow")
    full = tmp / "full.patch"
    run_cli("diff", "--full", str(target), "-o", str(full))
    r = run_cli("apply", str(full), str(tmp / "new.img"), "--undo", str(tmp / "u"), check=False)
    assert "full patch" in error_line(r, 2)
    assert not (tmp / "new.img").exists() and not (tmp / "u").exists()


def test_undo_when_already_the_target_is_refused_unless_undo_exists(tmp: Path) -> None:
    base, target, patch = make_pair(tmp, "in-place")
    dest, undo = tmp / "dest.img", tmp / "update.undo"
    clone(target, dest)
    r = run_cli("apply", str(patch), str(dest), "--undo", str(undo), check=False)
    assert "nothing to undo" in error_line(r, 2)
    assert not undo.exists()
    # A repeated apply --undo after one that finished keeps its undo as it is.
    clone(base, dest)
    run_cli("apply", str(patch), str(dest), "--undo", str(undo))
    first = undo.read_bytes()
    run_cli("apply", str(patch), str(dest), "--undo", str(undo))
    assert undo.read_bytes() == first
    run_cli("apply", str(undo), str(dest))
    assert_is_base(dest, base)


def test_undo_refused_before_writing_when_blocks_were_written_without_it(tmp: Path) -> None:
    """An update half done by a run without --undo: the base content of what it wrote is
    gone, so an undo cannot be made; the destination is left as it was."""
    base, target, patch = make_pair(tmp, "in-place")
    dest, undo = tmp / "dest.img", tmp / "update.undo"
    clone(base, dest)
    with open(target, "rb") as t, open(dest, "r+b") as d:  # the first MiB already updated
        d.write(t.read(MiB))
    before = dest.read_bytes()
    r = run_cli("apply", str(patch), str(dest), "--undo", str(undo), check=False)
    assert "no undo spool" in error_line(r, 5)
    assert dest.read_bytes() == before
    assert not undo.exists()
    run_cli("apply", str(patch), str(dest))  # without --undo it goes on
    assert same_bytes(dest, target)


def test_undo_must_not_replace_the_destination_or_go_to_stdout(tmp: Path) -> None:
    base, _, patch = make_pair(tmp, "in-place")
    dest = tmp / "dest.img"
    clone(base, dest)
    error_line(run_cli("apply", str(patch), str(dest), "--undo", str(dest), check=False), 2)
    error_line(run_cli("apply", str(patch), str(dest), "--undo", "-", check=False), 2)
    assert same_bytes(dest, base)


@pytest.fixture(scope="module")
def bigpair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """A 160 MiB base and a shrunk target (the tail holds data), ~60 MiB of it rewritten,
    some blocks punched: a run long enough to be killed in the middle of."""
    d = tmp_path_factory.mktemp("undo")
    bext: list[tuple[int, bytes | int]] = [(i * 8 * MiB, 3 * MiB) for i in range(20)]
    text: list[tuple[int, bytes | int]] = []
    for i in range(16):
        if i % 4 == 1:
            text.append((i * 8 * MiB, 3 * MiB))  # unchanged
        elif i % 4:
            text.append((i * 8 * MiB, pattern(3 * MiB, 500 + i)))  # rewritten; i % 4 == 0: punched
    base = make_sparse(d / "base.img", 160 * MiB + 321, bext)
    target = make_sparse(d / "target.img", 128 * MiB + 5, text)
    run_cli("signature", str(base), "-o", str(d / "base.sig"))
    run_cli("diff", str(d / "base.sig"), str(target), "-o", str(d / "update.patch"))
    return d, base, target, d / "update.patch"


def _spools(folder: Path) -> list[Path]:
    return [folder / n for n in os.listdir(folder) if n.endswith(".sparsepatch-undo")]


@pytest.mark.slow
def test_apply_undo_killed_at_random_moments_then_rerun(bigpair: tuple[Path, Path, Path, Path],
                                                        tmp: Path) -> None:
    _, base, target, patch = bigpair
    dest, undo = tmp / "dest.img", tmp / "update.undo"
    args = ["apply", str(patch), str(dest), "--undo", str(undo)]
    clone(base, dest)
    whole = _duration(args)
    rng = random.Random(20261130)
    interrupted = torn = 0
    for trial in range(6):
        clone(base, dest)
        if undo.exists():
            undo.unlink()
        for _ in range(1 + trial % 2):
            interrupted += _kill_after(args, whole * rng.uniform(0.1, 1.0))
        if trial % 3 == 2:  # once for sure while the spool is being written
            interrupted += _kill_when(args, lambda: bool(_spools(tmp)), rng.uniform(0, 0.3 * whole))
        spools = _spools(tmp)
        if spools and trial % 2:
            with open(spools[0], "ab") as f:  # a record torn by the kill
                f.write(os.urandom(rng.randrange(1, 3000)))
            torn += 1
        r = run_cli(*args)
        assert b"Traceback" not in r.stderr
        assert same_bytes(dest, target)
        assert not _spools(tmp)
        run_cli("verify", str(undo))
        run_cli("apply", str(undo), str(dest))
        assert_is_base(dest, base)
    assert interrupted >= 3, interrupted
    assert torn >= 1, torn


@pytest.mark.slow
def test_rerun_without_the_spool_is_refused_and_leaves_the_destination(
        bigpair: tuple[Path, Path, Path, Path], tmp: Path) -> None:
    _, base, target, patch = bigpair
    dest, undo = tmp / "dest.img", tmp / "update.undo"
    args = ["apply", str(patch), str(dest), "--undo", str(undo)]
    clone(base, dest)
    for _ in range(20):  # until a kill lands after some blocks were written
        clone(base, dest)
        for s in _spools(tmp):
            s.unlink()
        _kill_when(args, lambda: any(n.endswith("journal") for n in os.listdir(tmp)), 0.05)
        if not same_bytes(dest, base) and _spools(tmp):
            break
    else:
        pytest.fail("no kill landed while apply was writing")
    for s in _spools(tmp):
        s.unlink()
    before = dest.read_bytes()
    r = run_cli(*args, check=False)
    assert "no undo spool" in error_line(r, 5)
    assert dest.read_bytes() == before and not undo.exists()
    run_cli("apply", str(patch), str(dest))
    assert same_bytes(dest, target)


def test_spool_of_another_patch_is_refused_and_kept(tmp: Path) -> None:
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    base_a, _, patch_a = make_pair(tmp / "a", "grow")
    base_b, _, patch_b = make_pair(tmp / "b", "in-place")
    clone(base_a, tmp / "a.img")
    run_cli("apply", str(patch_a), str(tmp / "a.img"), "--undo", str(tmp / "a.undo"))
    spool = tmp / ".b.undo.sparsepatch-undo"
    spool.write_bytes((tmp / "a.undo").read_bytes())  # as if left by an interrupted apply of A
    clone(base_b, tmp / "b.img")
    r = run_cli("apply", str(patch_b), str(tmp / "b.img"), "--undo", str(tmp / "b.undo"), check=False)
    assert "another patch" in error_line(r, 5)
    assert same_bytes(tmp / "b.img", base_b)
    assert spool.read_bytes() == (tmp / "a.undo").read_bytes()


def test_spool_of_the_same_update_under_another_key_is_refused_and_kept(tmp: Path) -> None:
    """Two signed copies of one update: a spool the first left is the only copy of base
    content it already overwrote; applying the second must not wipe it."""
    base, target, _ = make_pair(tmp, "in-place")
    k1, k2 = tmp / "k1", tmp / "k2"
    k1.write_bytes(os.urandom(32))
    k2.write_bytes(os.urandom(32))
    p1, p2 = tmp / "p1", tmp / "p2"
    run_cli("diff", str(tmp / "base.sig"), str(target), "-o", str(p1), "-k", str(k1))
    run_cli("diff", str(tmp / "base.sig"), str(target), "-o", str(p2), "-k", str(k2))
    done = tmp / "done.img"
    clone(base, done)
    run_cli("apply", str(p1), str(done), "-k", str(k1), "--undo", str(tmp / "u1"))
    spool = tmp / ".u.sparsepatch-undo"
    spool.write_bytes((tmp / "u1").read_bytes())  # as an interrupted apply of p1 leaves it
    dest = tmp / "dest.img"
    clone(base, dest)
    r = run_cli("apply", str(p2), str(dest), "-k", str(k2), "--undo", str(tmp / "u"), check=False)
    assert "another key" in error_line(r, 5)
    assert spool.read_bytes() == (tmp / "u1").read_bytes()
    assert same_bytes(dest, base)


SHRINK_THEN_DIE = """
import os, sys
import sparsepatch, sparsepatch.undo as u
u.Undo.finish = lambda self: os._exit(137)  # killed after the cut, before UNDO is written
sparsepatch.apply(sys.argv[1], sys.argv[2], undo=sys.argv[3])
"""


def test_shrink_with_nothing_to_record_resumes_to_a_complete_undo(tmp: Path) -> None:
    """The cut-off tail is all holes and the patch has no records: the spool holds nothing,
    yet it must exist before the cut, or a rerun takes the short file for the target."""
    base = make_sparse(tmp / "base.img", 8 * MiB, [(0, MiB)])
    target = make_sparse(tmp / "target.img", 4 * MiB, [(0, base.read_bytes()[:MiB])])
    run_cli("signature", str(base), "-o", str(tmp / "base.sig"))
    patch = tmp / "p"
    run_cli("diff", str(tmp / "base.sig"), str(target), "-o", str(patch))
    dest, undo = tmp / "dest.img", tmp / "u"
    clone(base, dest)
    r = subprocess.run([*CLI[:1], "-c", SHRINK_THEN_DIE, str(patch), str(dest), str(undo)],
                       capture_output=True)
    assert r.returncode == 137, r.stderr
    assert os.path.getsize(dest) == 4 * MiB  # cut, and no UNDO yet
    assert not undo.exists()
    run_cli("apply", str(patch), str(dest), "--undo", str(undo))
    assert same_bytes(dest, target)
    run_cli("apply", str(undo), str(dest), "--verify")
    assert_is_base(dest, base)
