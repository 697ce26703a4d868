"""Work shared with one forked process, for the CPU-bound loops of signature and diff.

A second thread does not help there: BLAKE3 at 16 KiB per call, and the per-block Python
around it, spend as much time handing the GIL over as hashing. So split_map() forks a
child that walks the same sequence of items (its copy of the iterator, from the item that
made it), does the items marked as its own, and writes each result to a pipe; this process
does the others and takes the child's results in order. The output is the same as one
process would make: which process did an item never shows in the result."""

from __future__ import annotations

import os
import struct
import sys
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, TypeVar

from . import errors
from .errors import IOFailure, SourceChanged, SparsePatchError

T = TypeVar("T")

_HEAD = struct.Struct("<BII")  # kind, key length, payload length
_RESULT, _ERROR, _END = 0, 1, 2
_PIPE_SIZE = 1 << 20  # lets the child run up to 1 MiB of results ahead
_F_SETPIPE_SZ = 1031
_Send = Callable[[int, bytes, bytes], None]


def worker_count() -> int:
    """Processes to use: two where two CPUs are ours, and only while this process runs one
    thread (a program that embeds the library may hold locks in other threads, which a
    forked child would inherit locked)."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 2 if cpus >= 2 else 1


def split_map(items: Iterable[T], theirs: Callable[[T], bool], work: Callable[[T], bytes],
              key: Callable[[T], bytes], changed: str, *, workers: int | None = None,
              child_setup: Callable[[], None] | None = None) -> Generator[tuple[T, bytes], None, None]:
    """(item, work(item)) for every item, in order. With two workers, the items for which theirs()
    is true are done by a child forked at the first of them. Both processes produce the
    sequence themselves; key(item) must agree for each of the child's items, or
    SourceChanged(changed) is raised (the items came from a file that changed between the
    two walks). An error of the child's is raised here as the same SparsePatchError class
    with the same text; the child never outlives the iteration."""
    it = iter(items)
    child: _Child | None = None
    workers = worker_count() if workers is None else workers
    try:
        for item in it:
            if workers > 1 and theirs(item):
                if child is None:
                    child = _Child(_body(item, it, theirs, work, key, child_setup))
                yield item, child.take(key(item), changed)
            else:
                yield item, work(item)
        if child is not None:
            child.finish(changed)
    finally:
        if child is not None:
            child.stop()


def _body(first: T, rest: Iterator[T], theirs: Callable[[T], bool], work: Callable[[T], bytes],
          key: Callable[[T], bytes], setup: Callable[[], None] | None) -> Callable[[_Send], None]:
    """What the child runs: the item that made it, then its share of the rest."""

    def run(send: _Send) -> None:
        if setup is not None:
            setup()
        send(_RESULT, key(first), work(first))
        for item in rest:
            if theirs(item):
                send(_RESULT, key(item), work(item))
    return run


def share_map(items: Iterable[T], work: Callable[[T], bytes], *, workers: int | None = None,
              ahead: int = 2, hold: int = 6) -> Generator[tuple[T, bytes], None, None]:
    """(item, work(item)) for every item, in order, with the items shared out as they come
    rather than by a fixed rule: for work whose cost varies from item to item (compressing
    data that may or may not compress). The child, forked at the second item, is kept
    busy with up to `ahead` items; this process does the others, holding at most `hold`
    results of its own while the child's oldest is not back yet."""
    it = iter(items)
    workers = worker_count() if workers is None else workers
    first = next(it, None)
    if first is None:
        return
    if workers < 2:
        yield first, work(first)
        for item in it:
            yield item, work(item)
        return
    pending: deque[list[Any]] = deque([[0, first, work(first)]])
    child: _Shared | None = None
    try:
        for idx, item in enumerate(it, 1):
            if child is None:
                child = _Shared(idx, item, it, work)
            if child.inflight < ahead:
                child.assign(idx)
                pending.append([idx, item, None])
            else:
                pending.append([idx, item, work(item)])
            while pending:
                head = pending[0]
                if head[2] is None:
                    got = child.result(head[0], block=len(pending) > hold)
                    if got is None:
                        break
                    head[2] = got
                pending.popleft()
                yield head[1], head[2]
        while pending:
            head = pending.popleft()
            if head[2] is None:
                assert child is not None
                head[2] = child.result(head[0], block=True)
            yield head[1], head[2]
        if child is not None:
            child.close()
    finally:
        if child is not None:
            child.stop()


class _Shared:
    """The parent's end of share_map: item numbers go to the child through one pipe, its
    results come back through another, read without blocking while there is other work."""

    def __init__(self, idx: int, item: T, rest: Iterator[T], work: Callable[[T], bytes]):
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        _grow(res_w)
        self.pid = os.fork()
        if self.pid == 0:
            os.close(cmd_w)
            os.close(res_r)
            _child_main(_share_body(idx, item, rest, work, cmd_r), res_w)  # never returns
        os.close(cmd_r)
        os.close(res_w)
        self.cmd, self.res = cmd_w, res_r
        self.buf = bytearray()
        self.inflight = 0

    def assign(self, idx: int) -> None:
        os.write(self.cmd, idx.to_bytes(8, "little"))
        self.inflight += 1

    def result(self, idx: int, block: bool) -> bytes | None:
        while True:
            if len(self.buf) >= _HEAD.size:
                kind, klen, plen = _HEAD.unpack_from(self.buf)
                end = _HEAD.size + klen + plen
                if len(self.buf) >= end:
                    k = bytes(self.buf[_HEAD.size : _HEAD.size + klen])
                    payload = bytes(self.buf[_HEAD.size + klen : end])
                    del self.buf[:end]
                    if kind == _ERROR:
                        raise _error(k, payload)
                    if kind != _RESULT or k != idx.to_bytes(8, "little"):
                        raise IOFailure("the worker process answered out of order")
                    self.inflight -= 1
                    return payload
            if not block:
                import select

                if not select.select([self.res], [], [], 0)[0]:
                    return None
            data = os.read(self.res, _PIPE_SIZE)
            if not data:
                _, status = os.waitpid(self.pid, 0)
                self.pid = 0
                raise IOFailure(f"the worker process ended unexpectedly (wait status {status})")
            self.buf += data

    def close(self) -> None:
        os.write(self.cmd, (2**64 - 1).to_bytes(8, "little"))

    def stop(self) -> None:
        for fd in (self.cmd, self.res):
            os.close(fd)
        if self.pid:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.pid = 0


def _share_body(idx: int, item: T, rest: Iterator[T], work: Callable[[T], bytes],
                cmd: int) -> Callable[[_Send], None]:
    """The child of share_map: wait for an item number, walk its own copy of the items up
    to it, do it, send the result; until the parent says there are no more."""

    def run(send: _Send) -> None:
        at, current = idx, item
        while True:
            data = b""
            while len(data) < 8:
                more = os.read(cmd, 8 - len(data))
                if not more:
                    return  # the parent is gone
                data += more
            want = int.from_bytes(data, "little")
            if want == 2**64 - 1:
                return
            while at < want:
                current = next(rest)
                at += 1
            send(_RESULT, want.to_bytes(8, "little"), work(current))

    return run


def _error(name: bytes, text: bytes) -> SparsePatchError:
    """The child's error as the same SparsePatchError class, with the same text."""
    cls = getattr(errors, name.decode("ascii", "replace"), None)
    if not (isinstance(cls, type) and issubclass(cls, SparsePatchError)):
        cls = IOFailure
    return cls(text.decode("utf-8", "replace"))


def _grow(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass  # a smaller pipe only means less read-ahead


class _Child:
    def __init__(self, body: Callable[[_Send], None]):
        rfd, wfd = os.pipe()
        _grow(wfd)
        self.pid = os.fork()
        if self.pid == 0:
            os.close(rfd)
            _child_main(body, wfd)  # never returns
        os.close(wfd)
        self.pipe = os.fdopen(rfd, "rb", buffering=_PIPE_SIZE)

    def _read(self, n: int) -> bytes:
        data = self.pipe.read(n)
        if len(data) != n:
            _, status = os.waitpid(self.pid, 0)
            self.pid = 0
            raise IOFailure(f"the worker process ended unexpectedly (wait status {status})")
        return data

    def _message(self) -> tuple[int, bytes, bytes]:
        kind, klen, plen = _HEAD.unpack(self._read(_HEAD.size))
        k = self._read(klen)
        payload = self._read(plen)
        if kind == _ERROR:
            raise _error(k, payload)
        return kind, k, payload

    def take(self, key: bytes, changed: str) -> bytes:
        kind, k, payload = self._message()
        if kind != _RESULT or k != key:
            raise SourceChanged(changed)
        return payload

    def finish(self, changed: str) -> None:
        if self._message()[0] != _END:
            raise SourceChanged(changed)

    def stop(self) -> None:
        self.pipe.close()  # a child still writing gets EPIPE and exits
        if self.pid:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.pid = 0


def _child_main(body: Callable[[_Send], None], wfd: int) -> None:
    """Run body, report its end or its error, and _exit: no atexit handlers, no flushing
    of buffers inherited from the parent."""
    code = 0
    try:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
        out = os.fdopen(wfd, "wb", buffering=_PIPE_SIZE)

        def send(kind: int, k: bytes, payload: bytes) -> None:
            out.write(_HEAD.pack(kind, len(k), len(payload)))
            out.write(k)
            out.write(payload)
            if kind == _RESULT:
                out.flush()

        try:
            body(send)
            send(_END, b"", b"")
        except SparsePatchError as e:
            send(_ERROR, type(e).__name__.encode(), str(e).encode())
        out.flush()
    except BaseException:  # the parent is gone (EPIPE) or stopped us: nothing to tell
        code = 1
    finally:
        os._exit(code)
