"""apply's destination and journal: which file it writes, which journal it trusts, which
file it removes after a failure, and what a shrink checks before it cuts data off."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from conftest import KiB, MiB, error_line, make_sparse, pattern, run_cli

from sparsepatch import api
from sparsepatch.format import JOURNAL_MAGIC, JOURNAL_SLOT_SIZE, JournalSlot, encode_journal_slot
from sparsepatch.journal import journal_path, looks_like_journal


def _update(tmp: Path) -> tuple[Path, Path, bytes]:
    base = make_sparse(tmp / "base", 1 * MiB, [(0, 64 * KiB), (512 * KiB, 64 * KiB)])
    target = make_sparse(tmp / "target", 1 * MiB, [(0, 64 * KiB), (512 * KiB, 128 * KiB)])
    api.signature(str(base), str(tmp / "sig"))
    api.diff(str(tmp / "sig"), str(target), str(tmp / "p"))
    return base, tmp / "p", target.read_bytes()


def _slot(seq: int, seed: int = 9) -> bytes:
    return encode_journal_slot(JournalSlot(seq, bytes([seed]) * 32, bytes([seed + 1]) * 32, 0, 4))


# -- what a crash can leave of a journal is still a journal; anything else is not ----------

@pytest.mark.parametrize("content", [
    b"",  # created, never written
    bytes(2 * JOURNAL_SLOT_SIZE),  # the first write's bytes lost, its size kept
    bytes(JOURNAL_SLOT_SIZE) + _slot(1),  # the first write: slot 1
    _slot(2) + _slot(1),
    bytes(JOURNAL_SLOT_SIZE) + _slot(1)[:40],  # torn after the magic
    bytes(JOURNAL_SLOT_SIZE) + JOURNAL_MAGIC[:3],  # torn inside the magic
], ids=["empty", "zeros", "first-write", "two-slots", "torn-slot", "torn-magic"])
def test_what_a_crash_leaves_of_a_journal_is_taken_as_one(content: bytes) -> None:
    assert looks_like_journal(content)


@pytest.mark.parametrize("content", [
    b"hello\n",
    bytes(JOURNAL_SLOT_SIZE) + b"x",
    _slot(2) + _slot(1) + b"\0",  # longer than two slots
    bytes(3 * JOURNAL_SLOT_SIZE),
], ids=["text", "junk-in-slot-1", "one-byte-too-long", "zeros-too-long"])
def test_other_bytes_are_not_taken_for_a_journal(content: bytes) -> None:
    assert not looks_like_journal(content)


def test_journal_option_naming_a_small_text_file_is_refused(tmp_path: Path) -> None:
    dest, patch, _ = _update(tmp_path)
    before = dest.read_bytes()
    notes = tmp_path / "todo"
    notes.write_bytes(b"buy milk\n")
    r = run_cli("apply", "-q", str(patch), str(dest), "--journal", str(notes), check=False)
    line = error_line(r, 3)
    assert "is not one" in line, line
    assert (notes.read_bytes(), dest.read_bytes()) == (b"buy milk\n", before)


def test_journal_option_naming_an_empty_file_is_used_and_removed(tmp_path: Path) -> None:
    """An empty file is what a run killed right after creating its journal leaves."""
    dest, patch, target = _update(tmp_path)
    j = tmp_path / "j"
    j.write_bytes(b"")
    run_cli("apply", "-q", str(patch), str(dest), "--journal", str(j))
    assert dest.read_bytes() == target and not j.exists()


def test_journal_option_naming_a_piece_of_a_split_patch_is_refused(tmp_path: Path) -> None:
    src = make_sparse(tmp_path / "src.img", 1 * MiB, [(0, 256 * KiB), (512 * KiB, 256 * KiB)])
    run_cli("diff", "-q", "--full", str(src), "-o", str(tmp_path / "p"), "--split", "300K")
    piece = tmp_path / "p.001"
    before = piece.read_bytes()
    r = run_cli("apply", "-q", str(tmp_path / "p.000"), str(tmp_path / "dest"), "--journal",
                str(piece), check=False)
    line = error_line(r, 2)
    assert "is the patch" in line, line
    assert piece.read_bytes() == before and not (tmp_path / "dest").exists()


# -- a failed first copy removes the empty file it created, journal or not ----------------

def test_a_first_copy_refused_for_a_stale_journal_leaves_no_empty_file(tmp_path: Path) -> None:
    """The image was deleted after an interrupted apply of another patch; its journal
    stayed. A first copy is refused (exit 5), and must not leave an empty image behind,
    which a later run would take for an interrupted first copy."""
    src = make_sparse(tmp_path / "src.img", 256 * KiB, [(0, 64 * KiB)])
    api.diff(None, str(src), str(tmp_path / "p"), full=True)
    dest = tmp_path / "dest"
    Path(journal_path(str(dest))).write_bytes(bytes(JOURNAL_SLOT_SIZE) + _slot(1))
    r = run_cli("apply", "-q", str(tmp_path / "p"), str(dest), check=False)
    error_line(r, 5)
    assert not dest.exists()


# -- a shrink checks the data it cuts off ----------------------------------------------

def test_a_shrink_of_the_base_itself_is_applied(tmp_path: Path) -> None:
    base = pattern(2 * MiB, 1)
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "target").write_bytes(base[: 1 * MiB])
    run_cli("signature", "-q", str(tmp_path / "base"), "-o", str(tmp_path / "sig"))
    run_cli("diff", "-q", str(tmp_path / "sig"), str(tmp_path / "target"), "-o", str(tmp_path / "p"))
    run_cli("apply", "-q", str(tmp_path / "p"), str(tmp_path / "base"))
    assert (tmp_path / "base").read_bytes() == base[: 1 * MiB]


def test_a_shrink_refuses_a_changed_block_before_the_cut(tmp_path: Path) -> None:
    """A block the patch does not touch, before the new end, differs from the base: the
    destination is not the base, so its cut-off part is not known to be the base's either."""
    base = pattern(2 * MiB, 1)
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "target").write_bytes(base[: 1 * MiB])
    run_cli("signature", "-q", str(tmp_path / "base"), "-o", str(tmp_path / "sig"))
    run_cli("diff", "-q", str(tmp_path / "sig"), str(tmp_path / "target"), "-o", str(tmp_path / "p"))
    other = bytearray(base)
    other[100 * KiB] ^= 1
    dest = tmp_path / "dest"
    dest.write_bytes(bytes(other))
    r = run_cli("apply", "-q", str(tmp_path / "p"), str(dest), check=False)
    line = error_line(r, 5)
    assert "is not this patch's base" in line, line
    assert dest.read_bytes() == bytes(other)


# -- symbolic links at the destination's name -------------------------------------------

def _nobody_uid() -> int | None:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return None


needs_root = pytest.mark.skipif(os.geteuid() != 0 or _nobody_uid() is None,
                                reason="needs root and a user nobody to own a symlink")


def test_an_update_follows_the_users_own_symlink(tmp_path: Path) -> None:
    dest, patch, target = _update(tmp_path)
    link = tmp_path / "link.img"
    link.symlink_to(dest)
    run_cli("apply", "-q", str(patch), str(link))
    assert dest.read_bytes() == target and link.is_symlink()


@needs_root
def test_an_update_does_not_follow_another_users_symlink(tmp_path: Path) -> None:
    dest, patch, _ = _update(tmp_path)
    before = dest.read_bytes()
    link = tmp_path / "link.img"
    link.symlink_to(dest)
    uid = _nobody_uid()
    assert uid is not None
    os.lchown(link, uid, -1)
    r = run_cli("apply", "-q", str(patch), str(link), check=False)
    line = error_line(r, 3)
    assert f"symbolic link owned by uid {uid}" in line, line
    assert dest.read_bytes() == before


def test_a_first_copy_does_not_write_through_the_users_own_symlink(tmp_path: Path) -> None:
    src = make_sparse(tmp_path / "src.img", 256 * KiB, [(0, 64 * KiB)])
    api.diff(None, str(src), str(tmp_path / "p"), full=True)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    (tmp_path / "dest").symlink_to(empty)
    r = run_cli("apply", "-q", str(tmp_path / "p"), str(tmp_path / "dest"), check=False)
    line = error_line(r, 3)
    assert "is a symbolic link" in line, line
    assert empty.stat().st_size == 0


def test_a_first_copy_resumes_in_its_own_empty_file(tmp_path: Path) -> None:
    """An empty file of the user running apply is what a first copy killed right after
    creating the destination leaves: it is still resumed."""
    src = make_sparse(tmp_path / "src.img", 256 * KiB, [(0, 64 * KiB)])
    api.diff(None, str(src), str(tmp_path / "p"), full=True)
    (tmp_path / "dest").write_bytes(b"")
    run_cli("apply", "-q", str(tmp_path / "p"), str(tmp_path / "dest"))
    assert (tmp_path / "dest").read_bytes() == src.read_bytes()


@needs_root
def test_a_first_copy_into_another_users_empty_file_names_the_owner(tmp_path: Path) -> None:
    src = make_sparse(tmp_path / "src.img", 256 * KiB, [(0, 64 * KiB)])
    api.diff(None, str(src), str(tmp_path / "p"), full=True)
    dest = tmp_path / "dest"
    dest.write_bytes(b"")
    os.chown(dest, _nobody_uid() or 0, -1)
    r = run_cli("apply", "-q", str(tmp_path / "p"), str(dest), check=False)
    line = error_line(r, 3)
    assert f"owned by uid {_nobody_uid()}" in line, line
    assert dest.stat().st_size == 0


def test_journal_option_naming_the_key_file_is_refused(tmp_path: Path) -> None:
    """32 zero bytes pass for a journal's two empty slots: a key file of zeros named as the
    journal would be overwritten and then removed."""
    base = make_sparse(tmp_path / "base", 1 * MiB, [(0, 64 * KiB)])
    target = make_sparse(tmp_path / "target", 1 * MiB, [(0, 128 * KiB)])
    key = tmp_path / "key"
    key.write_bytes(bytes(32))
    run_cli("signature", str(base), "-o", str(tmp_path / "sig"))
    run_cli("diff", str(tmp_path / "sig"), str(target), "-o", str(tmp_path / "p"), "-k", str(key))
    r = run_cli("apply", str(tmp_path / "p"), str(base), "-k", str(key), "--journal", str(key),
                check=False)
    assert "key file" in error_line(r, 2)
    assert key.read_bytes() == bytes(32)
