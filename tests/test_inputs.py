"""Inputs that change or mislead while they are read: a patch file rewritten between or
during apply's two readings, a signature source that grows or changes, a source whose
mtime is always new (a FUSE export), and a filesystem that reports no holes (ramfs)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import KiB, MiB, make_sparse, pattern

from sparsepatch import api
from sparsepatch.apply import Applier
from sparsepatch.errors import FormatError
from sparsepatch.format import PatchReader

BS = 16 * KiB


def _blocks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + BS] for i in range(0, len(data), BS)]


def _changed(tmp: Path, name: str, seed: int) -> Path:
    """The base with every other block of its first 6 MiB replaced: one DATA record each,
    about 3 MiB of incompressible patch."""
    extents: list[tuple[int, bytes | int]] = [(0, 8 * MiB)]
    extents += [(off, pattern(BS, seed + off)) for off in range(0, 6 * MiB, 2 * BS)]
    return make_sparse(tmp / name, 16 * MiB, extents)


@pytest.fixture
def two_patches(tmp: Path) -> tuple[Path, Path, Path, Path, Path]:
    """base, target1, target2 (the same blocks changed, other content), and the patches
    from base to each: the same layout, byte for byte the same length."""
    base = make_sparse(tmp / "base.img", 16 * MiB, [(0, 8 * MiB)])
    t1, t2 = _changed(tmp, "t1.img", 1), _changed(tmp, "t2.img", 2)
    api.signature(str(base), str(tmp / "base.sig"), BS)
    api.diff(str(tmp / "base.sig"), str(t1), str(tmp / "p1"))
    api.diff(str(tmp / "base.sig"), str(t2), str(tmp / "p2"))
    assert (tmp / "p1").stat().st_size == (tmp / "p2").stat().st_size > 2 * MiB
    return base, t1, t2, tmp / "p1", tmp / "p2"


def _record_starts(patch: Path) -> list[int]:
    with open(patch, "rb") as f:
        return [rec.offset for rec in PatchReader(f.read).records()]


# -- item: a patch file changed between apply's two readings, or during the second


@pytest.mark.parametrize("keyed", [False, True])
def test_patch_cut_between_check_and_write_pass_leaves_destination_untouched(
        tmp: Path, monkeypatch: pytest.MonkeyPatch, keyed: bool) -> None:
    base = make_sparse(tmp / "base.img", 16 * MiB, [(0, 8 * MiB)])
    target = _changed(tmp, "target.img", 1)
    api.signature(str(base), str(tmp / "base.sig"), BS)
    key = tmp / "key"
    key.write_bytes(pattern(32, 5))
    api.diff(str(tmp / "base.sig"), str(target), str(tmp / "p"), key_file=str(key) if keyed else None)
    good = (tmp / "p").read_bytes()
    dest = tmp / "dest.img"
    shutil.copyfile(base, dest)
    precheck = Applier.precheck

    def cut_after_check(self: Applier, reader: PatchReader) -> None:
        precheck(self, reader)
        # Someone truncates the patch (a copy onto it starts over) once it was checked.
        os.truncate(tmp / "p", len(good) // 2)

    monkeypatch.setattr(Applier, "precheck", cut_after_check)
    with pytest.raises(FormatError) as e:
        api.apply(str(tmp / "p"), str(dest), key_file=str(key) if keyed else None)
    assert dest.read_bytes() == base.read_bytes()  # untouched, as a checked patch promises
    assert "the patch file changed while apply was reading it" in str(e.value)
    assert "nothing was written" in str(e.value)
    assert e.value.exit_code == 4 and "\n" not in str(e.value)
    assert not (tmp / ".dest.img.sparsepatch-journal").exists()
    monkeypatch.undo()
    (tmp / "p").write_bytes(good)
    api.apply(str(tmp / "p"), str(dest), key_file=str(key) if keyed else None)
    assert dest.read_bytes() == target.read_bytes()


def test_patch_rewritten_during_write_pass_stops_before_the_changed_bytes(
        tmp: Path, two_patches: tuple[Path, Path, Path, Path, Path]) -> None:
    base, t1, t2, p1, p2 = two_patches
    good, other = p1.read_bytes(), p2.read_bytes()
    # From a record boundary well past the first MiB on, p1 becomes p2: each record there
    # is whole and valid (p2's), for the same base, but of another target.
    at = next(a for a in _record_starts(p1) if a >= 3 * MiB // 2)
    dest = tmp / "dest.img"
    shutil.copyfile(base, dest)
    done = []

    def rewrite(n: int) -> None:  # called once the write pass has begun reading
        if not done:
            fd = os.open(p1, os.O_WRONLY)
            os.pwrite(fd, other[at:], at)
            os.close(fd)
            done.append(n)

    with pytest.raises(FormatError, match=r"patch file changed while apply was reading it") as e:
        api.apply(str(p1), str(dest), progress=rewrite)
    assert done and e.value.exit_code == 4 and "\n" not in str(e.value)
    # The stream rule: every block is whole base or whole target of the right patch.
    for i, (now, b, t) in enumerate(zip(_blocks(dest), _blocks(base), _blocks(t1), strict=True)):
        assert now in (b, t), f"block {i} is neither base nor target"
    assert _blocks(dest) != _blocks(t2)
    p1.write_bytes(good)
    api.apply(str(p1), str(dest))  # the right patch completes the job
    assert dest.read_bytes() == t1.read_bytes()


def test_patch_appended_to_between_the_readings_is_refused(tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                                           two_patches: tuple[Path, Path, Path, Path, Path]
                                                           ) -> None:
    base, t1, _, p1, _ = two_patches
    dest = tmp / "dest.img"
    shutil.copyfile(base, dest)
    precheck = Applier.precheck

    def append(self: Applier, reader: PatchReader) -> None:
        precheck(self, reader)
        with open(p1, "ab") as f:
            f.write(b"x")

    monkeypatch.setattr(Applier, "precheck", append)
    with pytest.raises(FormatError) as e:
        api.apply(str(p1), str(dest))
    assert dest.read_bytes() == base.read_bytes()
    assert "changed while apply was reading it" in str(e.value)
