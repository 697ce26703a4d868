"""apply --undo against an UNDO that is already there: only a whole undo of this patch that
the user running apply made may stand for the one apply would write; any other lets apply
overwrite the image with no way back, and then roll it back to something that is not the
base."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import error_line, run_cli
from test_resume import clone, same_bytes
from test_undo import assert_is_base, make_pair

from sparsepatch import api
from sparsepatch.format import PatchReader, PatchTrailer, encode_patch_header, encode_patch_trailer
from sparsepatch.undo import Undo, undo_header


def forge_empty_undo(patch: Path, out: Path) -> None:
    """A valid patch from patch's target to its base that holds no record: its header is
    public (sizes and identities are in the patch), so anyone can make it."""
    with open(patch, "rb") as f:
        h = PatchReader(f.read, str(patch), None, True).header
    head = encode_patch_header(undo_header(h, False))
    out.write_bytes(head + encode_patch_trailer(PatchTrailer(0, 0, 0, 0, 0, len(head))))


@pytest.mark.parametrize("case", ["in-place", "shrink"])
def test_undo_without_the_blocks_is_not_taken_for_this_patchs_undo(tmp: Path, case: str) -> None:
    base, target, patch = make_pair(tmp, case)
    dest, undo = tmp / "dest.img", tmp / "update.undo"
    clone(base, dest)
    forge_empty_undo(patch, undo)
    r = run_cli("apply", str(patch), str(dest), "--undo", str(undo), check=False)
    assert "holds no base content" in error_line(r, 5)
    assert same_bytes(dest, base)  # refused before the first write


def test_undo_planted_by_another_user_is_replaced_not_trusted(tmp: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to plant a file of another user")
    base, target, patch = make_pair(tmp, "in-place")
    shared = tmp / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    dest, undo = tmp / "dest.img", shared / "update.undo"
    clone(base, dest)
    forge_empty_undo(patch, undo)
    os.chown(undo, 65534, 65534)
    run_cli("apply", str(patch), str(dest), "--undo", str(undo))
    assert same_bytes(dest, target)
    st = os.stat(undo)
    assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o600)
    run_cli("apply", str(undo), str(dest))
    assert_is_base(dest, base)


@pytest.mark.parametrize("journal", [None, "undo", "spool"])
def test_undo_may_not_share_a_name_with_the_journal(tmp: Path, journal: str | None) -> None:
    """UNDO renamed over the journal leaves a file every later apply refuses as a journal,
    and an undo that cannot be applied under that name; the spool at the journal's name
    makes the journal refuse itself midway. Both are refused before anything is written."""
    base, _, patch = make_pair(tmp, "in-place")
    dest = tmp / "dest.img"
    clone(base, dest)
    if journal is None:
        args = ["--undo", str(tmp / ".dest.img.sparsepatch-journal")]
    elif journal == "undo":
        args = ["--undo", str(tmp / "u"), "--journal", str(tmp / "u")]
    else:
        args = ["--undo", str(tmp / "u"), "--journal", str(tmp / ".u.sparsepatch-undo")]
    r = run_cli("apply", str(patch), str(dest), *args, check=False)
    assert "journal" in error_line(r, 2)
    assert same_bytes(dest, base)
    assert [n for n in os.listdir(tmp) if n.startswith(".") or n == "u"] == []


def test_spool_in_use_by_another_apply_is_refused(tmp: Path) -> None:
    """Two applies writing one UNDO (two copies of an image updated at once, with the
    same --undo): the second would load the first's spool, cut what it had not synced
    yet and append its own records at the same offsets, leaving the first to rename a
    spool with holes into UNDO and exit 0. A spool locked by another process is refused."""
    import fcntl

    base, _, patch = make_pair(tmp, "in-place")
    dest, undo = tmp / "dest.img", tmp / "u"
    clone(base, dest)
    spool = tmp / ".u.sparsepatch-undo"
    with open(spool, "wb") as held:
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_cli("apply", str(patch), str(dest), "--undo", str(undo), check=False)
        assert "another apply" in error_line(r, 7)
        assert same_bytes(dest, base)
        assert spool.stat().st_size == 0


def test_undo_naming_a_folder_is_refused_before_writing(tmp: Path) -> None:
    """The spool cannot be renamed over a folder: found at the end, it left the update
    done and apply failing (exit 3) until the folder was moved away."""
    base, _, patch = make_pair(tmp, "in-place")
    dest, undo = tmp / "dest.img", tmp / "u"
    clone(base, dest)
    undo.mkdir()
    r = run_cli("apply", str(patch), str(dest), "--undo", str(undo), check=False)
    assert "folder" in error_line(r, 2)
    assert same_bytes(dest, base)
    assert [n for n in os.listdir(tmp) if "sparsepatch" in n] == []


def test_destination_at_the_spools_name_is_refused_not_cut(tmp: Path) -> None:
    """The spool's torn tail is cut to the longest valid prefix: a destination (or a patch)
    at the spool's name has none, and was truncated to 0 bytes."""
    base, _, patch = make_pair(tmp, "in-place")
    dest = tmp / ".u.sparsepatch-undo"
    clone(base, dest)
    r = run_cli("apply", str(patch), str(dest), "--undo", str(tmp / "u"), check=False)
    assert "the destination" in error_line(r, 2)
    assert same_bytes(dest, base)


def test_key_at_the_spools_name_is_refused_not_cut(tmp: Path) -> None:
    base, _, _ = make_pair(tmp, "in-place")
    key = tmp / ".u.sparsepatch-undo"
    key.write_bytes(bytes(range(32)))
    patch = tmp / "signed.patch"
    run_cli("diff", "-k", str(key), str(tmp / "base.sig"), str(tmp / "target.img"), "-o", str(patch))
    dest = tmp / "dest.img"
    clone(base, dest)
    r = run_cli("apply", "-k", str(key), str(patch), str(dest), "--undo", str(tmp / "u"), check=False)
    assert "key" in error_line(r, 2)
    assert key.read_bytes() == bytes(range(32))
    assert same_bytes(dest, base)


def test_a_file_put_at_the_spools_name_is_not_removed_with_the_spool(
        tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun after the rename finds UNDO complete and drops the empty spool it left; a
    file renamed to the spool's name meanwhile is not that spool and stays."""
    base, target, patch = make_pair(tmp, "in-place")
    dest, undo = tmp / "dest.img", tmp / "u"
    clone(base, dest)
    run_cli("apply", str(patch), str(dest), "--undo", str(undo))
    spool = tmp / ".u.sparsepatch-undo"
    with open(patch, "rb") as f:
        h = PatchReader(f.read, str(patch), None, True).header
    spool.write_bytes(encode_patch_header(undo_header(h, False)))  # a run stopped at its start
    other = tmp / "other"
    other.write_bytes(b"keep")
    real = Undo.finish

    def swapped_first(self: Undo) -> None:
        os.rename(other, spool)
        real(self)

    monkeypatch.setattr(Undo, "finish", swapped_first)
    api.apply(str(patch), str(dest), undo=str(undo))
    assert same_bytes(dest, target)
    assert spool.read_bytes() == b"keep"
