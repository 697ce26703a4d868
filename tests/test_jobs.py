"""--jobs N: signature and diff share their reading and hashing among N processes, and the
output is the same for every N."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MiB, make_sparse, pattern, run_cli

from sparsepatch import fork
from sparsepatch.errors import IOFailure, SourceChanged

EXTENTS = [(k * 3 * MiB + k * 4096, MiB + 777 * k) for k in range(24)]


def _files(tmp: Path) -> tuple[Path, Path]:
    base = make_sparse(tmp / "base.img", 80 * MiB + 5, EXTENTS)
    target = tmp / "target.img"
    shutil.copyfile(base, target)
    with open(target, "r+b") as f:
        for k in range(0, 24, 3):
            f.seek(k * 3 * MiB + 8192)
            f.write(pattern(200_000, k))
        f.seek(79 * MiB)
        f.write(base.read_bytes()[: 2 * MiB])  # content found elsewhere
    return base, target


@pytest.mark.parametrize("block", ["4K", "16K", "1M"])
def test_the_same_bytes_for_1_2_and_4_jobs(tmp: Path, block: str) -> None:
    base, target = _files(tmp)
    sigs, patches = [], []
    for n in (1, 2, 4):
        sig, patch = tmp / f"{n}.sig", tmp / f"{n}.patch"
        run_cli("signature", str(base), "-b", block, "-o", str(sig), "--jobs", str(n))
        run_cli("diff", str(sig), str(target), "-o", str(patch), "-j", str(n))
        sigs.append(sig.read_bytes())
        patches.append(patch.read_bytes())
    assert sigs[0] == sigs[1] == sigs[2]
    assert patches[0] == patches[1] == patches[2]
    dest = tmp / "dest.img"
    shutil.copyfile(base, dest)
    run_cli("apply", str(tmp / "4.patch"), str(dest))
    assert dest.read_bytes() == target.read_bytes()


def test_n_jobs_start_n_minus_1_workers(tmp: Path, forks: list[int]) -> None:
    import sparsepatch

    base, _ = _files(tmp)
    sparsepatch.signature(str(base), str(tmp / "a.sig"), block_size=4096, jobs=4)
    assert len(forks) == 3
    forks.clear()
    sparsepatch.signature(str(base), str(tmp / "b.sig"), block_size=4096, jobs=1)
    assert forks == []
    assert (tmp / "a.sig").read_bytes() == (tmp / "b.sig").read_bytes()


def _enc(k: int) -> bytes:
    return k.to_bytes(8, "little")


def _dec(b: bytes) -> int:
    return int.from_bytes(b, "little")


@pytest.mark.parametrize("workers", [3, 5])
def test_many_workers_keep_order_and_the_first_error(workers: int) -> None:
    def work(k: int) -> bytes:
        return _enc(k) * (1 + k % 40_000)  # some results larger than a pipe

    items = [k * 7919 % 100_003 for k in range(80)]
    many = list(fork.share_map(items, work, _enc, _dec, workers=workers))
    assert [k for k, _ in many] == items
    assert many == list(fork.share_map(items, work, _enc, _dec, workers=1))

    def failing(k: int) -> bytes:
        if k >= 11:
            raise SourceChanged(f"item {k} failed") if k % 2 else IOFailure(f"item {k} failed")
        return _enc(k) * 1000

    with pytest.raises(SourceChanged, match="^item 11 failed$"):
        for _ in fork.share_map(range(60), failing, _enc, _dec, workers=workers):
            pass
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # every worker reaped


def test_the_default_follows_the_cpus_this_process_may_use() -> None:
    if shutil.which("taskset") is None:
        pytest.skip("taskset is missing (Debian package util-linux)")
    code = "from sparsepatch import fork; print(fork.worker_count())"
    one = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True,
                         text=True, check=True)
    assert one.stdout.strip() == "1"
    if len(os.sched_getaffinity(0)) >= 2:
        two = subprocess.run(["taskset", "-c", "0,1", sys.executable, "-c", code],
                             capture_output=True, text=True, check=True)
        assert two.stdout.strip() == "2"


def test_zero_jobs_is_refused(tmp: Path) -> None:
    base, _ = _files(tmp)
    r = run_cli("signature", str(base), "-o", str(tmp / "s"), "--jobs", "0", check=False)
    assert r.returncode == 2 and b"--jobs" in r.stderr
    assert not (tmp / "s").exists()
