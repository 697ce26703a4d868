"""Shared helpers: sparse files from small declarative maps (git keeps no holes)."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparsepatch import journal

KiB = 1 << 10
MiB = 1 << 20


def default_journal(dest: str) -> str:
    """Where apply keeps the journal for dest unless told otherwise: beside a file; for a
    block device in the private state directory, named by device number and size."""
    st = os.stat(dest)
    if not stat.S_ISBLK(st.st_mode):
        return journal.journal_path(dest)
    with open(dest, "rb") as f:
        size = f.seek(0, os.SEEK_END)
    return os.path.join(journal.state_dir(), journal.device_journal_name(st.st_rdev, size))


def pattern(n: int, seed: int) -> bytes:
    """n deterministic, incompressible-ish bytes that differ by seed."""
    return random.Random(seed).randbytes(n)


def make_sparse(path: str | os.PathLike[str], size: int,
                extents: list[tuple[int, bytes | int]]) -> Path:
    """Create path with apparent size `size`: holes everywhere except `extents`, each
    (offset, bytes) or (offset, n) for n bytes of pattern(n, seed=offset)."""
    p = Path(path)
    with open(p, "wb") as f:
        f.truncate(size)
        for off, data in extents:
            if isinstance(data, int):
                data = pattern(data, off)
            f.seek(off)
            f.write(data)
    return p


def extents(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """Allocated byte ranges of path, from SEEK_DATA/SEEK_HOLE."""
    out = []
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    break
                if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    # Every allocation check would pass on an empty list: say why instead.
                    pytest.skip(f"{path}: SEEK_DATA is unsupported here ({e.strerror}): "
                                "allocation cannot be checked")
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def allocated_blocks(path: str | os.PathLike[str], bs: int) -> set[int]:
    """Blocks of size bs that hold any allocated byte."""
    out: set[int] = set()
    for start, end in extents(path):
        out.update(range(start // bs, (end + bs - 1) // bs))
    return out


def allocated(path: str | os.PathLike[str]) -> int:
    """Bytes the filesystem allocated for path."""
    return os.stat(path).st_blocks * 512


def run_cli(*args: str, input: bytes | None = None, check: bool = True,
            **kw: object) -> subprocess.CompletedProcess[bytes]:
    """Run the real command line in a subprocess, as a user would."""
    r = subprocess.run([sys.executable, "-m", "sparsepatch", *args], input=input,
                       capture_output=True, **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise AssertionError(f"sparsepatch {' '.join(args)} exited {r.returncode}: {r.stderr!r}")
    return r


def sparse_copy(data: bytes | bytearray, path: Path, bs: int = 16 * KiB) -> Path:
    """path holding data, with a hole wherever a block of bs bytes is zeros."""
    return make_sparse(path, len(data), [(off, bytes(data[off : off + bs]))
                                         for off in range(0, len(data), bs)
                                         if any(data[off : off + bs])])


def error_line(r: subprocess.CompletedProcess[bytes], code: int, *, warnings_ok: bool = False) -> str:
    """Check a failed run the way a user sees it: the exit code, no traceback, exactly one
    `sparsepatch: error:` line (with warnings_ok, other lines may be warnings); return it."""
    text = r.stderr.decode()
    assert r.returncode == code, text
    assert "Traceback" not in text, text
    lines = text.splitlines()
    errors = [ln for ln in lines if ln.startswith("sparsepatch: error:")]
    assert len(errors) == 1, lines
    others = [ln for ln in lines if ln not in errors]
    if warnings_ok:
        assert all(ln.startswith("sparsepatch: warning:") for ln in others), lines
    else:
        assert not others, lines
    return errors[0]


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder like /tmp (sticky, everyone may write, owned by root) that the user nobody
    can reach, and a folder only root can write, where an attacker wants root's files to land."""
    d = Path(tempfile.mkdtemp(prefix="sparsepatch-shared-", dir="/tmp"))
    d.chmod(0o755)
    (d / "shared").mkdir()
    (d / "shared").chmod(0o1777)
    (d / "private").mkdir()
    (d / "private").chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each worker process started."""
    started: list[int] = []
    from sparsepatch import fork

    start = fork._Worker.start

    def counting(*a: object) -> object:
        w = start(*a)  # type: ignore[arg-type]
        if w is not None:
            started.append(w.pid)
        return w

    monkeypatch.setattr(fork._Worker, "start", staticmethod(counting))
    return started
