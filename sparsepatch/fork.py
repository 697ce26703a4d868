"""Work shared with forked processes, for the CPU-bound loop of signature and of diff's
first phase: hashing the data extents of a file. (diff's second phase compresses one zstd
stream, which cannot be shared out; zstd releases the GIL, so a thread reads ahead of it.)

A second thread does not help with hashing: BLAKE3 at 16 KiB per call, and the per-block
Python around it, spend as much time handing the GIL over as hashing. So share_map() forks up
to --jobs - 1 worker processes (default: one per CPU this process may use) and hands each
items as it becomes free, through a pipe, as bytes: this process alone walks the items, so
all work on the same sequence. Each worker sends its results back through a second pipe,
and this process yields all results in order. Which process did
an item never shows in the result. Where a worker cannot be had (one CPU, other threads
running, no fork, fork or pipe failing), the same work runs here, one item after another.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, TypeVar

from . import errors
from .errors import SparsePatchError, UsageError

T = TypeVar("T")

_HEAD = struct.Struct("<BI")  # kind, payload length
_RESULT, _ERROR, _END = 0, 1, 2
_LEN = struct.Struct("<I")
_PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: room for a few results, and for any command
_F_SETPIPE_SZ = 1031
MAX_COMMAND = 32 << 10  # bytes of one item's description: well within the command pipe


_jobs: int | None = None  # the running command's --jobs (jobs()); None: every CPU we may use


@contextlib.contextmanager
def jobs(n: int | None) -> Iterator[None]:
    """Within the block, share work among n processes (this one included); None keeps the
    default, every CPU this process may use."""
    global _jobs
    if n is not None and n < 1:
        raise UsageError(f"--jobs {n}: at least 1 process is needed")
    saved, _jobs = _jobs, n if n is not None else _jobs
    try:
        yield
    finally:
        _jobs = saved


def worker_count() -> int:
    """Processes to use (this one included): --jobs if given, else the CPUs this process
    may use (its affinity mask and its cgroup's CPU quota); one while this process runs
    other threads (a program that embeds the library may hold locks in them, which a
    forked child would inherit locked) or cannot fork."""
    if not hasattr(os, "fork"):
        return 1
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return 1
    if _jobs is not None:
        return _jobs
    return available_cpus()


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's quota."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, int(cpus))


def cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs this process's cgroup may use (a container's CPU limit), None if unlimited or
    unknown: cgroup v2 cpu.max, else v1 cpu.cfs_quota_us / cpu.cfs_period_us."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        try:
            if controllers == "":
                with open(f"{root}{path.rstrip('/')}/cpu.max") as f:
                    quota, period = f.read().split()
                if quota != "max":
                    return int(quota) / int(period)
            elif "cpu" in controllers.split(","):
                base = f"{root}/{controllers}{path.rstrip('/')}"
                with open(f"{base}/cpu.cfs_quota_us") as f:
                    quota_us = int(f.read())
                with open(f"{base}/cpu.cfs_period_us") as f:
                    period_us = int(f.read())
                if quota_us > 0:
                    return quota_us / period_us
        except (OSError, ValueError):
            continue
    return None


Rows = list[tuple[int, ...]]  # how signature and diff describe an item: rows of integers


def pack_rows(rows: Rows) -> bytes:
    """An item's description for the worker: its rows of unsigned integers, 8 bytes each."""
    from array import array

    return array("Q", [x for row in rows for x in row]).tobytes()


def unpack_rows(data: bytes, width: int) -> Rows:
    """pack_rows undone, for rows of width integers."""
    from array import array

    a = array("Q")
    a.frombytes(data)
    return [tuple(a[i : i + width]) for i in range(0, len(a), width)]


def share_map(items: Iterable[T], work: Callable[[T], bytes], encode: Callable[[T], bytes],
              decode: Callable[[bytes], T], *, workers: int | None = None, ahead: int = 2,
              hold: int = 6) -> Generator[tuple[T, bytes], None, None]:
    """(item, work(item)) for every item, in order.

    workers counts this process: up to workers - 1 are forked, one more each time an item
    finds every worker busy (none for a single item). Items go to a worker as
    encode(item) (at most MAX_COMMAND bytes), which it turns back with decode() and works
    on; each is kept busy with up to `ahead` items while this process does the others,
    holding at most `hold` results of its own while the oldest worker result is not back.
    Errors come out in item order whichever process met them: an error of a worker's is
    raised here as the same SparsePatchError class with the same text. No worker outlives
    the generator (close it on error)."""
    it = iter(items)
    workers = worker_count() if workers is None else workers
    # [item, result or None while a worker has it, that worker]
    pending: deque[list[Any]] = deque()
    pool: list[_Worker] = []
    try:
        for n, item in enumerate(it):
            free = min(pool, key=lambda w: w.inflight, default=None)
            if (free is None or free.inflight) and len(pool) < workers - 1 and n:
                started = _Worker.start(work, decode, pool)
                if started is None:
                    workers = len(pool) + 1
                else:
                    pool.append(started)
                    free = started
            if free is not None and free.inflight < ahead:
                free.assign(encode(item))
                pending.append([item, None, free])
            else:
                try:
                    pending.append([item, work(item), None])
                except SparsePatchError:
                    for entry in pending:  # an earlier item's error comes first
                        if entry[1] is None:
                            entry[1] = entry[2].result(block=True)
                    raise
            while pending:
                head = pending[0]
                if head[1] is None:
                    head[1] = head[2].result(block=len(pending) > hold)
                    if head[1] is None:
                        break
                pending.popleft()
                yield head[0], head[1]
        while pending:
            head = pending.popleft()
            if head[1] is None:
                head[1] = head[2].result(block=True)
            yield head[0], head[1]
        for w in pool:
            w.finish()
    finally:
        for w in pool:
            w.stop()


class _Worker:
    """This process's end: commands out through one pipe, results back through another,
    read without blocking while there is other work to do."""

    def __init__(self, pid: int, cmd: int, res: int):
        self.pid, self.cmd, self.res = pid, cmd, res
        self.buf = bytearray()
        self.inflight = 0

    @classmethod
    def start(cls, work: Callable[[T], bytes], decode: Callable[[bytes], T],
              others: list[_Worker]) -> _Worker | None:
        """Fork a worker; None where that fails (the caller then does without). others:
        the workers already running, whose pipe ends the new one must not keep open (a
        worker sees the end of its commands only when every copy of their pipe is shut)."""
        import signal

        fds: list[int] = []
        try:
            cmd_r, cmd_w = os.pipe()
            fds += [cmd_r, cmd_w]
            res_r, res_w = os.pipe()
            fds += [res_r, res_w]
        except OSError:
            for fd in fds:
                os.close(fd)
            return None
        _grow(cmd_w)
        _grow(res_w)
        # Ctrl-C, and a hangup, reach both processes (one process group): the worker
        # ignores them and this process stops it. SIGTERM aimed at the worker ends it at
        # once (not the handler a program may have set here). All three are held back
        # around the fork so that neither side sees one half-made.
        stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
                os.close(cmd_w)
                os.close(res_r)
                for w in others:
                    os.close(w.cmd)
                    os.close(w.res)
                _serve(work, decode, cmd_r, res_w)
            finally:
                os._exit(1)
        os.close(cmd_r)
        os.close(res_w)
        if pid < 0:
            os.close(cmd_w)
            os.close(res_r)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            return None
        worker = cls(pid, cmd_w, res_r)
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a held-back Ctrl-C is raised here
        except BaseException:
            worker.stop()
            raise
        return worker

    def assign(self, command: bytes) -> None:
        if len(command) > MAX_COMMAND:
            raise AssertionError(f"command of {len(command)} bytes exceeds {MAX_COMMAND}")
        self._send(_LEN.pack(len(command)) + command)
        self.inflight += 1

    def _send(self, data: bytes) -> None:
        try:
            os.write(self.cmd, data)  # at most MAX_COMMAND + 4 bytes: fits the empty pipe
        except BrokenPipeError:
            # The worker is gone: it sent an error first, or it died.
            while True:
                self._message(block=True)

    def result(self, block: bool) -> bytes | None:
        """The oldest outstanding item's result; None when not back yet and not block."""
        got = self._message(block)
        if got is None:
            return None
        kind, payload = got
        if kind != _RESULT:
            raise SparsePatchError("the worker process sent an end before all its results")
        self.inflight -= 1
        return payload

    def _message(self, block: bool) -> tuple[int, bytes] | None:
        while True:
            if len(self.buf) >= _HEAD.size:
                kind, length = _HEAD.unpack_from(self.buf)
                end = _HEAD.size + length
                if len(self.buf) >= end:
                    payload = bytes(self.buf[_HEAD.size : end])
                    del self.buf[:end]
                    if kind == _ERROR:
                        raise _error(payload)
                    return kind, payload
            if not block:
                import select

                if not select.select([self.res], [], [], 0)[0]:
                    return None
            data = os.read(self.res, _PIPE_SIZE)
            if not data:
                raise SparsePatchError(f"the worker process ended unexpectedly ({self._reap()})")
            self.buf += data

    def finish(self) -> None:
        self._send(_LEN.pack(0))  # no more items
        got = self._message(block=True)
        if got is None or got[0] != _END:
            raise SparsePatchError("the worker process sent a result nobody asked for")

    def _reap(self) -> str:
        """Wait for the worker; how it ended, in words."""
        if not self.pid:
            return "already reaped"
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:  # SIGCHLD ignored, or reaped by someone else
            self.pid = 0
            return "exit status unknown"
        self.pid = 0
        code = os.waitstatus_to_exitcode(status)
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def stop(self) -> None:
        for fd in (self.cmd, self.res):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.pid:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            self._reap()


def _serve(work: Callable[[T], bytes], decode: Callable[[bytes], T], cmd: int, res: int) -> None:
    """The worker: read a command, work, answer; until told there is no more, the parent
    is gone, or an error (which is sent, then the worker ends). Always leaves by _exit: no
    atexit handlers, no flushing of buffers inherited from the parent."""
    code = 0
    try:
        out = os.fdopen(res, "wb", buffering=_PIPE_SIZE)
        inp = os.fdopen(cmd, "rb", buffering=_PIPE_SIZE)

        def send(kind: int, payload: bytes) -> None:
            out.write(_HEAD.pack(kind, len(payload)))
            out.write(payload)
            out.flush()

        try:
            while True:
                head = inp.read(_LEN.size)
                if len(head) < _LEN.size:
                    break  # the parent is gone
                (n,) = _LEN.unpack(head)
                if n == 0:
                    send(_END, b"")
                    break
                send(_RESULT, work(decode(inp.read(n))))
        except SparsePatchError as e:
            text = f"{type(e).__name__}\0{e}".encode("utf-8", "surrogateescape")
            send(_ERROR, text)
    except BaseException:  # the parent is gone (EPIPE) or stopped us: nothing to tell
        code = 1
    finally:
        os._exit(code)


def _error(payload: bytes) -> SparsePatchError:
    """The worker's error as the same SparsePatchError class, with the same text."""
    name, _, text = payload.decode("utf-8", "surrogateescape").partition("\0")
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SparsePatchError)):
        cls = SparsePatchError
    return cls(text)


def _grow(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass  # the default 64 KiB pipe still holds any command (MAX_COMMAND)
