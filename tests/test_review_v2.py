"""Format version 2 in review: patches that pass every record check yet cannot be applied,
found by reading the spec against apply. A patch file that apply refuses must leave the
destination as it was, and say why in one line."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KiB, error_line, make_sparse, pattern, run_cli

from sparsepatch.format import (
    REC_COPY,
    REC_DATA,
    REC_STAGE,
    REC_ZERO,
    PatchHeader,
    PatchReader,
    PatchTrailer,
    Record,
    encode_patch_header,
    encode_patch_trailer,
    encode_record,
    page_hash,
)

BS = 4 * KiB


def _parse(blob: bytes) -> tuple[PatchHeader, list[Record]]:
    r = PatchReader(io.BytesIO(blob).read)
    return r.header, list(r.records())


def _encode(h: PatchHeader, recs: list[Record]) -> bytes:
    body = encode_patch_header(h) + b"".join(encode_record(r) for r in recs)
    n = {k: sum(r.count for r in recs if r.kind == k) for k in (REC_DATA, REC_ZERO, REC_COPY)}
    return body + encode_patch_trailer(PatchTrailer(len(recs), n[REC_DATA], n[REC_ZERO], n[REC_COPY],
                                                    sum(len(r.payload) for r in recs), len(body)))


def _world(tmp: Path, target_edit: dict[int, bytes]) -> tuple[Path, Path, bytes]:
    """A 64 KiB base of data at 4 KiB blocks, the patch to a target with target_edit (offset:
    bytes) written over it, and a copy of the base to apply to."""
    base = make_sparse(tmp / "base.img", 64 * KiB, [(0, 64 * KiB)])
    target = bytearray(base.read_bytes())
    for off, piece in target_edit.items():
        target[off : off + len(piece)] = piece
    (tmp / "target.img").write_bytes(target)
    run_cli("signature", str(base), "-o", str(tmp / "base.sig"), "-b", "4K")
    run_cli("diff", str(tmp / "base.sig"), str(tmp / "target.img"), "-o", str(tmp / "t.patch"))
    dest = tmp / "dest.img"
    dest.write_bytes(base.read_bytes())
    return tmp / "t.patch", dest, base.read_bytes()


@pytest.mark.parametrize("mode", ["file", "stdin"])
@pytest.mark.parametrize("kind", ["data", "copy"])
def test_a_last_block_with_bytes_past_the_target_end_is_refused_before_writing(
        tmp: Path, mode: str, kind: str) -> None:
    """The target hash is that of the zero-padded last block, so its bytes past target_size
    are zeros; apply writes the block clipped there. A patch whose header cuts the target
    inside a block whose hash covers non-zero bytes there passed every check, had its block
    written clipped, then failed the read-back (exit 8) with the journal kept: every rerun
    failed the same way, and the destination was neither base nor target."""
    if kind == "data":
        patch, dest, base = _world(tmp, {15 * BS: pattern(BS, 7)})
    else:  # the last block becomes a copy of block 0, which no record changes
        patch, dest, base = _world(tmp, {15 * BS: pattern(64 * KiB, 0)[:BS]})  # make_sparse's bytes
    h, recs = _parse(patch.read_bytes())
    assert [r.kind for r in recs] == [REC_DATA if kind == "data" else REC_COPY]
    evil = tmp / "evil.patch"
    evil.write_bytes(_encode(dataclasses.replace(h, target_size=h.target_size - 100), recs))
    if mode == "file":
        r = run_cli("apply", str(evil), str(dest), check=False)
    else:
        r = run_cli("apply", "-", str(dest), input=evil.read_bytes(), check=False)
    line = error_line(r, 4)
    assert "past the target's end" in line, line
    assert dest.read_bytes() == base


def test_verify_alone_refuses_a_last_block_with_bytes_past_the_target_end(tmp: Path) -> None:
    patch, _, _ = _world(tmp, {15 * BS: pattern(BS, 7)})
    h, recs = _parse(patch.read_bytes())
    evil = tmp / "evil.patch"
    evil.write_bytes(_encode(dataclasses.replace(h, target_size=h.target_size - 100), recs))
    run_cli("verify", str(patch))
    line = error_line(run_cli("verify", str(evil), check=False), 4)
    assert "past the target's end" in line, line


def _rotated_pages(tmp: Path) -> tuple[Path, Path, bytes]:
    """16 KiB blocks; the target has the pages of block 1 rotated by one: a patch with a
    STAGE record. Returns the patch, a copy of the base and the base's bytes."""
    big = 16 * KiB
    base = pattern(6 * big, 600)
    target = bytearray(base)
    target[big : 2 * big] = base[big + BS : 2 * big] + base[big : big + BS]
    (tmp / "base.img").write_bytes(base)
    (tmp / "target.img").write_bytes(target)
    run_cli("signature", str(tmp / "base.img"), "-o", str(tmp / "base.sig"))
    run_cli("diff", str(tmp / "base.sig"), str(tmp / "target.img"), "-o", str(tmp / "t.patch"))
    dest = tmp / "dest.img"
    dest.write_bytes(base)
    return tmp / "t.patch", dest, base


def _sides(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if "sparsepatch-" in n)


def test_staged_pages_no_moved_page_reads_are_refused_before_the_scratch(tmp: Path) -> None:
    """A page the patch stages costs the scratch 4096 bytes for 16 in the patch. A patch
    file listing pages no MOVED page reads (16 MiB of scratch per 256 KiB of patch, up to
    the base's size) made apply fill the scratch's folder with them."""
    patch, dest, base = _rotated_pages(tmp)
    h, recs = _parse(patch.read_bytes())
    assert recs[0].kind == REC_STAGE and recs[0].first_block < 8
    extra = Record(REC_STAGE, 12, 8, b"".join(page_hash(base[p * BS : (p + 1) * BS])
                                               for p in range(12, 20)), pages=recs[0].pages)
    evil = tmp / "evil.patch"
    evil.write_bytes(_encode(h, recs[:1] + [extra] + recs[1:]))
    line = error_line(run_cli("apply", str(evil), str(dest), check=False), 4)
    assert "lists base page 12 (byte 49152), which no MOVED page reads" in line, line
    assert dest.read_bytes() == base and not _sides(tmp)
    line = error_line(run_cli("verify", str(evil), check=False), 4)  # no destination needed
    assert "lists base page 12 (byte 49152), which no MOVED page reads" in line, line
    run_cli("apply", str(patch), str(dest))  # the patch as diff wrote it
    assert dest.read_bytes() == (tmp / "target.img").read_bytes() and not _sides(tmp)


def test_staged_pages_past_the_destination_end_are_refused_before_the_scratch(tmp: Path) -> None:
    """From a stream the patch is not read ahead: a header claiming a 1 GiB base onto a
    destination of the target's size, with STAGE records of 64 MiB each, had apply write
    64 MiB of zeros into the scratch per 256 KiB of patch."""
    patch, dest, base = _rotated_pages(tmp)
    h, recs = _parse(patch.read_bytes())
    stage = [Record(REC_STAGE, 100 + 16384 * i, 16384, pattern(16 * 16384, i), pages=recs[0].pages)
             for i in range(2)]
    evil = _encode(dataclasses.replace(h, base_size=1 << 30), recs[:1] + stage + recs[1:])
    line = error_line(run_cli("apply", "-", str(dest), input=evil, check=False), 5)
    assert "is 98304 bytes, but the patch stages its base page at byte" in line, line
    assert dest.read_bytes() == base and not _sides(tmp)


def test_verify_of_a_patch_with_moved_pages_does_not_claim_every_block_checked(tmp: Path) -> None:
    """Without the base, verify cannot check a block made of same or moved pages; its
    summary said "every block hash checked" for a patch made of nothing else."""
    patch, _, _ = _rotated_pages(tmp)
    r = run_cli("verify", str(patch))
    assert "every block hash checked but 1 made with the base's pages (apply checks those)" in \
        r.stderr.decode(), r.stderr
    out = json.loads(run_cli("verify", str(patch), "--json").stdout)
    assert out["base_blocks"] == 1
    plain, _, _ = _world(tmp, {15 * BS: pattern(BS, 7)})
    assert "every block hash checked, no MAC" in run_cli("verify", str(plain)).stderr.decode()


# apply, killed just after its first write to the destination (the scratch, whose name
# starts with a dot, is written before it): the staged pages are in the scratch alone.
KILL_AT_FIRST_WRITE = (
    "import os, signal, sys\nfrom sparsepatch import sparse\nreal = sparse.pwrite_full\n"
    "def cut(fd, data, off):\n    real(fd, data, off)\n"
    "    if not os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith('.'):\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "sparse.pwrite_full = cut\nsys.argv = ['sparsepatch', *sys.argv[1:]]\n"
    "from sparsepatch.cli import main\nmain()\n")


def _killed_at_first_write(*args: str) -> None:
    r = subprocess.run([sys.executable, "-c", KILL_AT_FIRST_WRITE, *args], capture_output=True)
    assert r.returncode == -9, r.stderr


@pytest.mark.parametrize("swap", ["symlink", "fifo", "another user's file"])
def test_a_scratch_swapped_between_runs_is_refused_not_followed(tmp: Path, swap: str) -> None:
    """root applies to an image in a folder its owner (uid 1000) can write; between a killed
    run and the rerun, that user (or another, uid 1001) replaces the scratch. Nothing is
    followed, written through or blocked on; the destination stays as the kill left it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to own the apply and give files to other users")
    folder = tmp / "user"
    folder.mkdir()
    patch, dest, base = _rotated_pages(folder)
    os.chown(folder, 1000, 1000)
    os.chown(dest, 1000, 1000)
    _killed_at_first_write("apply", str(patch), str(dest))
    scratch = folder / f".{dest.name}.sparsepatch-scratch"
    size = scratch.stat().st_size
    scratch.unlink()
    victim = tmp / "victim"
    victim.write_bytes(b"root's file")
    if swap == "symlink":
        os.symlink(victim, scratch)
    elif swap == "fifo":
        os.mkfifo(scratch)
    else:
        scratch.write_bytes(pattern(size, 3))
        os.chown(scratch, 1001, 1001)
    before = dest.read_bytes()
    r = run_cli("apply", str(patch), str(dest), check=False, timeout=30)
    line = error_line(r, 3)
    assert str(scratch) in line, line
    assert {"symlink": "symbolic link", "fifo": "not a regular file",
            "another user's file": "owned by uid 1001"}[swap] in line, line
    assert dest.read_bytes() == before and victim.read_bytes() == b"root's file"


def test_a_rerun_without_the_scratch_dir_says_to_give_it_again(tmp: Path) -> None:
    """The scratch of a run given --scratch DIR is not beside the destination: a rerun
    without the option finds none, and must say where to look rather than only "restore"."""
    patch, dest, base = _rotated_pages(tmp)
    elsewhere = tmp / "scratch"
    elsewhere.mkdir()
    _killed_at_first_write("apply", str(patch), str(dest), "--scratch", str(elsewhere))
    assert dest.read_bytes() != base and os.listdir(elsewhere)
    line = error_line(run_cli("apply", str(patch), str(dest), check=False), 5)
    assert "give it again" in line, line
    run_cli("apply", str(patch), str(dest), "--scratch", str(elsewhere))
    assert dest.read_bytes() == (tmp / "target.img").read_bytes() and not os.listdir(elsewhere)
