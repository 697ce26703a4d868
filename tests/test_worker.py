"""The forked hashing worker: a file's scan is split between this process and a second one.
Its output must be byte for byte what one process makes, its failures must come back as
the usual one-line errors, and it must never outlive the scan."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import MiB, make_sparse, pattern

import sparsepatch
from sparsepatch import blocks, fork
from sparsepatch.errors import IOFailure, SourceChanged

# Many 4 MiB stripes, extents of assorted sizes, holes between them, zero blocks inside.
EXTENTS = [(0, 3 * MiB), (5 * MiB, 9 * MiB + 4096), (16 * MiB, bytes(64 << 10) + pattern(MiB, 7)),
           (20 * MiB + 12288, 700 << 10), (24 * MiB, 13 * MiB), (40 * MiB, 6 * MiB + 100)]
SIZE = 48 * MiB + 100


@pytest.fixture(autouse=True)
def small_stripes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stripes of 4 MiB, so that files of tens of MiB hold many of them."""
    monkeypatch.setattr(blocks, "STRIPE", 4 * MiB)


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each worker the scans start."""
    started: list[int] = []
    init = fork._Child.__init__

    def counting(self: fork._Child, *a: object, **kw: object) -> None:
        init(self, *a, **kw)  # type: ignore[arg-type]
        started.append(self.pid)

    monkeypatch.setattr(fork._Child, "__init__", counting)
    return started


def no_children() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fork, "worker_count", lambda: 1)


def test_signature_and_patch_are_the_same_with_a_worker(tmp_path: Path, forks: list[int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    base = make_sparse(tmp_path / "base", SIZE, EXTENTS)
    target = make_sparse(tmp_path / "target", SIZE, EXTENTS[:3] + [(30 * MiB, MiB), (41 * MiB, 2 * MiB)])
    sparsepatch.signature(str(base), str(tmp_path / "two.sig"))
    sparsepatch.diff(str(tmp_path / "two.sig"), str(target), str(tmp_path / "two.patch"))
    assert len(forks) == 2 and no_children()
    one_process(monkeypatch)
    sparsepatch.signature(str(base), str(tmp_path / "one.sig"))
    sparsepatch.diff(str(tmp_path / "one.sig"), str(target), str(tmp_path / "one.patch"))
    assert len(forks) == 2
    assert (tmp_path / "two.sig").read_bytes() == (tmp_path / "one.sig").read_bytes()
    assert (tmp_path / "two.patch").read_bytes() == (tmp_path / "one.patch").read_bytes()
    sparsepatch.apply(str(tmp_path / "two.patch"), str(base), verify=True)
    assert base.read_bytes() == target.read_bytes()


def test_a_small_file_starts_no_worker(tmp_path: Path, forks: list[int]) -> None:
    f = make_sparse(tmp_path / "f", 64 * MiB, [(0, MiB), (60 * MiB, 2 * MiB)])
    sparsepatch.signature(str(f), str(tmp_path / "f.sig"))
    assert forks == []


def _in_worker(parent: int) -> bool:
    return os.getpid() != parent


def test_a_read_error_in_the_worker_is_the_usual_error(tmp_path: Path, forks: list[int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    f = make_sparse(tmp_path / "f", SIZE, EXTENTS)
    parent = os.getpid()
    read_hash = blocks.Scanner._read_hash

    def failing(self: blocks.Scanner, b: int, n: int, want: int) -> object:
        if _in_worker(parent) and b << self.shift >= 24 * MiB:
            raise IOFailure(f"{self.name}: read failed at byte {b << self.shift}: Input/output error")
        return read_hash(self, b, n, want)

    monkeypatch.setattr(blocks.Scanner, "_read_hash", failing)
    with pytest.raises(IOFailure, match=r"/f: read failed at byte \d+: Input/output error$"):
        sparsepatch.signature(str(f), str(tmp_path / "f.sig"))
    assert forks and no_children()
    assert not (tmp_path / "f.sig").exists()


def test_a_worker_that_dies_is_reported(tmp_path: Path, forks: list[int],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    f = make_sparse(tmp_path / "f", SIZE, EXTENTS)
    parent = os.getpid()
    read_hash = blocks.Scanner._read_hash

    def dying(self: blocks.Scanner, b: int, n: int, want: int) -> object:
        if _in_worker(parent) and b << self.shift >= 24 * MiB:
            os._exit(9)
        return read_hash(self, b, n, want)

    monkeypatch.setattr(blocks.Scanner, "_read_hash", dying)
    with pytest.raises(IOFailure, match="worker process ended unexpectedly"):
        sparsepatch.signature(str(f), str(tmp_path / "f.sig"))
    assert no_children()


def test_extents_that_differ_between_the_two_walks_are_a_changed_file(
        tmp_path: Path, forks: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process walks SEEK_DATA itself; a file written meanwhile can give them different
    extents, and the halves must then not be stitched together."""
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    f = make_sparse(tmp_path / "f", SIZE, EXTENTS)
    parent = os.getpid()
    lseek = os.lseek

    def moved(fd: int, pos: int, how: int) -> int:
        at = lseek(fd, pos, how)
        if _in_worker(parent) and how == os.SEEK_DATA and at >= 24 * MiB:
            return at + (64 << 10)  # whole blocks later
        return at

    monkeypatch.setattr(os, "lseek", moved)
    with pytest.raises(SourceChanged, match="data extents changed while it was being read"):
        sparsepatch.signature(str(f), str(tmp_path / "f.sig"))
    assert no_children()


def test_a_failing_consumer_stops_the_worker(tmp_path: Path, forks: list[int]) -> None:
    """The caller may stop reading part-way (an error of its own): the worker is reaped."""
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    f = make_sparse(tmp_path / "f", SIZE, EXTENTS)
    fd = os.open(f, os.O_RDONLY)
    try:
        scan = blocks.Scanner(fd, 14, str(f))
        chunks = scan.chunks()
        for first, _, _, _ in chunks:
            if first << 14 >= 30 * MiB:
                break
        assert forks
        chunks.close()  # what a raising consumer's generator cleanup does
    finally:
        os.close(fd)
    assert no_children()


def test_no_worker_while_other_threads_run(tmp_path: Path, forks: list[int]) -> None:
    """A program embedding the library may hold locks in other threads: no fork then."""
    import threading

    f = make_sparse(tmp_path / "f", SIZE, EXTENTS)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        sparsepatch.signature(str(f), str(tmp_path / "threads.sig"))
    finally:
        stop.set()
        t.join()
    assert forks == []
    sparsepatch.signature(str(f), str(tmp_path / "alone.sig"))
    assert (tmp_path / "threads.sig").read_bytes() == (tmp_path / "alone.sig").read_bytes()


@pytest.fixture
def shares(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each worker that diff's record building starts."""
    started: list[int] = []
    init = fork._Shared.__init__

    def counting(self: fork._Shared, *a: object, **kw: object) -> None:
        init(self, *a, **kw)  # type: ignore[arg-type]
        started.append(self.pid)

    monkeypatch.setattr(fork._Shared, "__init__", counting)
    return started


def _changed_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A base and a target that differ in 20 MiB: many batches of records to share out,
    some compressible and some not, so the two processes get uneven work."""
    base = make_sparse(tmp_path / "base", SIZE, EXTENTS)
    text = (b"sparsepatch shares the records out " * 40000)[: 2 * MiB]
    target = make_sparse(tmp_path / "target", SIZE, EXTENTS + [
        (2 * MiB, text), (6 * MiB, 5 * MiB), (25 * MiB, text), (28 * MiB, 6 * MiB + 4096),
        (41 * MiB, text + text[:MiB])])
    return base, target


def test_records_built_by_two_processes_are_the_same(tmp_path: Path, shares: list[int],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    base, target = _changed_pair(tmp_path)
    sparsepatch.signature(str(base), str(tmp_path / "b.sig"))
    st = sparsepatch.diff(str(tmp_path / "b.sig"), str(target), str(tmp_path / "two.patch"))
    assert shares and no_children()
    assert st.data_bytes > 16 * MiB
    one_process(monkeypatch)
    sparsepatch.diff(str(tmp_path / "b.sig"), str(target), str(tmp_path / "one.patch"))
    assert len(shares) == 1
    assert (tmp_path / "two.patch").read_bytes() == (tmp_path / "one.patch").read_bytes()
    sparsepatch.apply(str(tmp_path / "two.patch"), str(base), verify=True)
    assert base.read_bytes() == target.read_bytes()


def test_a_change_seen_by_the_record_worker_is_the_usual_error(
        tmp_path: Path, shares: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker re-reads and re-hashes the blocks it compresses, like this process."""
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    import sys

    diff_module = sys.modules["sparsepatch.diff"]
    base, target = _changed_pair(tmp_path)
    sparsepatch.signature(str(base), str(tmp_path / "b.sig"))
    parent = os.getpid()
    recheck = diff_module._recheck

    def changed(raw: bytes, changes: object, k: int, m: int, shift: int, first: int, name: str) -> None:
        if _in_worker(parent):
            raise SourceChanged(f"{name}: block at byte {first << shift} changed while diff was reading it")
        recheck(raw, changes, k, m, shift, first, name)

    monkeypatch.setattr(diff_module, "_recheck", changed)
    with pytest.raises(SourceChanged, match=r"/target: block at byte \d+ changed while diff was reading it$"):
        sparsepatch.diff(str(tmp_path / "b.sig"), str(target), str(tmp_path / "p.patch"))
    assert shares and no_children()
    assert not (tmp_path / "p.patch").exists()


def test_a_record_worker_that_dies_is_reported(tmp_path: Path, shares: list[int],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    import sys

    diff_module = sys.modules["sparsepatch.diff"]
    base, target = _changed_pair(tmp_path)
    sparsepatch.signature(str(base), str(tmp_path / "b.sig"))
    parent = os.getpid()
    recheck = diff_module._recheck

    def dying(*a: object) -> None:
        if _in_worker(parent):
            os._exit(9)
        recheck(*a)

    monkeypatch.setattr(diff_module, "_recheck", dying)
    with pytest.raises(IOFailure, match="worker process ended unexpectedly"):
        sparsepatch.diff(str(tmp_path / "b.sig"), str(target), str(tmp_path / "p.patch"))
    assert no_children()


def test_each_chunk_knows_its_process_next_chunk() -> None:
    """The read-ahead hint: each chunk carries the next chunk the same process will read;
    order and content are unchanged."""
    chunks = [(0, 4, 100, False), (4, 4, 100, False), (8, 4, 100, True), (20, 1, 10, True),
              (30, 2, 20, False), (40, 4, 100, True)]
    out = list(blocks._with_ahead(iter(chunks)))
    assert [c[:4] for c in out] == chunks
    assert [c[4] for c in out] == [(4, 100), (30, 20), (20, 10), (40, 100), None, None]
