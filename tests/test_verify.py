"""verify: a patch on its own, a file against a signature or a patch's target; and a
killed signature -o never leaves a file under its final name."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import KiB, MiB, error_line, make_sparse, pattern, run_cli

BS = 16 * KiB


def _pair(tmp: Path) -> tuple[Path, Path]:
    base = make_sparse(tmp / "base.img", 8 * MiB, [(0, 256 * KiB), (4 * MiB, 128 * KiB)])
    target = make_sparse(tmp / "target.img", 8 * MiB,
                         [(0, 256 * KiB), (64 * KiB, pattern(BS, 7)), (4 * MiB, 128 * KiB)])
    return base, target


def test_file_against_its_signature_and_the_first_difference(tmp: Path) -> None:
    base, target = _pair(tmp)
    run_cli("signature", str(base), "-o", str(tmp / "base.sig"), "-b", "16K")
    assert run_cli("verify", "--against", str(tmp / "base.sig"), str(base)).returncode == 0
    line = error_line(run_cli("verify", "--against", str(tmp / "base.sig"), str(target),
                              check=False), 8)
    assert f"block at byte {64 * KiB} differs" in line  # the first block that differs
    # A block that became zeros is named as such.
    zeroed = make_sparse(tmp / "zeroed.img", 8 * MiB, [(0, 256 * KiB)])
    line = error_line(run_cli("verify", "--against", str(tmp / "base.sig"), str(zeroed),
                              check=False), 8)
    assert f"block at byte {4 * MiB} differs" in line and "found a hole or zeros" in line
    # A different size is a difference too, named first.
    grown = make_sparse(tmp / "grown.img", 8 * MiB + 1, [(0, 256 * KiB), (4 * MiB, 128 * KiB)])
    line = error_line(run_cli("verify", "--against", str(tmp / "base.sig"), str(grown),
                              check=False), 8)
    assert f"{8 * MiB + 1} bytes, the signature says {8 * MiB}" in line


def test_file_against_a_patch_target(tmp: Path) -> None:
    base, target = _pair(tmp)
    run_cli("signature", str(base), "-o", str(tmp / "base.sig"), "-b", "16K")
    run_cli("diff", str(tmp / "base.sig"), str(target), "-o", str(tmp / "p"))
    assert run_cli("verify", "--against", str(tmp / "p"), str(target)).returncode == 0
    line = error_line(run_cli("verify", "--against", str(tmp / "p"), str(base), check=False), 8)
    assert "does not match the target identity" in line


def test_patch_alone_checked_to_the_last_block_hash(tmp: Path) -> None:
    base, target = _pair(tmp)
    run_cli("signature", str(base), "-o", str(tmp / "base.sig"), "-b", "16K")
    run_cli("diff", str(tmp / "base.sig"), str(target), "-o", str(tmp / "p"))
    r = run_cli("verify", str(tmp / "p"))
    assert b"is intact: 1 records" in r.stderr
    data = bytearray((tmp / "p").read_bytes())
    data[-100] ^= 0x40  # inside the trailer region or the last payload: refused either way
    (tmp / "bad").write_bytes(bytes(data))
    error_line(run_cli("verify", str(tmp / "bad"), check=False), 4)
    (tmp / "cut").write_bytes((tmp / "p").read_bytes()[:-10])
    assert "truncated" in error_line(run_cli("verify", str(tmp / "cut"), check=False), 4)


def test_killed_signature_never_leaves_its_output_name(tmp: Path) -> None:
    image = make_sparse(tmp / "image.img", 512 * MiB, [(i * 8 * MiB, 4 * MiB) for i in range(40)])
    out = tmp / "image.sig"
    for delay in (0.05, 0.1, 0.2, 0.3):
        p = subprocess.Popen([sys.executable, "-m", "sparsepatch", "signature", str(image),
                              "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.kill()
        p.wait()
        names = os.listdir(tmp)
        if out.exists():  # finished before the kill: then it is whole
            assert run_cli("info", str(out)).returncode == 0
            out.unlink()
        for n in names:
            if n.endswith(".part"):
                os.unlink(tmp / n)


def _split(tmp: Path) -> tuple[Path, Path]:
    src = make_sparse(tmp / "src.img", 1 * MiB, [(0, 256 * KiB), (512 * KiB, 256 * KiB)])
    run_cli("diff", "-q", "--full", str(src), "-o", str(tmp / "p"), "--split", "200K")
    assert (tmp / "p.002").exists()
    return tmp / "p", src


def test_info_and_verify_take_the_pieces_of_a_split_patch_in_order(tmp_path: Path) -> None:
    p, src = _split(tmp_path)
    pieces = sorted(str(x) for x in tmp_path.glob("p.*"))
    whole = tmp_path / "whole.patch"
    whole.write_bytes(b"".join(Path(x).read_bytes() for x in pieces))
    assert run_cli("info", *pieces).stdout == run_cli("info", str(whole)).stdout.replace(
        str(whole).encode(), pieces[0].encode())
    assert b"is intact" in run_cli("verify", *pieces).stderr
    run_cli("verify", "--against", f"{p}.000", str(src))
    # Out of order is a corrupt patch, not a good one.
    error_line(run_cli("verify", pieces[1], pieces[0], *pieces[2:], check=False), 4)


def test_verify_of_a_split_patch_missing_its_last_piece_is_truncated(tmp_path: Path) -> None:
    p, _ = _split(tmp_path)
    last = max(tmp_path.glob("p.*"))
    os.unlink(last)
    assert "truncated" in error_line(run_cli("verify", f"{p}.000", check=False), 4)
    assert "truncated" in error_line(run_cli("info", f"{p}.000", check=False), 4)
    line = error_line(run_cli("verify", "--against", f"{p}.000", str(p), "extra", check=False), 2)
    assert "--against" in line
