"""The forked hashing worker: a file's scan is split between this process and a second one.
Its output must be byte for byte what one process makes, its failures must come back as
the usual one-line errors, and it must never outlive the scan."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MiB, make_sparse, pattern

import sparsepatch
from sparsepatch import blocks, fork
from sparsepatch.errors import IOFailure, SourceChanged, SparsePatchError

# Many 4 MiB stripes, extents of assorted sizes, holes between them, zero blocks inside.
EXTENTS = [(0, 3 * MiB), (5 * MiB, 9 * MiB + 4096), (16 * MiB, bytes(64 << 10) + pattern(MiB, 7)),
           (20 * MiB + 12288, 700 << 10), (24 * MiB, 13 * MiB), (40 * MiB, 6 * MiB + 100)]
SIZE = 48 * MiB + 100


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
    assert len(forks) >= 2 and no_children()
    started = len(forks)
    one_process(monkeypatch)
    sparsepatch.signature(str(base), str(tmp_path / "one.sig"))
    sparsepatch.diff(str(tmp_path / "one.sig"), str(target), str(tmp_path / "one.patch"))
    assert len(forks) == started
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


def _in_the_worker(monkeypatch: pytest.MonkeyPatch, owner: object, name: str,
                   action: Callable[..., None]) -> None:
    """Replace owner.name so that, in the worker process only, action(*args) runs first
    (to raise or to die there)."""
    parent = os.getpid()
    real = getattr(owner, name)

    def wrapped(*a: Any) -> Any:
        if _in_worker(parent):
            action(*a)
        return real(*a)

    monkeypatch.setattr(owner, name, wrapped)


def _die(*_: object) -> None:
    os._exit(9)


def test_a_read_error_in_the_worker_is_the_usual_error(tmp_path: Path, forks: list[int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    f = make_sparse(tmp_path / "f", SIZE, EXTENTS)

    def failing(self: blocks.Scanner, b: int, n: int, want: int) -> None:
        raise IOFailure(f"{self.name}: read failed at byte {b << self.shift}: Input/output error")

    _in_the_worker(monkeypatch, blocks.Scanner, "_read_hash", failing)
    with pytest.raises(IOFailure, match=r"/f: read failed at byte \d+: Input/output error$"):
        sparsepatch.signature(str(f), str(tmp_path / "f.sig"))
    assert forks and no_children()
    assert not (tmp_path / "f.sig").exists()


def test_a_worker_that_dies_is_reported(tmp_path: Path, forks: list[int],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    f = make_sparse(tmp_path / "f", SIZE, EXTENTS)
    _in_the_worker(monkeypatch, blocks.Scanner, "_read_hash", _die)
    with pytest.raises(SparsePatchError, match=r"the worker process ended unexpectedly \(exit status 9\)$"):
        sparsepatch.signature(str(f), str(tmp_path / "f.sig"))
    assert no_children()


def test_only_this_process_walks_the_extents(tmp_path: Path, forks: list[int],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a preallocated (unwritten) range makes SEEK_DATA report it as data from then
    on, so two processes each walking the extents could disagree about an unchanged file.
    The worker is handed its chunks and never asks SEEK_DATA itself."""
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    f = tmp_path / "prealloc.img"
    with open(f, "wb") as fh:
        fh.truncate(40 * MiB)
        for k in range(16):
            off = k * 2 * MiB
            fh.seek(off)
            fh.write(pattern(3 * MiB // 2, k))
            os.posix_fallocate(fh.fileno(), off + 3 * MiB // 2, MiB // 2)
    parent = os.getpid()
    lseek = os.lseek

    def only_parent(fd: int, pos: int, how: int) -> int:
        if _in_worker(parent) and how in (os.SEEK_DATA, os.SEEK_HOLE):
            os._exit(3)  # seen by the parent as the worker ending unexpectedly
        return lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", only_parent)
    for run in range(3):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # unread again: cold
        os.close(fd)
        sparsepatch.signature(str(f), str(tmp_path / f"two{run}.sig"))
    assert forks and no_children()
    one_process(monkeypatch)
    sparsepatch.signature(str(f), str(tmp_path / "one.sig"))
    for run in range(3):
        assert (tmp_path / f"two{run}.sig").read_bytes() == (tmp_path / "one.sig").read_bytes()


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


def _changed_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A base and a target that differ in 20 MiB: many batches of records to share out,
    some compressible and some not, so the two processes get uneven work."""
    base = make_sparse(tmp_path / "base", SIZE, EXTENTS)
    text = (b"sparsepatch shares the records out " * 40000)[: 2 * MiB]
    target = make_sparse(tmp_path / "target", SIZE, EXTENTS + [
        (2 * MiB, text), (6 * MiB, 5 * MiB), (25 * MiB, text), (28 * MiB, 6 * MiB + 4096),
        (41 * MiB, text + text[:MiB])])
    return base, target


def test_records_built_by_two_processes_are_the_same(tmp_path: Path, forks: list[int],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    base, target = _changed_pair(tmp_path)
    sparsepatch.signature(str(base), str(tmp_path / "b.sig"))
    st = sparsepatch.diff(str(tmp_path / "b.sig"), str(target), str(tmp_path / "two.patch"))
    assert forks and no_children()
    started = len(forks)
    assert st.data_bytes > 16 * MiB
    one_process(monkeypatch)
    sparsepatch.diff(str(tmp_path / "b.sig"), str(target), str(tmp_path / "one.patch"))
    assert len(forks) == started
    assert (tmp_path / "two.patch").read_bytes() == (tmp_path / "one.patch").read_bytes()
    sparsepatch.apply(str(tmp_path / "two.patch"), str(base), verify=True)
    assert base.read_bytes() == target.read_bytes()


def test_a_change_seen_by_the_reading_thread_is_the_usual_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """diff's second reading runs in a thread ahead of the compressor: a block it finds
    changed stops diff with the usual error, and the thread is gone when diff returns."""
    import sys
    import threading

    diff_module = sys.modules["sparsepatch.diff"]
    base, target = _changed_pair(tmp_path)
    sparsepatch.signature(str(base), str(tmp_path / "b.sig"))
    real = diff_module._recheck
    calls = []

    def late_change(raw: bytes, changes: object, k: int, m: int, shift: int, first: int,
                    name: str) -> None:
        assert threading.current_thread() is not threading.main_thread()
        calls.append(first)
        if len(calls) == 5:
            raise SourceChanged(f"{name}: block at byte {first << shift} changed while diff was reading it")
        real(raw, changes, k, m, shift, first, name)

    monkeypatch.setattr(diff_module, "_recheck", late_change)
    with pytest.raises(SourceChanged, match=r"/target: block at byte \d+ changed while diff was reading it$"):
        sparsepatch.diff(str(tmp_path / "b.sig"), str(target), str(tmp_path / "p.patch"))
    assert len(calls) == 5
    assert threading.active_count() == 1
    assert not (tmp_path / "p.patch").exists()


def test_an_error_while_writing_stops_the_reading_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import threading

    from sparsepatch.errors import IOFailure

    writer_module = sys.modules["sparsepatch.writer"]  # diff writes its records through it
    base, target = _changed_pair(tmp_path)
    sparsepatch.signature(str(base), str(tmp_path / "b.sig"))
    real = writer_module.encode_record
    written = []

    def full_disk(rec: object) -> bytes:
        written.append(rec)
        if len(written) == 3:
            raise IOFailure("p.patch: write failed: No space left on device")
        return bytes(real(rec))

    monkeypatch.setattr(writer_module, "encode_record", full_disk)
    with pytest.raises(IOFailure, match="No space left on device"):
        sparsepatch.diff(str(tmp_path / "b.sig"), str(target), str(tmp_path / "p.patch"))
    assert threading.active_count() == 1
    assert not (tmp_path / "p.patch").exists()


# share_map itself, on made-up work: the races and failures of the machinery.

def _enc(k: int) -> bytes:
    return k.to_bytes(8, "little")


def _dec(b: bytes) -> int:
    return int.from_bytes(b, "little")


def test_an_error_sent_before_the_worker_exits_is_not_a_broken_pipe() -> None:
    """The worker fails on its first item and exits; this process, slow to produce the
    next item, then hands it over into a closed pipe. The worker's error must come out."""
    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    import time

    parent = os.getpid()

    def items() -> Iterator[int]:
        yield 0
        yield 1
        time.sleep(0.1)  # the worker fails on item 1 and exits meanwhile
        yield from range(2, 6)

    def work(k: int) -> bytes:
        if _in_worker(parent):
            raise SourceChanged(f"item {k} failed")
        return _enc(k)

    with pytest.raises(SourceChanged, match="^item 1 failed$"):
        for _ in fork.share_map(items(), work, _enc, _dec):
            pass
    assert no_children()


@pytest.mark.parametrize("trial", range(5))
def test_errors_come_out_in_item_order(trial: int) -> None:
    """Whichever process meets it, the first failing item's error is the one raised."""
    def work(k: int) -> bytes:
        if k >= 7:
            raise SourceChanged(f"item {k} failed") if k % 2 else IOFailure(f"item {k} failed")
        return _enc(k) * 1000

    with pytest.raises(SourceChanged, match="^item 7 failed$"):
        out = [_dec(r[:8]) for _, r in fork.share_map(range(40), work, _enc, _dec)]
        assert out == list(range(40))
    assert no_children()


def test_results_in_order_and_equal_to_one_process() -> None:
    def work(k: int) -> bytes:
        return _enc(k) * (1 + k % 50_000)  # some results larger than the pipe

    items = [k * 7919 % 100_003 for k in range(60)]
    two = list(fork.share_map(items, work, _enc, _dec))
    one = list(fork.share_map(items, work, _enc, _dec, workers=1))
    assert two == one and [k for k, _ in two] == items
    assert no_children()


def test_sigchld_ignored(tmp_path: Path, forks: list[int]) -> None:
    """A parent that ignores SIGCHLD passes that on through exec: children are then reaped
    by the kernel, and waiting for one fails. The scan must still succeed."""
    import signal

    f = make_sparse(tmp_path / "f", SIZE, EXTENTS)
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        sparsepatch.signature(str(f), str(tmp_path / "ign.sig"))
    finally:
        signal.signal(signal.SIGCHLD, old)
    sparsepatch.signature(str(f), str(tmp_path / "dfl.sig"))
    assert (tmp_path / "ign.sig").read_bytes() == (tmp_path / "dfl.sig").read_bytes()


def test_a_fork_that_fails_falls_back_to_one_process(tmp_path: Path, forks: list[int],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    base, target = _changed_pair(tmp_path)
    sparsepatch.signature(str(base), str(tmp_path / "b.sig"))
    sparsepatch.diff(str(tmp_path / "b.sig"), str(target), str(tmp_path / "forked.patch"))
    before = len(forks)

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    fds = len(os.listdir("/proc/self/fd"))
    sparsepatch.signature(str(base), str(tmp_path / "c.sig"))
    sparsepatch.diff(str(tmp_path / "c.sig"), str(target), str(tmp_path / "alone.patch"))
    assert len(forks) == before
    assert len(os.listdir("/proc/self/fd")) == fds  # the pipes made for it are closed
    assert (tmp_path / "alone.patch").read_bytes() == (tmp_path / "forked.patch").read_bytes()


@pytest.mark.parametrize(("v2", "v1", "cpus"), [
    ("max 100000", None, None), ("50000 100000", None, 0.5), ("200000 100000", None, 2.0),
    (None, ("-1", "100000"), None), (None, ("150000", "100000"), 1.5)])
def test_cpu_quota_of_a_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, v2: str | None,
                                  v1: tuple[str, str] | None, cpus: float | None) -> None:
    """A container limited to one CPU by its cgroup gets no worker: it would only compete."""
    import builtins

    root = tmp_path / "cgroup"
    if v2 is not None:
        (root / "box").mkdir(parents=True)
        (root / "box" / "cpu.max").write_text(v2 + "\n")
        table = "0::/box\n"
    else:
        assert v1 is not None
        (root / "cpu,cpuacct" / "box").mkdir(parents=True)
        (root / "cpu,cpuacct" / "box" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (root / "cpu,cpuacct" / "box" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
        table = "4:memory:/other\n3:cpu,cpuacct:/box\n"
    real_open = builtins.open

    def fake_open(path: object, *a: object, **kw: object) -> object:
        if path == "/proc/self/cgroup":
            import io

            return io.StringIO(table)
        return real_open(path, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", fake_open)
    assert fork.cpu_quota(str(root)) == cpus
    monkeypatch.setattr(fork, "cpu_quota", lambda: cpus)
    if cpus is not None and cpus < 2:
        assert fork.worker_count() == 1


@pytest.mark.parametrize("stream", [False, True], ids=["file", "stream"])
def test_scan_chunks_carry_the_page_hashes_of_each_data_block(tmp_path: Path, stream: bool) -> None:
    """What diff needs of the target: per data block its page hashes (zero pages inside a
    block included, the padded last block too), and from differences() each changed
    block's page hashes with their tree hash. Worker or not, file or stream, the same."""
    from sparsepatch.format import ZERO_HASH, hash_pages, read_signature, tree_hash

    f = make_sparse(tmp_path / "f", SIZE, EXTENTS)
    content = f.read_bytes()
    bs = 1 << 14
    if not stream:
        fd = os.open(f, os.O_RDONLY)
    else:
        r, w = os.pipe()
        if os.fork() == 0:  # a writer child: the pipe holds less than the file
            os.close(r)
            with os.fdopen(w, "wb") as out:
                out.write(content)
            os._exit(0)
        os.close(w)
        fd = r
    try:
        seen: dict[int, bytes] = {}
        for first, index, pages, _ in blocks.Scanner(fd, 14, str(f)).chunks():
            assert len(pages) == len(index) * 4 * 16
            for k, i in enumerate(index):
                assert i >= first
                seen[i] = pages[k * 64 : (k + 1) * 64]
    finally:
        os.close(fd)
        if stream:
            os.wait()
    expected = {i: hash_pages(content[i * bs : (i + 1) * bs], bs)
                for i in range((len(content) + bs - 1) // bs)}
    assert seen == {i: p for i, p in expected.items() if p != ZERO_HASH * 4}
    assert any(ZERO_HASH in (p[:16], p[16:32], p[32:48], p[48:]) for p in seen.values())
    # differences() against the signature of an older file hands out the new page hashes.
    old = make_sparse(tmp_path / "old", SIZE, EXTENTS[:2])
    sparsepatch.signature(str(old), str(tmp_path / "old.sig"))
    with open(tmp_path / "old.sig", "rb") as s:
        sig = read_signature(s.read)
    fd = os.open(f, os.O_RDONLY)
    try:
        changed = list(blocks.differences(sig, blocks.Scanner(fd, 14, str(f)).chunks(), 14))
    finally:
        os.close(fd)
    assert changed and [c[0] for c in changed] == sorted(set(seen) - set(sig.data_index))
    for i, _, target, pages, _ in changed:
        assert pages == expected[i] and target == tree_hash(pages) != ZERO_HASH
