"""The input side of the verbs: a file or `-` (stdin) to read, the pieces of a split patch
read as one (Chain, and StableChain for a patch apply reads twice), and what an input
holds (sniff_read). Paths live here and in api; the layers below see open descriptors
and read callables."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable, Iterator
from typing import IO

import blake3

from . import sparse
from .errors import FormatError, IOFailure, Truncated, UsageError
from .format import sniff
from .paths import old_piece_name, piece_name, read_mode


def _stdin() -> IO[bytes]:
    if sys.stdin is None:  # started with descriptor 0 closed (`<&-`)
        raise IOFailure("standard input is closed")
    return sys.stdin.buffer


def open_file(path: str) -> int:
    """A descriptor for reading a file (or device) named by the user; a directory is refused
    here, since opening one for reading succeeds and only the first read would fail."""
    fd = sparse.open_path(path, os.O_RDONLY)
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise IOFailure(f"{path}: is a directory")
    return fd


@contextlib.contextmanager
def open_input(path: str) -> Iterator[IO[bytes]]:
    if path == "-":
        yield _stdin()
        return
    with os.fdopen(open_file(path), "rb", buffering=1 << 20) as f:
        yield f


def patch_pieces(paths: list[str]) -> list[str]:
    """The files a patch is read from: the paths given, or for a single PATCH.000 every
    numbered piece after it that exists (diff --split writes them).

    Only a regular file (not a symlink) owned by PATCH.000's owner counts as a found
    piece; discovery stops before any other name. In a sticky folder (/tmp) anyone may add
    PATCH.NNN after the last piece: a file of theirs would make an intact patch look
    corrupt, a FIFO would make it a stream (read once, with no check before writing) and
    block apply in open(). A piece missing or refused this way leaves the patch truncated,
    which reading it reports."""
    if len(paths) > 1:
        for path in paths:
            _given_piece(path)
        return paths
    if not paths[0].endswith(".000"):
        return paths
    stem = paths[0][:-4]
    try:
        owner = os.stat(paths[0]).st_uid
    except OSError:
        return paths  # opening it says what is wrong
    if not _found_piece(piece_name(stem, 1), owner):
        return paths
    out: list[str] = []
    name = piece_name
    while True:
        k = len(out)
        if k == 900 and not os.path.lexists(name(stem, k)) and os.path.lexists(old_piece_name(stem, k)):
            name = old_piece_name  # a set written before pieces were renamed to sort
        if k > 0 and not _found_piece(name(stem, k), owner):
            break
        out.append(name(stem, k))
    return out


@contextlib.contextmanager
def open_inputs(paths: list[str], twice: bool = False) -> Iterator[Chain]:
    """One reader over several files in order (pieces of a split patch). twice: the files
    will be read a second time after rewind(), which must see the same bytes (StableChain)."""
    chain = StableChain(paths) if twice else Chain(paths)
    try:
        yield chain
    except Truncated as e:
        note = unread_piece(paths)
        if note:
            raise Truncated(f"{e}{note}") from None
        raise
    finally:
        chain.close()


class Chain:
    """Reads files one after the other, holding one open at a time (a split patch may
    have more pieces than a process may open). rewind() starts again from the first
    byte; a piece opened again must be the same file (device, inode) with the size the
    first pass read, so that a second pass reads what the first did even if a path is
    replaced meanwhile. mode: the permission bits an output made from the pieces opened so
    far may have (paths.read_mode), from the files read, not their paths looked up again."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.mode = 0o666
        self.seen: list[tuple[int, int, int]] = []  # (st_dev, st_ino, bytes read) per piece
        self.current = 0
        self.f: IO[bytes] | None = None
        self.got = 0

    def _open(self) -> IO[bytes]:
        path = self.paths[self.current]
        if path == "-":
            self.mode &= read_mode(None)
            return _stdin()
        try:
            fd = open_file(path)
        except IOFailure as e:
            raise IOFailure(f"{e}{missing_patch_hint(path)}") from None
        self.mode &= read_mode(fd)
        st = os.fstat(fd)
        if self.current < len(self.seen):
            dev, ino, size = self.seen[self.current]
            if (st.st_dev, st.st_ino, st.st_size) != (dev, ino, size):
                os.close(fd)
                raise FormatError(f"{path}: the patch changed while apply was reading it")
        return os.fdopen(fd, "rb", buffering=1 << 20)

    def read(self, n: int) -> bytes:
        while self.current < len(self.paths):
            if self.f is None:
                self.f = self._open()
                self.got = 0
            chunk = self.f.read(n)
            if chunk:
                self.got += len(chunk)
                return chunk
            if self.current == len(self.seen) and self.paths[self.current] != "-":
                st = os.fstat(self.f.fileno())
                self.seen.append((st.st_dev, st.st_ino, self.got))
            self._close()
            self.current += 1
        return b""

    def _close(self) -> None:
        if self.f is not None and self.paths[self.current] != "-":
            self.f.close()
        self.f = None

    def rewind(self) -> None:
        self._close()
        self.current = 0

    def close(self) -> None:
        if self.current < len(self.paths):
            self._close()


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

    def __init__(self, paths: list[str]):
        super().__init__(paths)
        self.names = paths
        self.stamps: list[tuple[int, int, int, int, int]] = []  # per piece, when first opened
        self.digests = bytearray()
        self.total = 0  # bytes the first reading was given
        self._hasher = blake3.blake3()
        self._filled = 0  # bytes of the first reading's current window
        self._second = False
        self._window = b""  # the second reading's current window, checked
        self._start = 0  # its offset in the patch
        self._pos = 0  # bytes of it handed out

    @staticmethod
    def _stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _open(self) -> IO[bytes]:
        f = super()._open()
        stamp = self._stamp(os.fstat(f.fileno()))
        if self.current == len(self.stamps):
            self.stamps.append(stamp)
        elif stamp != self.stamps[self.current]:
            f.close()
            raise FormatError(f"{self.paths[self.current]}: the patch file changed while apply "
                              "was reading it (its size, mtime or ctime differ)")
        return f

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
            for name, a in zip(self.names, self.stamps, strict=True):
                try:
                    b = self._stamp(os.stat(name))
                except OSError:
                    b = None
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


def counting(read: Callable[[int], bytes], progress: Callable[[int], None]) -> Callable[[int], bytes]:
    def counted(n: int) -> bytes:
        chunk = read(n)
        progress(len(chunk))
        return chunk

    return counted


@contextlib.contextmanager
def open_source(path: str) -> Iterator[int]:
    """A descriptor to read path from, '-' being stdin; closed at the end unless it is
    stdin's, which is not ours."""
    if path == "-":
        yield _stdin().fileno()
        return
    fd = open_file(path)
    try:
        yield fd
    finally:
        os.close(fd)


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


def _given_piece(path: str) -> None:
    """One of several pieces named: a file, never a stream. `apply /tmp/p.* DEST` may
    name a FIFO another user added; opening it would block, and one stream among the
    pieces would make the whole patch one, read without the check before writing."""
    try:
        st = os.stat(path) if path != "-" else None
    except OSError:
        return  # opening it says what is wrong
    if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise UsageError(f"{path}: a piece of a split patch must be a regular file (a stream "
                         "is given alone: cat the pieces into '-')")


def _found_piece(path: str, owner: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == owner


def unread_piece(paths: list[str]) -> str:
    """For a split patch found short: why the name after its last piece, if there is one,
    was not read as the next piece (patch_pieces)."""
    if not paths or not paths[0].endswith(".000"):
        return ""
    stem, k = paths[0][:-4], len(paths)
    for name in dict.fromkeys((piece_name(stem, k), old_piece_name(stem, k))):
        try:
            st = os.lstat(name)
            owner = os.stat(paths[0]).st_uid
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            why = "it is a directory"
        elif not stat.S_ISREG(st.st_mode):
            why = "it is a symlink" if stat.S_ISLNK(st.st_mode) else "it is not a regular file"
        elif st.st_uid != owner:
            why = f"it belongs to uid {st.st_uid}, {paths[0]} to uid {owner}"
        else:
            continue
        return f"; {name} was not read as the next piece: {why}"
    return ""


def missing_patch_hint(path: str) -> str:
    """For a patch path that does not exist: a pointer to the split patch of that name."""
    if path != "-" and not os.path.lexists(path) and os.path.lexists(piece_name(path, 0)):
        return f" (a split patch? give {piece_name(path, 0)})"
    return ""


def sniff_read(source: Callable[[int], bytes], name: str) -> tuple[str, Callable[[int], bytes]]:
    """What source (a file's read, or a Chain's for the pieces of a split patch) holds,
    from its magic, and a read callable that still starts at byte 0 (stdin cannot seek
    back)."""
    head = b""
    while len(head) < 8:  # a Chain's read stops at the end of each piece
        chunk = source(8 - len(head))
        if not chunk:
            break
        head += chunk
    kind = sniff(head, name)
    pending = memoryview(head)

    def read(n: int) -> bytes:
        nonlocal pending
        if pending:
            out, pending = bytes(pending[:n]), pending[n:]
            return out
        return source(n)

    return kind, read
