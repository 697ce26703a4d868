"""Edge cases found in review: a refused stream of a shrinking patch, write errors on
stdout and special files, split pieces next to an older unsplit patch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import error_line, run_cli

BS = 4096


def test_refused_stream_of_a_shrinking_patch_leaves_it_resumable(tmp: Path) -> None:
    base = tmp / "base.img"
    base.write_bytes(b"A" * BS + b"B" * BS + b"C" * BS)
    target = tmp / "target.img"
    target.write_bytes(b"A" * BS + b"B" * BS + b"x" * 1808)  # shrinks into block 2
    run_cli("signature", str(base), "-o", str(tmp / "s"), "-b", "4K")
    run_cli("diff", str(tmp / "s"), str(target), "-o", str(tmp / "p"))
    good = (tmp / "p").read_bytes()
    bad = bytearray(good)
    bad[-3] ^= 1  # in the trailer: every record arrives, then the stream is refused
    dest = tmp / "dest.img"
    dest.write_bytes(base.read_bytes())
    error_line(run_cli("apply", "-", str(dest), input=bytes(bad), check=False), 4)
    run_cli("apply", str(tmp / "p"), str(dest))
    assert dest.read_bytes() == target.read_bytes()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_no_space_on_stdout_or_a_device_is_one_line_exit_3(tmp: Path) -> None:
    img = tmp / "img"
    img.write_bytes(os.urandom(256 * 1024))
    line = error_line(run_cli("signature", str(img), "-o", "/dev/full", check=False), 3)
    assert "No space left" in line and "/dev/full" in line
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, "-m", "sparsepatch", "signature", str(img)],
                           stdout=full, stderr=subprocess.PIPE)
    assert "No space left" in error_line(r, 3)
    run_cli("signature", str(img), "-o", os.devnull)  # written into, not renamed over
    assert not os.path.isfile(os.devnull)


def test_split_pieces_are_found_beside_an_older_unsplit_patch(tmp: Path) -> None:
    src = tmp / "src.img"
    src.write_bytes(os.urandom(200 * 1024))
    run_cli("diff", "--full", str(src), "-o", str(tmp / "img.patch"), "-b", "4K")
    run_cli("diff", "--full", str(src), "-o", str(tmp / "img.patch"), "-b", "4K", "--split", "64K")
    assert (tmp / "img.patch.001").exists()
    run_cli("apply", str(tmp / "img.patch.000"), str(tmp / "dest.img"))
    assert (tmp / "dest.img").read_bytes() == src.read_bytes()
