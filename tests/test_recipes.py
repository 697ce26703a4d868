"""The README's recipes, run as written: each `<!-- recipe: NAME -->` block is a shell script
whose first line sets its variables. The test gives those variables its own paths and puts
stand-ins for ssh (another machine: the destination's image path names the source's image
there), aws (a bucket in a folder) and virsh (a log of the calls) first on PATH."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MiB, make_sparse, pattern

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent  # where the sparsepatch command is installed


def recipe(name: str) -> tuple[dict[str, str], str]:
    """The recipe's variables (first line) and the rest of its script."""
    text = README.read_text()
    m = re.search(rf"<!-- recipe: {name} -->\n```sh\n(.*?)```", text, re.S)
    assert m, f"README has no recipe {name}"
    first, _, rest = m.group(1).partition("\n")
    names = dict(kv.split("=", 1) for kv in shlex.split(first))
    return names, rest


def ini_exec_start(after: str) -> str:
    """The ExecStart command of the unit block that follows recipe `after`."""
    text = README.read_text()
    tail = text[text.index(f"<!-- recipe: {after} -->"):]
    m = re.search(r"^ExecStart=/bin/sh -c '(.*)'$", tail, re.M)
    assert m
    return m.group(1)


STANDINS = {
    "ssh": """#!/bin/bash
# ssh HOST COMMAND...: COMMAND runs here, on "the source machine", where the destination's
# image path names the source's image.
shift
cmd="$*"
exec bash -c "${cmd//$RECIPE_DEST/$RECIPE_SRC}"
""",
    "aws": """#!/bin/bash
# aws s3 cp FROM TO, one of them '-': a bucket kept in $RECIPE_BUCKET.
[ "$1 $2" = "s3 cp" ] || { echo "aws stand-in: only 's3 cp'" >&2; exit 2; }
key() { echo "$RECIPE_BUCKET/${1#s3://}"; }
if [ "$3" = - ]; then mkdir -p "$(dirname "$(key "$4")")"; cat > "$(key "$4")"
else cat "$(key "$3")"; fi
""",
    "virsh": """#!/bin/sh
echo "$@" >> "$RECIPE_LOG"
""",
}


def run(script: str, variables: dict[str, str], tmp: Path, cwd: Path, **env: str) -> None:
    bindir = tmp / "standins"
    bindir.mkdir(exist_ok=True)
    for name, body in STANDINS.items():
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    head = "set -euo pipefail\n" + "".join(f"{k}={shlex.quote(v)}\n" for k, v in variables.items())
    e = dict(os.environ, PATH=f"{bindir}:{BIN}:{os.environ['PATH']}", RECIPE_LOG=str(tmp / "virsh.log"),
             RECIPE_BUCKET=str(tmp / "bucket"), **env)
    r = subprocess.run(["bash", "-c", head + script], cwd=cwd, env=e, capture_output=True, text=True)
    assert r.returncode == 0, f"recipe failed ({r.returncode}):\n{script}\n{r.stderr}"


def versions(tmp: Path, n: int = 3) -> list[Path]:
    out = [make_sparse(tmp / "v0.img", 40 * MiB + 321, [(0, 3 * MiB), (12 * MiB, 4 * MiB), (30 * MiB, MiB)])]
    for k in range(1, n):
        v = tmp / f"v{k}.img"
        shutil.copyfile(out[-1], v)
        with open(v, "r+b") as f:
            f.seek(k * MiB + 4096)
            f.write(pattern(300_000, k))
            f.seek(12 * MiB + k * 8192)
            f.write(bytes(65536))
            f.seek((20 + k) * MiB)
            f.write(out[0].read_bytes()[: MiB])  # content the base holds elsewhere
        out.append(v)
    return out


def same(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def test_airgap(tmp: Path) -> None:
    v = versions(tmp)
    names, script = recipe("airgap")
    assert set(names) == {"img", "usb", "state", "src_img"}
    once, marker, cycle = script.partition("# each update")
    assert marker
    dest, usb = tmp / "dest.img", tmp / "usb"
    shutil.copyfile(v[0], dest)
    usb.mkdir()
    variables = {"img": str(dest), "usb": str(usb), "state": str(tmp / "state"), "src_img": str(v[1])}
    run(script, variables, tmp, tmp)
    assert same(dest, v[1])
    (usb / "vm.sig").unlink()  # nothing comes back from the destination from now on
    run(marker + cycle, dict(variables, src_img=str(v[2])), tmp, tmp)
    assert same(dest, v[2])


def test_nightly_over_ssh(tmp: Path) -> None:
    v = versions(tmp)
    names, script = recipe("nightly")
    dest = tmp / "dest.img"
    shutil.copyfile(v[0], dest)
    run(script, {"img": str(dest), "src": names["src"]}, tmp, tmp,
        RECIPE_DEST=str(dest), RECIPE_SRC=str(v[1]))
    assert same(dest, v[1])
    # The unit's own command line, with its own paths: /srv is this test's folder in a mount
    # namespace of its own, and "the source machine" has v2 at /srv/vm.img.
    command = ini_exec_start("nightly")
    assert "/srv/vm.img" in command
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("the unit's paths need a mount namespace: unshare (util-linux) and root")
    srv = tmp / "srv"
    srv.mkdir()
    shutil.copyfile(dest, srv / "vm.img")
    inner = f"mkdir -p /srv && mount --bind {shlex.quote(str(srv))} /srv && {command}"
    run(f"unshare --mount --propagation private bash -c {shlex.quote('set -o pipefail; ' + inner)}",
        {}, tmp, tmp, RECIPE_DEST="/srv/vm.img", RECIPE_SRC=str(v[2]))
    assert same(srv / "vm.img", v[2])


def test_bucket(tmp: Path) -> None:
    v = versions(tmp)
    names, script = recipe("bucket")
    dest, key = tmp / "dest.img", tmp / "vm.key"
    shutil.copyfile(v[0], dest)
    key.write_bytes(os.urandom(32))
    work = tmp / "src"
    work.mkdir()
    shutil.copyfile(v[1], work / "vm.img")
    run(script, {"img": str(dest), "key": str(key), "bucket": names["bucket"], "day": names["day"]},
        tmp, work)
    assert same(dest, v[1])
    stored = tmp / "bucket" / "images" / "vm" / f"{names['day']}.patch"
    assert stored.exists() and stored.stat().st_size < v[1].stat().st_size // 4


def test_since_from_a_running_vm(tmp: Path) -> None:
    from test_since import mounted

    with mounted("xfs", tmp) as mnt:
        names, script = recipe("since")
        img, out = mnt / "vm.img", mnt / "outbox"
        out.mkdir()
        v = versions(tmp)
        shutil.copyfile(v[0], img)
        # The first time: a snapshot, its signature, and the destination brought to it.
        subprocess.run(["cp", "--reflink=always", str(img), f"{img}.snap"], check=True)
        subprocess.run([str(BIN / "sparsepatch"), "signature", f"{img}.snap", "-o", f"{img}.sig"], check=True)
        dest = tmp / "dest.img"
        shutil.copyfile(f"{img}.snap", dest)
        for k in (1, 2):  # the VM writes; each night a snapshot, a diff of what changed, an apply
            _write_differences(img, v[k])
            run(script, {"img": str(img), "vm": names["vm"], "out": str(out)}, tmp, tmp)
            subprocess.run([str(BIN / "sparsepatch"), "apply", str(out / "vm.patch"), str(dest)], check=True)
            assert same(dest, v[k])
        log = (tmp / "virsh.log").read_text().split("\n")
        assert log[:4] == ["domfsfreeze vm", "domfsthaw vm", "domfsfreeze vm", "domfsthaw vm"]


def _write_differences(img: Path, new: Path, chunk: int = 65536) -> None:
    """Write into img only the chunks where new differs, as a running guest would."""
    with open(img, "r+b") as f, open(new, "rb") as g:
        off = 0
        while True:
            want = g.read(chunk)
            if not want:
                break
            f.seek(off)
            if f.read(len(want)) != want:
                f.seek(off)
                f.write(want)
            off += len(want)
        f.truncate(new.stat().st_size)


def test_every_recipe_in_the_readme_is_run_here() -> None:
    names = re.findall(r"<!-- recipe: (\w+) -->", README.read_text())
    assert len(names) >= 4
    source = Path(__file__).read_text()
    assert [n for n in names if f"def test_{n}" not in source] == []
