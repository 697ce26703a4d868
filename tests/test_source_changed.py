"""A source that changes while diff reads it must not yield a patch."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import MiB, make_sparse, pattern, run_cli

from sparsepatch import api
from sparsepatch.errors import SourceChanged


def test_file_modified_during_diff_is_refused(tmp: Path) -> None:
    base = make_sparse(tmp / "base.img", 64 * MiB, [(0, 8 * MiB)])
    source = make_sparse(tmp / "source.img", 64 * MiB, [(0, 8 * MiB), (32 * MiB, 1 * MiB)])
    api.signature(str(base), str(tmp / "base.sig"))
    touched = []

    def meddle(n: int) -> None:
        # A writer (say, a running VM) changes a block diff has already hashed.
        if not touched:
            fd = os.open(source, os.O_WRONLY)
            os.pwrite(fd, pattern(4096, 99), 0)
            os.close(fd)
            touched.append(n)

    with pytest.raises(SourceChanged, match="changed while diff was reading it"):
        api.diff(str(tmp / "base.sig"), str(source), str(tmp / "p.patch"), progress=meddle)
    assert touched
    assert not (tmp / "p.patch").exists()


def test_unchanged_source_gives_the_right_patch_and_exit_code_6_is_documented(tmp: Path) -> None:
    base = make_sparse(tmp / "base.img", 16 * MiB, [(0, 1 * MiB)])
    source = make_sparse(tmp / "source.img", 16 * MiB, [(0, 1 * MiB), (8 * MiB, pattern(64 << 10, 5))])
    run_cli("signature", str(base), "-o", str(tmp / "base.sig"))
    r = run_cli("diff", str(tmp / "base.sig"), str(source), "-o", str(tmp / "p.patch"))
    assert r.returncode == 0 and b"error" not in r.stderr
    dest = tmp / "dest.img"
    shutil.copyfile(base, dest)
    run_cli("apply", str(tmp / "p.patch"), str(dest))
    assert dest.read_bytes() == source.read_bytes()
    assert "6 source changed" in run_cli("diff", "--help").stdout.decode()
