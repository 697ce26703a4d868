"""--stats FILE is written by a rename at the end, like -o: naming an input or another output
of the same command must be refused before anything runs, or a typo replaces a VM image (or
the only undo of an update) with a few hundred bytes of JSON and exits 0."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MiB, error_line, make_sparse, run_cli
from test_resume import same_bytes


@pytest.fixture
def pair(tmp: Path) -> tuple[Path, Path, Path, Path]:
    base = make_sparse(tmp / "base.img", 4 * MiB, [(0, MiB)])
    target = make_sparse(tmp / "target.img", 4 * MiB, [(0, MiB), (2 * MiB, MiB)])
    run_cli("signature", str(base), "-o", str(tmp / "base.sig"))
    run_cli("diff", str(tmp / "base.sig"), str(target), "-o", str(tmp / "p"))
    dest = tmp / "dest.img"
    dest.write_bytes(base.read_bytes())
    return base, target, tmp / "p", dest


def test_stats_naming_the_destination_of_apply_is_refused(tmp: Path, pair: tuple[Path, ...]) -> None:
    base, _, patch, dest = pair
    r = run_cli("apply", str(patch), str(dest), "--stats", str(dest), check=False)
    error_line(r, 2)
    assert same_bytes(dest, base)


def test_stats_naming_the_undo_is_refused(tmp: Path, pair: tuple[Path, ...]) -> None:
    base, _, patch, dest = pair
    undo = tmp / "u"
    r = run_cli("apply", str(patch), str(dest), "--undo", str(undo), "--stats", str(undo), check=False)
    error_line(r, 2)
    assert same_bytes(dest, base) and not undo.exists()


@pytest.mark.parametrize("which", ["source", "output"])
def test_stats_naming_an_input_or_the_output_of_signature_and_diff(
        tmp: Path, pair: tuple[Path, ...], which: str) -> None:
    base, target, _, _ = pair
    before = target.read_bytes()
    stats = target if which == "source" else tmp / "new.patch"
    r = run_cli("diff", str(tmp / "base.sig"), str(target), "-o", str(tmp / "new.patch"),
                "--stats", str(stats), check=False)
    error_line(r, 2)
    assert target.read_bytes() == before
    stats = base if which == "source" else tmp / "new.sig"
    r = run_cli("signature", str(base), "-o", str(tmp / "new.sig"), "--stats", str(stats), check=False)
    error_line(r, 2)
    assert base.stat().st_size == 4 * MiB


def test_stats_naming_a_piece_of_the_split_patch_is_refused(tmp: Path, pair: tuple[Path, ...]) -> None:
    _, target, _, _ = pair
    out = tmp / "split.patch"
    r = run_cli("diff", str(tmp / "base.sig"), str(target), "-o", str(out), "--split", "64K",
                "--stats", f"{out}.000", check=False)
    assert "piece of the split patch" in error_line(r, 2)
    assert not list(tmp.glob("split.patch*"))
