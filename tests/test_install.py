"""`pip install .` into a fresh virtual environment gives a working command and library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import KiB, MiB, make_sparse

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BS = 64 * KiB
# What a clean checkout would not have: the development environment and caches.
NOT_IN_CHECKOUT = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                         ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis",
                                         "fixtures")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with the project pip-installed from a copy of the tree
    (a plain, non-editable install, with pip's default build isolation)."""
    d = tmp_path_factory.mktemp("install")
    tree = d / "src"
    shutil.copytree(ROOT, tree, ignore=NOT_IN_CHECKOUT, symlinks=True)
    env_dir = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, capture_output=True)
    r = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(tree)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        out = (r.stdout + r.stderr).strip()
        network = ("Could not find a version", "No matching distribution", "Failed to establish",
                   "Temporary failure in name resolution", "Network is unreachable")
        if any(n in out for n in network):
            pytest.skip(f"pip could not reach a package index for the build: {out[-300:]}")
        pytest.fail(f"pip install . failed:\n{out[-3000:]}")
    return env_dir


def run(venv: Path, *args: str, cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, capture_output=True,
                          text=True, check=False, **kw)  # type: ignore[call-overload]


def test_console_script_round_trip(venv: Path, tmp: Path) -> None:
    r = run(venv, "sparsepatch", "--version", cwd=tmp)
    assert r.returncode == 0, r.stderr
    version = run(venv, "python", "-c", "import sparsepatch; print(sparsepatch.__version__)", cwd=tmp)
    assert r.stdout.strip() == f"sparsepatch, version {version.stdout.strip()}"

    dest = make_sparse(tmp / "dest.img", 32 * MiB, [(0, 4 * BS), (8 * MiB, 8 * BS), (20 * MiB, BS)])
    source = make_sparse(tmp / "source.img", 32 * MiB, [(0, 4 * BS), (9 * MiB, 6 * BS), (31 * MiB, BS)])
    for argv in (["signature", "dest.img", "-o", "dest.sig"],
                 ["diff", "dest.sig", "source.img", "-o", "p"],
                 ["apply", "p", "dest.img", "--verify"],
                 ["diff", "--full", "source.img", "-o", "full"],
                 ["apply", "full", "new.img"]):
        r = run(venv, "sparsepatch", *argv, cwd=tmp)
        assert r.returncode == 0, (argv, r.stderr)
    assert dest.read_bytes() == source.read_bytes() == (tmp / "new.img").read_bytes()
    assert os.stat(tmp / "new.img").st_blocks * 512 < 2 * MiB  # created sparse


API_SCRIPT = textwrap.dedent("""
    import dataclasses, json, pathlib, sys
    import sparsepatch

    out = {"file": sparsepatch.__file__}
    out["py_typed"] = (pathlib.Path(sparsepatch.__file__).parent / "py.typed").is_file()
    sig = sparsepatch.signature("dest.img", "dest.sig", block_size=65536)
    d = sparsepatch.diff("dest.sig", "source.img", "update.patch")
    a = sparsepatch.apply("update.patch", "dest.img", verify=True)
    full = sparsepatch.diff(None, "source.img", "first.patch", full=True, block_size=65536)
    first = sparsepatch.apply("first.patch", "first.img")
    for name, s in (("sig", sig), ("diff", d), ("apply", a), ("full", full), ("first", first)):
        out[name] = {"type": type(s).__name__, "fields": dataclasses.asdict(s)}
    out["info"] = sparsepatch.info("update.patch")
    try:
        sparsepatch.apply("update.patch", "missing.img")
    except sparsepatch.SparsePatchError as e:
        out["error"] = [type(e).__name__, e.exit_code, str(e)]
    json.dump(out, sys.stdout)
""")


def test_python_api(venv: Path, tmp: Path) -> None:
    dest = make_sparse(tmp / "dest.img", 8 * MiB, [(0, 2 * BS), (2 * MiB, 3 * BS), (5 * MiB, BS)])
    source = make_sparse(tmp / "source.img", 8 * MiB, [(0, 2 * BS), (2 * MiB + BS, 4 * BS)])
    (tmp / "api.py").write_text(API_SCRIPT)
    r = run(venv, "python", "api.py", cwd=tmp)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)

    # The installed copy, not the source tree, with its type marker.
    assert Path(out["file"]).resolve().is_relative_to(venv.resolve())
    assert out["py_typed"] is True

    sig, d, a = out["sig"], out["diff"], out["apply"]
    assert sig["type"] == "SignatureStats"
    assert d["type"] == out["full"]["type"] == "DiffStats"
    assert a["type"] == out["first"]["type"] == "ApplyStats"
    assert sig["fields"]["signature_bytes"] == (tmp / "dest.sig").stat().st_size
    assert sig["fields"]["file_size"] == 8 * MiB and sig["fields"]["data_blocks"] == 6
    assert d["fields"]["patch_bytes"] == (tmp / "update.patch").stat().st_size
    # Blocks 33..36 get new data; 32 and 80 become zeros.
    assert d["fields"]["data_blocks"] == out["info"]["blocks"]["data"] == 4
    assert d["fields"]["zero_blocks"] == out["info"]["blocks"]["zero"] == 2
    assert a["fields"]["blocks_written"] == d["fields"]["data_blocks"]
    assert a["fields"]["blocks_punched"] == d["fields"]["zero_blocks"]
    assert isinstance(a["fields"]["blocks_skipped"], int)
    assert out["full"]["fields"]["full"] is True
    assert out["info"]["kind"] == "patch"
    assert dest.read_bytes() == source.read_bytes() == (tmp / "first.img").read_bytes()

    name, code, message = out["error"]
    assert name != "SparsePatchError" and code == 3 and "missing.img" in message


def test_installed_files(venv: Path, tmp: Path) -> None:
    r = run(venv, "python", "-c", textwrap.dedent("""
        import importlib.metadata as m
        dist = m.distribution("sparsepatch")
        print("\\n".join(str(f) for f in dist.files))
        print("entry:" + ",".join(f"{e.name}={e.value}" for e in dist.entry_points))
    """), cwd=tmp)
    assert r.returncode == 0, r.stderr
    files = r.stdout.split()
    assert "sparsepatch/py.typed" in files
    assert "sparsepatch/cli.py" in files
    assert not any(f.startswith("tests/") for f in files)
    assert "entry:sparsepatch=sparsepatch.cli:main" in files
