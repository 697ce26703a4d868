"""File plumbing under the verbs: inputs (`-` is stdin), outputs written under a temporary
name and renamed when complete, split patch pieces, and opening a destination for apply.
Paths live here and in api; the layers below see open descriptors and read/write callables."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable, Iterator
from typing import IO

import blake3

from . import sparse
from .errors import FormatError, IOFailure, UsageError
from .format import sniff
from .journal import journal_path


@contextlib.contextmanager
def open_input(path: str) -> Iterator[IO[bytes]]:
    if path == "-":
        yield sys.stdin.buffer
        return
    fd = sparse.open_path(path, os.O_RDONLY)
    with os.fdopen(fd, "rb", buffering=1 << 20) as f:
        yield f


def patch_pieces(paths: list[str]) -> list[str]:
    """The files a patch is read from: the paths given, or for a single PATCH.000 every
    numbered piece after it that exists (diff --split writes them)."""
    if len(paths) == 1 and paths[0].endswith(".000") and os.path.exists(paths[0][:-4] + ".001"):
        stem, k, out = paths[0][:-4], 0, []
        while os.path.exists(f"{stem}.{k:03d}"):
            out.append(f"{stem}.{k:03d}")
            k += 1
        return out or paths
    return paths


@contextlib.contextmanager
def open_inputs(paths: list[str], twice: bool = False) -> Iterator[Chain]:
    """One reader over several files in order (pieces of a split patch). twice: the files
    will be read a second time after rewind(), which must see the same bytes (StableChain)."""
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(open_input(p)) for p in paths]
        yield StableChain(opened, paths) if twice else Chain(opened)


class Chain:
    """Reads files one after the other; rewind() starts again from the first byte of the
    same open files (so a second pass reads what the first did, even if a path is
    replaced meanwhile)."""

    def __init__(self, files: list[IO[bytes]]):
        self.files = files
        self.current = 0

    def read(self, n: int) -> bytes:
        while self.current < len(self.files):
            chunk = self.files[self.current].read(n)
            if chunk:
                return chunk
            self.current += 1
        return b""

    def rewind(self) -> None:
        for f in self.files:
            f.seek(0)
        self.current = 0


class StableChain(Chain):
    """A Chain read twice, whose second reading hands out only the bytes the first one saw.

    apply checks a patch file whole before its first write, then reads it again to write:
    the check is worth something only if both readings see the same bytes. Holding the
    open files (Chain) keeps a path replaced meanwhile out of it; a file written in place
    is caught here. Before the second reading, every file's size, mtime and ctime must
    be what they were when it was opened, or it is refused with nothing written. During
    the second reading, each WINDOW of bytes is read whole and compared with the BLAKE3
    digest the first reading recorded for it before any of its bytes are handed out, so
    no record is used unless all its bytes are the ones checked. Memory: one window and
    32 bytes per window of patch."""

    WINDOW = 1 << 20

    def __init__(self, files: list[IO[bytes]], names: list[str]):
        super().__init__(files)
        self.names = names
        self.stamps = self._stamps()
        self.digests = bytearray()
        self.total = 0  # bytes the first reading was given
        self._hasher = blake3.blake3()
        self._filled = 0  # bytes of the first reading's current window
        self._second = False
        self._window = b""  # the second reading's current window, checked
        self._start = 0  # its offset in the patch
        self._pos = 0  # bytes of it handed out

    def _stamps(self) -> list[tuple[int, int, int, int, int]]:
        out = []
        for f in self.files:
            st = os.fstat(f.fileno())
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return out

    def read(self, n: int) -> bytes:
        if self._second:
            return self._read_checked(n)
        data = super().read(n)
        view = memoryview(data)
        while view:
            k = min(len(view), self.WINDOW - self._filled)
            self._hasher.update(view[:k])
            self._filled += k
            view = view[k:]
            if self._filled == self.WINDOW:
                self._close_window()
        self.total += len(data)
        return data

    def _close_window(self) -> None:
        self.digests += self._hasher.digest()
        self._hasher = blake3.blake3()
        self._filled = 0

    def rewind(self) -> None:
        super().rewind()
        self._window, self._start, self._pos = b"", 0, 0
        if not self._second:
            if self._filled:
                self._close_window()
            now = self._stamps()
            for name, a, b in zip(self.names, self.stamps, now, strict=True):
                if a != b:
                    raise FormatError(
                        f"{name}: the patch file changed while apply was reading it (its size, "
                        "mtime or ctime differ from when it was opened); nothing was written"
                    )
            self._second = True

    def _read_checked(self, n: int) -> bytes:
        if self._pos == len(self._window):
            start = self._start + len(self._window)
            # Past what the first reading was given, it found the end of the patch: so
            # does this one (bytes appended since are not part of what was checked).
            want = min(self.WINDOW, self.total - start)
            if want <= 0:
                return b""
            parts, got = [], 0
            while got < want:
                chunk = super().read(want - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            window = b"".join(parts)
            k = start // self.WINDOW
            if blake3.blake3(window).digest() != self.digests[k * 32 : (k + 1) * 32]:
                raise FormatError(
                    f"{self._name_at(start)}: the patch file changed while apply was reading it "
                    f"(bytes {start}..{start + want - 1} of the patch are not what was "
                    "checked); stopped before using them: the blocks written are whole, apply "
                    "the unchanged patch again to finish"
                )
            self._window, self._start, self._pos = window, start, 0
        out = self._window[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def _name_at(self, offset: int) -> str:
        """The piece that holds byte offset of the patch."""
        for name, st in zip(self.names, self.stamps, strict=True):
            if offset < st[2]:
                return name
            offset -= st[2]
        return self.names[-1]


@contextlib.contextmanager
def open_output(path: str | None, split: int | None = None) -> Iterator[Callable[[bytes], object]]:
    """Write to stdout, or to a temporary file beside path renamed over it when complete,
    so that an interrupted run never leaves a file that looks finished. With split, write
    path.000, path.001, ... of at most split bytes each, all renamed at the end."""
    if path is None or path == "-":
        if split:
            raise UsageError("--split needs -o FILE")
        with _direct(sys.stdout.buffer, "standard output") as out:
            yield out
        return
    if not split and _is_special(path):
        # /dev/null, a FIFO, a tape: write into it; renaming over it would replace the node.
        try:
            f = open(path, "wb", buffering=0)  # nothing left to flush (and fail) at close
        except OSError as e:
            raise IOFailure(f"{path}: cannot open: {e.strerror}") from None
        with f, _direct(f, path) as out:
            yield out
        return
    pieces: list[_PartFile] = []
    left = split or 0

    def write(b: bytes) -> None:
        nonlocal left
        if not split:
            pieces[0].write(b)
            return
        view = memoryview(b)
        while view:
            if left == 0:
                _PartFile(f"{path}.{len(pieces):03d}", pieces)
                left = split
            n = min(len(view), left)
            pieces[-1].write(view[:n])
            left -= n
            view = view[n:]

    try:
        _PartFile(f"{path}.000" if split else path, pieces)
        left = split or 0
        yield write
        for piece in pieces:
            piece.close()
        if split:
            # Pieces a previous, longer patch of the same name left behind would be read on.
            k = len(pieces)
            while os.path.exists(f"{path}.{k:03d}"):
                os.unlink(f"{path}.{k:03d}")
                k += 1
        # Last piece first: PATCH.000, the name a user reaches for, appears only when the
        # rest are in place.
        for piece in reversed(pieces):
            piece.commit()
        sparse.sync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        for piece in pieces:
            piece.abort()
        raise


@contextlib.contextmanager
def _direct(f: IO[bytes], name: str) -> Iterator[Callable[[bytes], object]]:
    """Writes to an already open stream, with errors as one line (a broken pipe stays a
    BrokenPipeError: the CLI treats a reader that went away as a quiet exit)."""

    def write(b: bytes) -> None:
        try:
            f.write(b)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise IOFailure(f"{name}: write failed: {e.strerror}") from None

    yield write
    try:
        f.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise IOFailure(f"{name}: write failed: {e.strerror}") from None


class _PartFile:
    """An output file written under a temporary name beside its final one."""

    def __init__(self, path: str, registry: list[_PartFile]):
        self.path = path
        self.tmp = ""
        self.fd = -1
        self.f: IO[bytes] | None = None
        # Registered before the file exists, so that an interrupt at any point after
        # mkstemp still finds it to remove.
        registry.append(self)
        folder, base = os.path.split(os.path.abspath(path))
        for _ in range(100):
            # The name is known before the file exists (mkstemp would only say afterwards).
            self.tmp = os.path.join(folder, f".{base}.{os.urandom(4).hex()}.part")
            try:
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                  0o600)
                break
            except FileExistsError:
                continue
            except OSError as e:
                self.tmp = ""
                raise IOFailure(f"{path}: cannot create output: {e.strerror}") from None
        self.f = os.fdopen(self.fd, "wb", buffering=1 << 20)

    def write(self, b: bytes | memoryview) -> None:
        assert self.f is not None
        try:
            self.f.write(b)
        except OSError as e:
            raise IOFailure(f"{self.path}: write failed: {e.strerror}") from None

    def close(self) -> None:
        assert self.f is not None
        try:
            self.f.flush()
            sparse.sync(self.f.fileno())
            self.f.close()
            os.chmod(self.tmp, 0o666 & ~_umask())
        except OSError as e:
            raise IOFailure(f"{self.path}: cannot finish output: {e.strerror}") from None

    def commit(self) -> None:
        try:
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise IOFailure(f"{self.path}: cannot finish output: {e.strerror}") from None
        self.tmp = ""

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            if self.f is not None:
                self.f.close()
            elif self.fd >= 0:
                os.close(self.fd)
        if self.tmp:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


def sniff_input(f: IO[bytes], name: str) -> tuple[str, Callable[[int], bytes]]:
    """What f holds, from its magic, and a read callable that still starts at byte 0
    (stdin cannot seek back)."""
    head = f.read(8)
    kind = sniff(head, name)
    pending = memoryview(head)

    def read(n: int) -> bytes:
        nonlocal pending
        if pending:
            out, pending = bytes(pending[:n]), pending[n:]
            return out
        return f.read(n)

    return kind, read


def counting(read: Callable[[int], bytes], progress: Callable[[int], None]) -> Callable[[int], bytes]:
    def counted(n: int) -> bytes:
        chunk = read(n)
        progress(len(chunk))
        return chunk

    return counted


def _is_special(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def refuse_overwrite(output: str | None, *inputs: str | None) -> None:
    """-o naming an input would rename the output over it: a typo that destroys an image."""
    if output is None or output == "-" or not os.path.exists(output):
        return
    for path in inputs:
        if path and path != "-" and os.path.exists(path) and os.path.samefile(output, path):
            raise UsageError(f"{output}: the output would replace the input {path}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_source(path: str) -> tuple[int, bool]:
    if path == "-":
        return sys.stdin.fileno(), False
    return sparse.open_path(path, os.O_RDONLY), True


def data_size(path: str) -> int | None:
    """Bytes in path's data extents (what signature and diff will read); None for a stream."""
    if path == "-":
        return None
    fd = sparse.open_path(path, os.O_RDONLY)
    try:
        if not sparse.is_seekable(fd):
            return None
        size = sparse.file_size(fd)
        return sum(end - start for start, end in sparse.data_extents(fd, size))
    finally:
        os.close(fd)


def input_size(path: str) -> int | None:
    """Size of a regular file to be read whole (a patch), None for a stream."""
    if path == "-":
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def open_dest(dest: str, full: bool) -> tuple[int, bool]:
    """Open dest for update; a full patch may create it. Returns (fd, created)."""
    if not os.path.exists(dest) and full:
        try:
            return os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), True
        except FileExistsError:  # created by someone else meanwhile: treat as existing
            pass
        except OSError as e:
            raise IOFailure(f"{dest}: cannot create: {e.strerror}") from None
    try:
        fd = sparse.open_path(dest, os.O_RDWR)
    except IOFailure as e:
        if not full and not os.path.lexists(dest):
            raise IOFailure(
                f"{dest}: no such file; only a full patch (diff --full) can create a destination"
            ) from None
        raise e
    if sparse.is_block_device(fd):
        os.close(fd)
        return sparse.open_device_exclusive(dest), False
    return fd, False


def default_journal(dest: str) -> str:
    """Beside a file; for a block device (whose /dev folder is not durable) in /var/tmp."""
    try:
        st = os.stat(dest)
    except OSError:
        return journal_path(dest)
    if stat.S_ISBLK(st.st_mode):
        # Named by device number, so every path to the device finds the same journal.
        dev = f"{os.major(st.st_rdev)}-{os.minor(st.st_rdev)}"
        return os.path.join("/var/tmp", f"sparsepatch-blockdev-{dev}.journal")
    return journal_path(dest)


