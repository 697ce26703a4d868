"""Inputs that change or mislead while they are read: a patch file rewritten between or
during apply's two readings, a signature source that grows or changes, a source whose
mtime is always new (a FUSE export), and a filesystem that reports no holes (ramfs)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import KiB, MiB, error_line, make_sparse, pattern, run_cli

from sparsepatch import api, inputs, sparse
from sparsepatch.errors import FormatError, SourceChanged, UsageError
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
    rewind = inputs.Chain.rewind

    def cut_after_check(self: inputs.Chain) -> None:
        # Someone truncates the patch (a copy onto it starts over) once it was checked,
        # just before apply goes back to its first byte to write.
        os.truncate(tmp / "p", len(good) // 2)
        rewind(self)

    monkeypatch.setattr(inputs.Chain, "rewind", cut_after_check)
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
    rewind = inputs.Chain.rewind

    def append(self: inputs.Chain) -> None:
        with open(p1, "ab") as f:
            f.write(b"x")
        rewind(self)

    monkeypatch.setattr(inputs.Chain, "rewind", append)
    with pytest.raises(FormatError) as e:
        api.apply(str(p1), str(dest))
    assert dest.read_bytes() == base.read_bytes()
    assert "changed while apply was reading it" in str(e.value)


# -- item: signature of a file that grows or changes while it is read


def test_signature_of_a_growing_file_exits_6(tmp: Path) -> None:
    img = make_sparse(tmp / "img", 32 * MiB, [(0, 12 * MiB)])
    grew = []

    def grow(n: int) -> None:
        if not grew:
            with open(img, "ab") as f:
                f.write(pattern(MiB, 3))
            grew.append(n)

    with pytest.raises(SourceChanged, match=r"/img: the file changed while signature was reading it") as e:
        api.signature(str(img), str(tmp / "img.sig"), progress=grow)
    assert grew and e.value.exit_code == 6
    assert not (tmp / "img.sig").exists() and not [p for p in os.listdir(tmp) if p.endswith(".part")]


def test_signature_of_a_file_written_in_place_exits_6(tmp: Path) -> None:
    img = make_sparse(tmp / "img", 32 * MiB, [(0, 12 * MiB)])
    written = []

    def write(n: int) -> None:
        if not written:  # a block signature has already hashed
            fd = os.open(img, os.O_WRONLY)
            os.pwrite(fd, pattern(4096, 9), 0)
            os.close(fd)
            written.append(n)

    with pytest.raises(SourceChanged, match=r"changed while signature was reading it \(mtime or size\)"):
        api.signature(str(img), str(tmp / "img.sig"), progress=write)
    assert not (tmp / "img.sig").exists()


def test_signature_of_a_quiet_file_records_its_mtime(tmp: Path) -> None:
    img = make_sparse(tmp / "img", 4 * MiB, [(0, MiB)])
    api.signature(str(img), str(tmp / "img.sig"))
    assert api.info(str(tmp / "img.sig"))["mtime_ns"] == img.stat().st_mtime_ns


# -- item: a source whose mtime is always new (a FUSE export)


def _ever_new_mtime(path: Path) -> Callable[[int], None]:
    """A progress callback that gives path a new mtime each time it is called, as a FUSE
    export that reports the current time does on every stat."""
    t = [path.stat().st_mtime_ns]

    def bump(n: int) -> None:
        t[0] += 1_000_000
        os.utime(path, ns=(t[0], t[0]))

    return bump


def test_diff_of_a_source_with_ever_new_mtime(tmp: Path) -> None:
    base = make_sparse(tmp / "base.img", 32 * MiB, [(0, 8 * MiB)])
    source = make_sparse(tmp / "source.img", 32 * MiB, [(0, 8 * MiB), (4 * MiB, 2 * MiB), (20 * MiB, MiB)])
    api.signature(str(base), str(tmp / "base.sig"))
    with pytest.raises(SourceChanged, match=r"changed while diff was reading it \(mtime or size\)"):
        api.diff(str(tmp / "base.sig"), str(source), str(tmp / "p"), progress=_ever_new_mtime(source))
    assert not (tmp / "p").exists()
    api.diff(str(tmp / "base.sig"), str(source), str(tmp / "p"), progress=_ever_new_mtime(source),
             source_check="content")
    dest = tmp / "dest.img"
    shutil.copyfile(base, dest)
    api.apply(str(tmp / "p"), str(dest), verify=True)
    assert dest.read_bytes() == source.read_bytes()


def test_content_check_still_catches_a_changed_block_and_a_size_change(tmp: Path) -> None:
    base = make_sparse(tmp / "base.img", 32 * MiB, [(0, 8 * MiB)])
    source = make_sparse(tmp / "source.img", 32 * MiB, [(0, 8 * MiB), (0, pattern(MiB, 55))])
    api.signature(str(base), str(tmp / "base.sig"))
    bump = _ever_new_mtime(source)
    hit = []

    def rewrite(n: int) -> None:  # a block the patch carries, after diff hashed it
        bump(n)
        if not hit:
            fd = os.open(source, os.O_WRONLY)
            os.pwrite(fd, pattern(4096, 77), 0)
            os.close(fd)
            hit.append(n)

    with pytest.raises(SourceChanged, match="block at byte 0 changed while diff was reading it"):
        api.diff(str(tmp / "base.sig"), str(source), str(tmp / "p"), progress=rewrite,
                 source_check="content")
    grew = []

    def grow(n: int) -> None:
        bump(n)
        if not grew:
            with open(source, "ab") as f:
                f.write(b"more")
            grew.append(n)

    with pytest.raises(SourceChanged, match=r"changed while diff was reading it \(size\)"):
        api.diff(str(tmp / "base.sig"), str(source), str(tmp / "p"), progress=grow,
                 source_check="content")
    with pytest.raises(SourceChanged, match=r"changed while signature was reading it \(size\)"):
        api.signature(str(source), str(tmp / "s.sig"), progress=_grows(source),
                      source_check="content")
    assert not (tmp / "p").exists() and not (tmp / "s.sig").exists()


def _grows(path: Path) -> Callable[[int], None]:
    """A progress callback that appends to path the first time it is called."""
    done = []

    def grow(n: int) -> None:
        if not done:
            with open(path, "ab") as f:
                f.write(b"more")
            done.append(n)

    return grow


def test_signature_of_a_source_with_ever_new_mtime(tmp: Path) -> None:
    img = make_sparse(tmp / "img", 32 * MiB, [(0, 8 * MiB), (16 * MiB, 4 * MiB)])
    with pytest.raises(SourceChanged, match="changed while signature was reading it"):
        api.signature(str(img), str(tmp / "a.sig"), progress=_ever_new_mtime(img))
    api.signature(str(img), str(tmp / "a.sig"), progress=_ever_new_mtime(img), source_check="content")
    api.signature(str(img), str(tmp / "b.sig"))
    assert api.info(str(tmp / "a.sig"))["identity"] == api.info(str(tmp / "b.sig"))["identity"]
    with pytest.raises(UsageError, match="source check 'size' is not one of: mtime, content"):
        api.signature(str(img), str(tmp / "c.sig"), source_check="size")


def test_cli_source_check_content_diffs_a_file_touched_all_the_time(tmp: Path) -> None:
    base = make_sparse(tmp / "base.img", 32 * MiB, [(0, 8 * MiB)])
    source = make_sparse(tmp / "source.img", 32 * MiB, [(0, 8 * MiB), (2 * MiB, MiB)])
    stop = threading.Event()

    def touch() -> None:
        t = source.stat().st_mtime_ns
        while not stop.is_set():
            t += 1000
            os.utime(source, ns=(t, t))

    toucher = threading.Thread(target=touch)
    toucher.start()
    try:
        run_cli("signature", "--source-check", "content", str(base), "-o", str(tmp / "base.sig"))
        run_cli("diff", "--source-check", "content", str(tmp / "base.sig"), str(source),
                "-o", str(tmp / "p"))
    finally:
        stop.set()
        toucher.join()
    dest = tmp / "dest.img"
    shutil.copyfile(base, dest)
    run_cli("apply", str(tmp / "p"), str(dest))
    assert dest.read_bytes() == source.read_bytes()
    line = error_line(run_cli("diff", "--source-check", "size", str(tmp / "base.sig"), str(source),
                              check=False), 2)
    assert "--source-check" in line
    assert "--source-check [mtime|content]" in run_cli("signature", "--help").stdout.decode()


# -- item: a filesystem that does not report holes


@pytest.fixture
def ramfs(tmp: Path) -> Iterator[Path]:
    mnt = tmp / "ramfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting ramfs needs root")
    r = subprocess.run(["mount", "-t", "ramfs", "-o", "size=64m", "ramfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount ramfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_ramfs_holes_are_read_and_said_to_be(tmp: Path, ramfs: Path) -> None:
    img = make_sparse(ramfs / "img", 24 * MiB, [(4 * MiB, MiB)])
    r = run_cli("signature", str(img), "-o", str(tmp / "img.sig"), "--json")
    stats = json.loads(r.stdout)
    assert stats["holes_skipped"] is False and stats["bytes_read"] == 24 * MiB
    assert r.stderr.decode().startswith(
        f"sparsepatch: warning: {img}: the filesystem does not report holes: reading all "
        f"{24 * MiB} bytes")
    r = run_cli("diff", str(tmp / "img.sig"), str(img), "-o", str(tmp / "p"), "--json")
    assert json.loads(r.stdout)["holes_skipped"] is False
    assert "does not report holes" in r.stderr.decode()
    # The same file where the filesystem has a hole map: holes skipped, nothing said.
    disk = make_sparse(tmp / "img", 24 * MiB, [(4 * MiB, MiB)])
    if os.stat(disk).st_blocks * 512 > 4 * MiB:
        pytest.skip("the test folder's filesystem has no holes either")
    r = run_cli("signature", str(disk), "-o", str(tmp / "disk.sig"), "--json")
    assert json.loads(r.stdout)["holes_skipped"] is True and "warning" not in r.stderr.decode()
    assert json.loads(r.stdout)["bytes_read"] < 24 * MiB


def test_no_seek_hole_support_is_said(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_sparse(tmp / "img", 24 * MiB, [(4 * MiB, MiB)])
    real = os.lseek

    def no_seek_data(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, pos, how)

    monkeypatch.setattr(sparse.os, "lseek", no_seek_data)
    said: list[str] = []
    s = api.signature(str(img), str(tmp / "img.sig"), warn=said.append)
    assert not s.holes_skipped and s.bytes_read == 24 * MiB
    assert said == [f"{img}: the filesystem does not report holes: reading all {24 * MiB} bytes, "
                    "holes included"]
    monkeypatch.undo()
    said.clear()
    s = api.signature(str(img), str(tmp / "img.sig"), warn=said.append)
    assert s.holes_skipped and s.bytes_read < 24 * MiB and not said


def test_a_dense_file_is_not_said_to_lack_holes(tmp: Path) -> None:
    img = make_sparse(tmp / "img", 4 * MiB, [(0, 4 * MiB)])
    said: list[str] = []
    s = api.signature(str(img), str(tmp / "img.sig"), warn=said.append)
    assert s.holes_skipped and not said


# -- the one walk of a scan against a signature, for diff and verify


def test_verify_and_diff_see_the_same_differences_from_a_file_and_a_stream(tmp: Path) -> None:
    base = make_sparse(tmp / "base.img", 8 * MiB, [(0, 256 * KiB), (4 * MiB, 128 * KiB)])
    # In block order: a block removed (hole now), one changed, one added.
    target = make_sparse(tmp / "target.img", 8 * MiB,
                         [(0, 256 * KiB), (0, bytes(BS)), (5 * BS, pattern(BS, 8)),
                          (4 * MiB, 128 * KiB), (6 * MiB, pattern(BS, 9))])
    api.signature(str(base), str(tmp / "base.sig"), BS)
    for arg, stdin in ((str(target), None), ("-", target.read_bytes())):
        line = error_line(run_cli("verify", "--against", str(tmp / "base.sig"), arg, input=stdin,
                                  check=False), 8)
        assert "block at byte 0 differs (expected hash" in line and "found a hole or zeros" in line
        r = run_cli("diff", str(tmp / "base.sig"), arg, "-o", str(tmp / "p"), "--json", input=stdin)
        stats = json.loads(r.stdout)
        assert (stats["data_blocks"], stats["zero_blocks"]) == (2, 1)
        dest = tmp / "dest.img"
        shutil.copyfile(base, dest)
        run_cli("apply", str(tmp / "p"), str(dest))
        assert dest.read_bytes() == target.read_bytes()
    for n, (off, seed) in enumerate(((5 * BS, 8), (6 * MiB, 9))):
        # Each difference on its own is named, at its place.
        later = make_sparse(tmp / f"later{n}.img", 8 * MiB,
                            [(0, 256 * KiB), (4 * MiB, 128 * KiB), (off, pattern(BS, seed))])
        line = error_line(run_cli("verify", "--against", str(tmp / "base.sig"), str(later),
                                  check=False), 8)
        assert f"block at byte {off} differs" in line
        assert ("found hash" in line) and (("expected a hole" in line) == (off == 6 * MiB))


# -- the source a verb reads: closed when done, unless it is stdin


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_source_file_is_closed_after_signature_diff_verify_and_check(tmp_path: Path) -> None:
    img = tmp_path / "img"
    make_sparse(img, 4 * BS, [(0, BS), (2 * BS, BS)])
    before = _open_fds()
    api.signature(str(img), str(tmp_path / "sig"), block_size=BS)
    stats = api.diff(str(tmp_path / "sig"), str(img), str(tmp_path / "patch"), block_size=BS)
    api.verify(str(img), str(tmp_path / "sig"))
    api.check(str(img), 14, bytes.fromhex(stats.target_identity))
    assert _open_fds() == before


def test_stdin_as_the_source_is_left_open(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    os.close(w)  # an empty stream
    with os.fdopen(r, "r") as stream:
        monkeypatch.setattr("sys.stdin", stream)
        with inputs.open_source("-") as fd:
            assert fd == r
        os.fstat(r)  # still open: it is not ours to close
