"""Another local user (nobody) against a root apply, diff or merge, as a review found them
open: ways around the protected_symlinks rule of paths.open_dir (a destination link's
folders, hard links of root's links), output modes taken from paths looked up again (merge,
a first copy), and output names that end in a folder, name a piece of a split patch, or are
relative to a removed folder."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KiB, MiB, error_line, make_sparse, pattern, run_cli
from test_outputs import NOBODY, as_nobody
from test_paths import _update, needs_root, plant

from sparsepatch import api, files


def swap_for_public_on_first_read(path: Path, swapped: list[bool]) -> Callable[[int], None]:
    """A progress callback: at the first bytes read, nobody renames path away and puts a
    public file under its name (noted in swapped)."""

    def swap() -> None:
        os.rename(path, path.with_name(path.name + ".old"))
        path.write_bytes(b"public\n")
        path.chmod(0o644)

    def progress(n: int) -> None:
        if not swapped:
            as_nobody(swap)
            swapped.append(True)

    return progress


@needs_root
def test_a_destination_link_whose_folder_is_a_planted_link_is_refused(shared: Path) -> None:
    """Root's own link names its image through /tmp (a folder there, since cleaned away);
    nobody puts a link of theirs at that folder's name. Before: the link's folders were
    looked up by the kernel, and root patched the image the planted link led to."""
    base, _, patch = _update(shared)
    before = base.read_bytes()
    shutil.copy(base, shared / "private" / "vm.img")
    home = shared / "home"
    home.mkdir()
    os.symlink(shared / "shared" / "build" / "vm.img", home / "vm.img")
    os.symlink("build/vm.img", shared / "shared" / "vm.img")  # relative, in the sticky folder
    plant(shared / "shared" / "build", shared / "private")
    for dest in (home / "vm.img", shared / "shared" / "vm.img"):
        r = run_cli("apply", "-q", str(patch), str(dest), check=False)
        assert "refusing to follow the symbolic link 'build' owned by uid" in error_line(r, 3), dest
    assert (shared / "private" / "vm.img").read_bytes() == before
    assert os.listdir(shared / "private") == ["vm.img"]
    # The same link through a folder of root's is followed, as before.
    os.unlink(shared / "shared" / "build")
    os.symlink(shared / "private", shared / "shared" / "build")
    run_cli("apply", "-q", str(patch), str(home / "vm.img"))
    assert (shared / "private" / "vm.img").read_bytes() != before



@needs_root
def test_merge_gives_the_mode_of_the_patches_it_read(shared: Path) -> None:
    """Root merges a private patch (0600) and a public one (0644), kept in a folder another
    user owns (a transfer account's outbox). That user renames the private one away, once
    merge has it open, and puts a public file under its name. Before: the merged patch, which holds the
    private patch's data, took the mode of the file the path named by then (0644)."""
    box = shared / "box"
    box.mkdir()
    base = make_sparse(box / "a.img", 4 * MiB, [(0, pattern(256 * KiB, 1))])
    mid = make_sparse(box / "b.img", 4 * MiB, [(0, pattern(256 * KiB, 2))])
    new = make_sparse(box / "c.img", 4 * MiB, [(0, pattern(256 * KiB, 3))])
    for old, img, name in ((base, mid, "p1"), (mid, new, "p2")):
        api.signature(str(old), str(box / "sig"))
        api.diff(str(box / "sig"), str(img), str(box / name))
    (box / "p1").chmod(0o600)
    (box / "p2").chmod(0o644)  # the next update is public; p1 is not
    os.chown(box, NOBODY, NOBODY)
    out = shared / "shared" / "merged"
    swapped: list[bool] = []
    progress = swap_for_public_on_first_read(box / "p1", swapped)

    old_mask = os.umask(0o022)
    try:
        api.merge([str(box / "p1"), str(box / "p2")], str(out), progress=progress)
    finally:
        os.umask(old_mask)
    assert swapped
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600


def test_next_signature_may_not_name_a_piece_of_the_split_patch(tmp_path: Path) -> None:
    """Committed after the pieces, the next signature was renamed over the piece it named:
    exit 0, and a patch whose first piece is a signature."""
    base = make_sparse(tmp_path / "base.img", 4 * MiB, [(0, pattern(64 * KiB, 1))])
    target = make_sparse(tmp_path / "target.img", 4 * MiB, [(0, pattern(3 * MiB, 2))])
    run_cli("signature", str(base), "-o", str(tmp_path / "sig"))
    out = tmp_path / "p"
    for name in ("p.000", "p.001"):
        r = run_cli("diff", str(tmp_path / "sig"), str(target), "-o", str(out), "--split", "1M",
                    "--next-signature", str(tmp_path / name), check=False)
        assert f"--next-signature names a piece of the split patch {out}" in error_line(r, 2)
    assert not list(tmp_path.glob("p*"))
    run_cli("diff", str(tmp_path / "sig"), str(target), "-o", str(out), "--split", "1M",
            "--next-signature", str(tmp_path / "p.sig"))
    run_cli("apply", str(tmp_path / "p.000"), str(base))
    assert base.read_bytes() == target.read_bytes()


@needs_root
def test_a_hard_link_of_a_trusted_link_in_a_sticky_folder_is_not_followed(shared: Path) -> None:
    """Where fs.protected_hardlinks is 0, any user may hard-link one of root's symbolic
    links (/var/lock -> /run/lock) into /tmp: the link there is root's, so the owner rule
    trusts it. This machine's kernel forbids that to nobody, so root makes the link the
    attacker would. Before: root's output went where root's other link led."""
    target = shared / "private" / "spool"
    target.mkdir()
    os.symlink(target, shared / "private" / "lock")
    os.link(shared / "private" / "lock", shared / "shared" / "evil", follow_symlinks=False)
    img = make_sparse(shared / "img", 1 * MiB, [(0, 64 * KiB)])
    r = run_cli("signature", str(img), "-o", str(shared / "shared" / "evil" / "out"), check=False)
    assert "refusing to follow the symbolic link 'evil', which has 2 hard links" in error_line(r, 3)
    assert os.listdir(target) == []
    # Root's link of one name in the sticky folder is still followed.
    os.unlink(shared / "shared" / "evil")
    os.symlink(target, shared / "shared" / "mine")
    run_cli("signature", str(img), "-o", str(shared / "shared" / "mine" / "out"))
    assert os.listdir(target) == ["out"]


def test_merge_split_output_may_not_replace_the_pieces_it_reads(tmp_path: Path) -> None:
    """`merge P.000 Q -o P --split N`: the output's pieces are named like the input's.
    Before: exit 0, and the input patch was gone, replaced piece by piece."""
    base = make_sparse(tmp_path / "base.img", 4 * MiB, [(0, pattern(64 * KiB, 1))])
    mid = make_sparse(tmp_path / "mid.img", 4 * MiB, [(0, pattern(256 * KiB, 2))])
    new = make_sparse(tmp_path / "new.img", 4 * MiB, [(0, pattern(256 * KiB, 3))])
    run_cli("signature", str(base), "-o", str(tmp_path / "s1"))
    run_cli("signature", str(mid), "-o", str(tmp_path / "s2"))
    run_cli("diff", str(tmp_path / "s1"), str(mid), "-o", str(tmp_path / "p"), "--split", "64K")
    run_cli("diff", str(tmp_path / "s2"), str(new), "-o", str(tmp_path / "q"))
    before = {f.name: f.read_bytes() for f in tmp_path.glob("p.*")}
    assert len(before) > 1
    r = run_cli("merge", str(tmp_path / "p.000"), str(tmp_path / "q"), "-o", str(tmp_path / "p"),
                "--split", "64K", check=False)
    assert f"the output's pieces would replace the input {tmp_path / 'p.000'}" in error_line(r, 2)
    assert {f.name: f.read_bytes() for f in tmp_path.glob("p.*")} == before


@needs_root
def test_a_first_copy_gets_the_mode_of_the_patch_read(shared: Path) -> None:
    """As for merge: a private full patch in a folder another user owns, swapped for a
    public file once apply has it open. Read once (precheck off, as the API allows), the
    swap goes unseen. Before: the new image, made of the private patch's data, was 0644."""
    box = shared / "box"
    box.mkdir()
    img = make_sparse(box / "src.img", 4 * MiB, [(0, pattern(256 * KiB, 1))])
    api.diff(None, str(img), str(box / "full"), full=True)
    (box / "full").chmod(0o600)
    os.chown(box, NOBODY, NOBODY)
    swapped: list[bool] = []
    progress = swap_for_public_on_first_read(box / "full", swapped)

    dest = shared / "private" / "new.img"
    old_mask = os.umask(0o022)
    try:
        api.apply(str(box / "full"), str(dest), precheck=False, progress=progress)
    finally:
        os.umask(old_mask)
    assert swapped and dest.read_bytes() == img.read_bytes()
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600


@pytest.mark.parametrize("args", [
    ["signature", "{img}", "-o", "out"],
    ["signature", "-q", "{img}", "-o", "-", "--stats", "st"],
    ["diff", "{sig}", "{img}", "-o", "-", "--next-signature", "next"],
    ["apply", "{patch}", "{dest}", "--undo", "u"],
])
def test_relative_paths_from_a_removed_folder_are_one_line(tmp_path: Path, args: list[str]) -> None:
    """Root working in a folder that was removed meanwhile (one of another user's, say).
    Before: a traceback from os.path.abspath, exit 1."""
    base, _, patch = _update(tmp_path)
    gone = tmp_path / "gone"
    gone.mkdir()
    names = {"img": str(base), "sig": str(tmp_path / "sig"), "patch": str(patch), "dest": str(base)}

    def removed() -> None:
        os.chdir(gone)
        os.rmdir(gone)

    r = run_cli(*(a.format(**names) for a in args), check=False, preexec_fn=removed)
    assert "the current folder was removed: give an absolute path" in error_line(r, 3)


def test_an_output_path_ending_in_a_slash_is_refused_before_any_work(tmp_path: Path) -> None:
    """Before: `-o DIR/ --split N` wrote the pieces as .000, .001, ... into DIR's parent,
    exit 0; `-o NEW/` failed only after the whole run; `--undo NEW/` wrote the file NEW;
    `--journal DIR/` failed after staging, and left the scratch."""
    base, target, patch = _update(tmp_path)
    (tmp_path / "dir").mkdir()
    before = sorted(os.listdir(tmp_path))
    for out in (f"{tmp_path}/{name}" for name in ("dir/", "new/", "dir/.", "dir/..")):
        r = run_cli("diff", str(tmp_path / "sig"), str(target), "-o", out, "--split", "16K",
                    check=False)
        assert f"{out}: names a folder; name the file to write" in error_line(r, 3)
        r = run_cli("signature", "-q", str(base), "-o", "-", "--stats", out, check=False)
        assert f"{out}: names a folder; name the file to write" in error_line(r, 3)
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(tmp_path / "dir") == []
    copy = tmp_path / "copy.img"
    copy.write_bytes(base.read_bytes())
    r = run_cli("apply", str(patch), str(copy), "--undo", f"{tmp_path}/new/", check=False)
    assert "is a folder; --undo names the file to write" in error_line(r, 2)
    assert copy.read_bytes() == base.read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "copy.img"])
    # --journal DIR/: refused only at the first journal write, after the scratch of a patch
    # that moves content was staged, and that scratch was left behind.
    moving = tmp_path / "moving.img"
    make_sparse(moving, 4 * MiB, [(0, pattern(MiB, 1)), (2 * MiB, pattern(MiB, 2))])
    swapped = make_sparse(tmp_path / "swapped.img", 4 * MiB,
                          [(0, pattern(MiB, 2)), (2 * MiB, pattern(MiB, 1))])
    api.signature(str(moving), str(tmp_path / "msig"))
    api.diff(str(tmp_path / "msig"), str(swapped), str(tmp_path / "mpatch"))
    before = sorted(os.listdir(tmp_path))
    for journal in (f"{tmp_path}/dir/", f"{tmp_path}/dir/.."):
        r = run_cli("apply", str(tmp_path / "mpatch"), str(moving), "--journal", journal,
                    check=False)
        assert f"{journal}: is a folder; --journal names the file to write" in error_line(r, 2)
    assert sorted(os.listdir(tmp_path)) == before


@needs_root
def test_a_hard_link_of_root_s_link_at_the_destination_is_not_followed(shared: Path) -> None:
    """As for folders: root's link to its golden image, hard-linked into /tmp as the name
    root updates (what any user can do where fs.protected_hardlinks is 0; root makes it
    here). The link is root's, so it was followed. Before: the golden image was patched."""
    base, _, patch = _update(shared)
    golden = shared / "private" / "golden.img"
    shutil.copy(base, golden)
    before = golden.read_bytes()
    os.symlink(golden, shared / "private" / "current")
    os.link(shared / "private" / "current", shared / "shared" / "vm.img", follow_symlinks=False)
    r = run_cli("apply", "-q", str(patch), str(shared / "shared" / "vm.img"), check=False)
    assert "refusing to follow a symbolic link with 2 hard links" in error_line(r, 3)
    assert golden.read_bytes() == before


@needs_root
def test_a_hard_link_of_root_s_link_to_a_device_as_output_is_not_written_through(shared: Path) -> None:
    """The last name of -o: root's own link to a disk, hard-linked into /tmp (where
    fs.protected_hardlinks is off) under the name root writes its signature to. Before: the
    signature went onto the disk's first bytes."""
    backing = shared / "private" / "disk"
    backing.write_bytes(b"SUPERBLOCK" + bytes(MiB - 10))
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        os.symlink(dev, shared / "private" / "disk-link")
        os.link(shared / "private" / "disk-link", shared / "shared" / "img.sig", follow_symlinks=False)
        img = make_sparse(shared / "img", 1 * MiB, [(0, 64 * KiB)])
        r = run_cli("signature", str(img), "-o", str(shared / "shared" / "img.sig"), check=False)
        assert "symlink with 2 hard links in a folder others can write to" in error_line(r, 3)
        subprocess.run(["sync"], check=True)
        with open(dev, "rb") as f:
            assert f.read(10) == b"SUPERBLOCK"
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@needs_root
def test_a_first_copy_from_pieces_gets_the_mode_of_every_piece_read(
        shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split full patch: the image is created once the first piece is read, its mode
    from that piece and the paths of the others. A later piece that is private when read
    (public under its name when the image was created) makes the image private at the end.
    Before: 0644, holding that piece's data."""
    box = shared / "box"
    box.mkdir()
    img = make_sparse(box / "src.img", 4 * MiB, [(0, pattern(256 * KiB, 1)), (2 * MiB, 128 * KiB)])
    api.diff(None, str(img), str(box / "full"), full=True, split=64 * KiB)
    pieces = sorted(box.glob("full.*"))
    assert len(pieces) >= 3
    for p in pieces:
        p.chmod(0o644)
    real = pieces[-1].read_bytes()
    opened = files.open_dest

    def open_then_swap(*a: object, **k: object) -> object:
        got = opened(*a, **k)  # type: ignore[arg-type]
        tmp = pieces[-1].with_name("private")
        tmp.write_bytes(real)
        tmp.chmod(0o600)
        os.rename(tmp, pieces[-1])
        return got

    dest = shared / "private" / "new.img"
    monkeypatch.setattr(files, "open_dest", open_then_swap)
    old_mask = os.umask(0o022)
    try:
        api.apply(str(pieces[0]), str(dest))
    finally:
        os.umask(old_mask)
    assert dest.read_bytes() == img.read_bytes()
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
