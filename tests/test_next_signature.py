"""diff --next-signature: the air-gapped cycle without a trip back. Each diff also writes the
signature the destination will have, and the next diff starts from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import MiB, error_line, make_sparse, pattern, run_cli

TRAILER = 64  # the signature trailer: block count, data blocks, mtime, identity, CRC


def _identity(sig: Path) -> str:
    return str(json.loads(run_cli("info", str(sig), "--json").stdout)["identity"])


def _same(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def _versions(tmp: Path) -> list[Path]:
    """Three states of a source image: each rewrites, moves and punches some of the last."""
    v0 = make_sparse(tmp / "v0.img", 24 * MiB + 1000, [(0, 2 * MiB), (8 * MiB, 3 * MiB), (20 * MiB, MiB)])
    v1 = tmp / "v1.img"
    shutil.copyfile(v0, v1)
    with open(v1, "r+b") as f:
        f.seek(MiB)
        f.write(pattern(300_000, 11))
        f.seek(8 * MiB)
        f.write(bytes(MiB))  # zeros now
        f.truncate(26 * MiB)
        f.seek(25 * MiB)
        f.write(v0.read_bytes()[:65536])  # content that exists elsewhere
    v2 = tmp / "v2.img"
    shutil.copyfile(v1, v2)
    with open(v2, "r+b") as f:
        f.seek(MiB + 4096)
        f.write(pattern(50_000, 12))  # rewrites part of what v1 wrote
        f.seek(16 * MiB)
        f.write(pattern(2 * MiB, 13))
    return [v0, v1, v2]


def test_two_cycles_with_no_signature_from_the_destination(tmp: Path) -> None:
    v = _versions(tmp)
    dest = tmp / "dest.img"
    shutil.copyfile(v[0], dest)
    sig = tmp / "first.sig"
    run_cli("signature", str(dest), "-o", str(sig))  # the only signature made from dest
    for k in (1, 2):
        patch, nxt = tmp / f"{k}.patch", tmp / f"{k}.sig"
        run_cli("diff", str(sig), str(v[k]), "-o", str(patch), "--next-signature", str(nxt))
        run_cli("apply", str(patch), str(dest))
        assert _same(dest, v[k])
        # NEXT is the destination's signature, byte for byte up to the trailer's mtime.
        real = tmp / f"real{k}.sig"
        run_cli("signature", str(dest), "-o", str(real))
        assert _identity(nxt) == _identity(real)
        assert nxt.read_bytes()[:-TRAILER] == real.read_bytes()[:-TRAILER]
        sig = nxt
    # And the last NEXT says the destination is up to date.
    run_cli("diff", str(sig), str(v[2]), "-o", str(tmp / "none.patch"))
    info = json.loads(run_cli("info", str(tmp / "none.patch"), "--json").stdout)
    assert sum(info["records"].values()) == 0, info


def test_from_a_full_patch_and_from_a_stream(tmp: Path) -> None:
    v = _versions(tmp)
    full, nxt = tmp / "full.patch", tmp / "full.sig"
    run_cli("diff", "--full", str(v[0]), "-o", str(full), "--next-signature", str(nxt))
    dest = tmp / "new.img"
    run_cli("apply", str(full), str(dest))
    patch, nxt2 = tmp / "p.patch", tmp / "p.sig"
    # The source read from stdin: its size is known only at the end.
    run_cli("diff", str(nxt), "-", "-o", str(patch), "--next-signature", str(nxt2),
            input=v[1].read_bytes())
    run_cli("apply", str(patch), str(dest))
    assert _same(dest, v[1])
    real = tmp / "real.sig"
    run_cli("signature", str(dest), "-o", str(real))
    assert _identity(nxt2) == _identity(real)


def test_a_next_signature_that_is_wrong_is_refused_by_apply(tmp: Path) -> None:
    v = _versions(tmp)
    dest = tmp / "dest.img"
    shutil.copyfile(v[0], dest)
    sig, nxt = tmp / "d.sig", tmp / "d.next"
    run_cli("signature", str(dest), "-o", str(sig))
    run_cli("diff", str(sig), str(v[1]), "-o", str(tmp / "1.patch"), "--next-signature", str(nxt))
    # The patch never reached the destination: NEXT does not describe it.
    run_cli("diff", str(nxt), str(v[2]), "-o", str(tmp / "2.patch"))
    before = dest.read_bytes()
    line = error_line(run_cli("apply", str(tmp / "2.patch"), str(dest), check=False), 5)
    assert "dest.img" in line
    assert dest.read_bytes() == before


def test_next_signature_names_that_are_refused(tmp: Path) -> None:
    v = _versions(tmp)
    sig = tmp / "s.sig"
    run_cli("signature", str(v[0]), "-o", str(sig))
    r = run_cli("diff", str(sig), str(v[1]), "--next-signature", "-", check=False)
    assert "cannot both go to standard output" in error_line(r, 2)
    out = tmp / "same"
    r = run_cli("diff", str(sig), str(v[1]), "-o", str(out), "--next-signature", str(out), check=False)
    assert "names the patch's own output" in error_line(r, 2)
    r = run_cli("diff", str(sig), str(v[1]), "-o", str(tmp / "x.patch"), "--next-signature", str(sig),
                check=False)
    assert "would replace the input" in error_line(r, 2)
    assert not out.exists() and not (tmp / "x.patch").exists()


def test_no_next_signature_without_its_patch(tmp: Path) -> None:
    v = _versions(tmp)
    sig = tmp / "s.sig"
    run_cli("signature", str(v[0]), "-o", str(sig))
    nxt = tmp / "n.sig"
    # The patch cannot be written (its folder does not exist): no NEXT either.
    r = run_cli("diff", str(sig), str(v[1]), "-o", str(tmp / "no" / "p.patch"),
                "--next-signature", str(nxt), check=False)
    error_line(r, 3)
    assert not nxt.exists()
