"""File plumbing under the verbs: inputs (`-` is stdin), outputs written under a temporary
name and renamed when complete, split patch pieces, and opening a destination for apply.
Paths live here and in api; the layers below see open descriptors and read/write callables."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO

import blake3

from . import sparse
from .errors import FormatError, IOFailure, Locked, UsageError
from .format import sniff
from .journal import Journal, device_journal_name, journal_path, open_private_dir, state_dir


def _stdin() -> IO[bytes]:
    if sys.stdin is None:  # started with descriptor 0 closed (`<&-`)
        raise IOFailure("standard input is closed")
    return sys.stdin.buffer


def _stdout() -> IO[bytes]:
    if sys.stdout is None:  # started with descriptor 1 closed (`>&-`)
        raise IOFailure("standard output is closed")
    return sys.stdout.buffer


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


def piece_name(stem: str, k: int) -> str:
    """The name of piece k of a split patch. Pieces 0-899 are STEM.000-STEM.899; after
    that, like split(1), each further group starts with one more 9 and is one digit
    wider (STEM.90000-STEM.98999, then STEM.9900000-...), so names sort in piece order
    in every locale and `cat STEM.*` reads them in order however many there are."""
    width, count, prefix = 3, 900, ""
    while k >= count:
        k -= count
        width, count, prefix = width + 1, count * 10, prefix + "9"
    return f"{stem}.{prefix}{k:0{width}d}"


def _old_piece_name(stem: str, k: int) -> str:
    """The names sparsepatch 0.1.0 gave: on from STEM.900 to STEM.999, STEM.1000, ..."""
    return f"{stem}.{k:03d}"


def patch_pieces(paths: list[str]) -> list[str]:
    """The files a patch is read from: the paths given, or for a single PATCH.000 every
    numbered piece after it that exists (diff --split writes them)."""
    if len(paths) == 1 and paths[0].endswith(".000") and os.path.lexists(piece_name(paths[0][:-4], 1)):
        stem = paths[0][:-4]
        out: list[str] = []
        name = piece_name
        while True:
            k = len(out)
            if k == 900 and not os.path.lexists(name(stem, k)) and os.path.lexists(_old_piece_name(stem, k)):
                name = _old_piece_name  # a set written before pieces were renamed to sort
            if not os.path.lexists(name(stem, k)):
                break
            out.append(name(stem, k))
        return out or paths  # PATCH.000 itself missing: opening it says so
    return paths


@contextlib.contextmanager
def open_inputs(paths: list[str], twice: bool = False) -> Iterator[Chain]:
    """One reader over several files in order (pieces of a split patch). twice: the files
    will be read a second time after rewind(), which must see the same bytes (StableChain)."""
    chain = StableChain(paths) if twice else Chain(paths)
    try:
        yield chain
    finally:
        chain.close()


class Chain:
    """Reads files one after the other, holding one open at a time (a split patch may
    have more pieces than a process may open). rewind() starts again from the first
    byte; a piece opened again must be the same file (device, inode) with the size the
    first pass read, so that a second pass reads what the first did even if a path is
    replaced meanwhile."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.seen: list[tuple[int, int, int]] = []  # (st_dev, st_ino, bytes read) per piece
        self.current = 0
        self.f: IO[bytes] | None = None
        self.got = 0

    def _open(self) -> IO[bytes]:
        path = self.paths[self.current]
        if path == "-":
            return _stdin()
        fd = open_file(path)
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


@contextlib.contextmanager
def open_output(path: str | None, split: int | None = None,
                mode: int = 0o666) -> Iterator[Callable[[bytes], object]]:
    """Write to stdout, or to a temporary file beside path renamed over it when complete,
    so that an interrupted run never leaves a file that looks finished. With split, write
    pieces of at most split bytes each (piece_name), all renamed at the end. The file
    gets the permission bits mode, less the umask.

    The folder is opened once and everything happens relative to it. In a folder that
    others may write to and that has the sticky bit (/tmp), a symlink, FIFO or device
    that is neither ours nor the folder owner's is refused, as the kernel's
    protected_symlinks and protected_fifos do: another user may have planted it there."""
    if path is None or path == "-":
        if split:
            raise UsageError("--split needs -o FILE")
        with _direct(_stdout(), "standard output") as out:
            yield out
        return
    folder, name = os.path.split(os.path.abspath(path))
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise IOFailure(f"{path}: cannot create output: {e.strerror}") from None
    try:
        if split:
            _check_piece_size(dfd, folder, split)
            with _pieces(dfd, path, split, mode) as out:
                yield out
            return
        special = _open_special(dfd, name, path)
        if special is not None:
            # /dev/null, a FIFO, a tape: write into it; renaming over it would replace the node.
            with os.fdopen(special, "wb", buffering=0) as f, _direct(f, path) as out:
                yield out
            return
        with _pieces(dfd, path, None, mode) as out:
            yield out
    finally:
        os.close(dfd)


FAT_MAX_FILE = (4 << 30) - 1  # the largest file FAT12/16/32 can hold


def _check_piece_size(dfd: int, folder: str, split: int) -> None:
    if split > FAT_MAX_FILE and _fs_type(dfd) in ("vfat", "msdos", "fat"):
        raise UsageError(f"{folder} is on FAT, whose largest file is 4 GiB - 1 byte: "
                         "use --split fat32 (or 4095M)")


def _fs_type(fd: int) -> str | None:
    """The type of the filesystem fd is on, from /proc/self/mountinfo (None if unknown)."""
    dev = os.fstat(fd).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[2] == want and " - " in line:
            return line.split(" - ", 1)[1].split()[0]
    return None


def _shared(st: os.stat_result) -> bool:
    """A sticky folder that others may write to (/tmp), where anyone may plant a name."""
    return bool(st.st_mode & stat.S_ISVTX and st.st_mode & (stat.S_IWOTH | stat.S_IWGRP))


def _trusted(owner: int, folder: os.stat_result) -> bool:
    return owner in (os.geteuid(), folder.st_uid)


def _open_special(dfd: int, name: str, path: str) -> int | None:
    """An open descriptor for path when it is a device or FIFO to write into (following
    symlinks one by one, each under the rule above); None when the output is to be a new
    regular file renamed into place (a symlink to a regular file is replaced by it)."""
    owned = os.dup(dfd)
    try:
        for _ in range(40):
            folder = os.fstat(owned)
            try:
                st = os.stat(name, dir_fd=owned, follow_symlinks=False)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise IOFailure(f"{path}: cannot create output: {e.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                raise IOFailure(f"{path}: is a directory")
            if stat.S_ISREG(st.st_mode):
                return None
            if _shared(folder) and not _trusted(st.st_uid, folder):
                kind = "symlink" if stat.S_ISLNK(st.st_mode) else "FIFO or device"
                raise IOFailure(f"{path}: refusing to write through a {kind} owned by uid "
                                f"{st.st_uid} in a folder others can write to")
            if not stat.S_ISLNK(st.st_mode):
                try:
                    fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC,
                                 dir_fd=owned)
                except OSError as e:
                    raise IOFailure(f"{path}: cannot open: {e.strerror}") from None
                now = os.fstat(fd)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)
                    raise IOFailure(f"{path}: replaced while it was being opened")
                return fd
            target = os.readlink(name, dir_fd=owned)
            parent, name = os.path.split(target)
            if parent:
                try:
                    nxt = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=owned)
                except OSError as e:
                    raise IOFailure(f"{path}: cannot open: {e.strerror}") from None
                os.close(owned)
                owned = nxt
            if not name:
                raise IOFailure(f"{path}: is a directory")
        raise IOFailure(f"{path}: too many levels of symbolic links")
    finally:
        os.close(owned)


@contextlib.contextmanager
def _pieces(dfd: int, path: str, split: int | None, mode: int) -> Iterator[Callable[[bytes], object]]:
    """One temporary per output file in the folder dfd, renamed into place at the end."""
    names = (lambda k: piece_name(path, k)) if split else (lambda k: path)
    pieces: list[_PartFile] = []
    left = split or 0
    if split:
        # A re-split that is interrupted must not leave the previous set to be applied as
        # if it were the new one: its first piece goes before anything else happens.
        _unlink(dfd, piece_name(path, 0))
        sparse.sync(dfd)

    def write(b: bytes) -> None:
        nonlocal left
        if not split:
            pieces[0].write(b)
            return
        view = memoryview(b)
        while view:
            if left == 0:
                _PartFile(dfd, names(len(pieces)), pieces, mode)
                left = split
            n = min(len(view), left)
            pieces[-1].write(view[:n])
            left -= n
            view = view[n:]

    try:
        _PartFile(dfd, names(0), pieces, mode)
        yield write
        for piece in pieces:
            piece.close()
        if split:
            # Pieces a previous, longer patch of the same name left behind would be read on.
            for name, first in ((piece_name, len(pieces)), (_old_piece_name, max(len(pieces), 900))):
                k = first
                while _unlink(dfd, name(path, k)):
                    k += 1
        # Last piece first: the first piece, the name a user reaches for, appears only
        # when the rest are in place.
        for piece in reversed(pieces):
            piece.commit()
        sparse.sync(dfd)
    except BaseException:
        for piece in pieces:
            piece.abort()
        raise


def _unlink(dfd: int, path: str) -> bool:
    """Remove a stale piece; False if there is none."""
    try:
        os.unlink(os.path.basename(path), dir_fd=dfd)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise IOFailure(f"{path}: cannot remove the stale piece: {e.strerror}") from None
    return True


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
    """An output file written under a temporary name beside its final one. Everything
    goes through descriptors (the folder's and the file's): in a folder another user can
    write to, a path may be swapped for a symlink between two calls."""

    def __init__(self, dfd: int, path: str, registry: list[_PartFile], mode: int):
        self.dfd, self.path, self.mode = dfd, path, mode
        self.name = os.path.basename(path)
        self.tmp = ""
        self.fd = -1
        self.f: IO[bytes] | None = None
        self.ident = (0, 0)
        # Registered before the file exists, so that an interrupt at any point after
        # the open still finds it to remove.
        registry.append(self)
        for _ in range(100):
            # The name is known before the file exists (mkstemp would only say afterwards).
            self.tmp = f".{self.name}.{os.urandom(4).hex()}.part"
            try:
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                break
            except FileExistsError:
                continue
            except OSError as e:
                self.tmp = ""
                raise IOFailure(f"{path}: cannot create output: {e.strerror}") from None
        st = os.fstat(self.fd)
        self.ident = (st.st_dev, st.st_ino)
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
            os.fchmod(self.f.fileno(), self.mode & ~_umask() & 0o7777)
            sparse.sync(self.f.fileno())
            self.f.close()
        except OSError as e:
            raise IOFailure(f"{self.path}: cannot finish output: {e.strerror}") from None

    def commit(self) -> None:
        try:
            st = os.stat(self.tmp, dir_fd=self.dfd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != self.ident:
                raise IOFailure(f"{self.path}: the temporary file {self.tmp} was replaced by "
                                "someone else; the output was not written")
            os.replace(self.tmp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
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
                os.unlink(self.tmp, dir_fd=self.dfd)


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
        return _stdin().fileno(), False
    return open_file(path), True


def output_mode(*inputs: str | None) -> int:
    """The permission bits an output made from inputs may have: no more than any input's
    (read, write), so that a signature or patch of a private image stays private. A stream
    counts as 0600: where it came from, and who could read it there, is unknown."""
    mode = 0o666
    for path in inputs:
        if path is None:
            continue
        bits = 0o600
        if path != "-":
            try:
                st = os.stat(path)
            except OSError:
                continue  # opening it reports the problem
            if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
                bits = st.st_mode & 0o666
        mode &= bits
    return mode


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


class NewDest:
    """A destination this run created: the folder it was created in, held open, and the
    file's identity. Removing it then removes that file and no other, even if a folder on
    its path has been swapped for a symbolic link meanwhile."""

    def __init__(self, dir_fd: int, name: str, fd: int):
        self.dir_fd, self.name = dir_fd, name
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)

    def remove_if_empty(self, fd: int) -> None:
        """Remove the file if nothing was written into it (it would only pass for an
        interrupted first copy) and the name still is that file."""
        try:
            if os.fstat(fd).st_size:
                return
            now = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != self.ident:
                return
            sparse.unlink(self.name, dir_fd=self.dir_fd)
            sparse.sync_dir(self.dir_fd)
        except OSError:
            pass  # the error that brought us here is the one to report

    def close(self) -> None:
        os.close(self.dir_fd)


def _dest_error(dest: str, e: OSError) -> IOFailure:
    if isinstance(e, FileNotFoundError):
        return IOFailure(f"{dest}: no such file")
    if isinstance(e, PermissionError):
        return IOFailure(f"{dest}: permission denied")
    return IOFailure(f"{dest}: {e.strerror}")


def open_dest(dest: str, full: bool, mode: int = 0o666) -> tuple[int, NewDest | None]:
    """Open dest for update; a full patch may create it (with mode, less the umask).
    Returns (fd, what this run created or None).

    Looked up relative to its folder, held open. A symbolic link at the last component is
    never followed for a full patch (another user may have planted it, in /tmp, to steer a
    new image into a file of root's), and for an update only when it belongs to the user
    running apply or to root, as the kernel's protected_symlinks trusts. An existing empty
    file is resumed as an interrupted first copy only if it is ours: one another user
    created would leave them owning the image."""
    folder, name = os.path.split(dest)
    if not name:
        raise IOFailure(f"{dest}: is a directory")
    try:
        dir_fd = sparse.open_dir(folder)
    except OSError as e:
        raise _dest_error(dest, e) from None
    try:
        for _ in range(40):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                if not full:
                    raise IOFailure(f"{dest}: no such file; only a full patch (diff --full) can "
                                    "create a destination") from None
                created = _create_dest(dir_fd, name, dest, mode)
                if created is None:
                    continue  # created by someone else meanwhile: treat as existing
                return created, NewDest(dir_fd, name, created)
            except OSError as e:
                raise _dest_error(dest, e) from None
            if stat.S_ISLNK(st.st_mode):
                dir_fd, name = _follow_dest_link(dir_fd, name, st, dest, full)
                continue
            if stat.S_ISDIR(st.st_mode):
                raise IOFailure(f"{dest}: is a directory")
            if full and stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_uid != os.geteuid():
                raise IOFailure(f"{dest}: exists, empty and owned by uid {st.st_uid}: a first copy "
                                f"is resumed only in a file of uid {os.geteuid()}'s; remove it")
            try:
                if stat.S_ISBLK(st.st_mode):
                    fd = sparse.open_device_exclusive(dest, dir_fd=dir_fd, name=name)
                else:
                    fd = sparse.open_at(dir_fd, name, os.O_RDWR)
            except OSError as e:
                raise _dest_error(dest, e) from None
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                raise IOFailure(f"{dest}: replaced while it was being opened")
            os.close(dir_fd)
            return fd, None
        raise IOFailure(f"{dest}: too many levels of symbolic links")
    except BaseException:
        os.close(dir_fd)
        raise


def _create_dest(dir_fd: int, name: str, dest: str, mode: int) -> int | None:
    """The new file name in dir_fd, its name synced into the folder; None if it exists."""
    try:
        fd = sparse.open_at(dir_fd, name, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return None
    except OSError as e:
        raise IOFailure(f"{dest}: cannot create: {e.strerror}") from None
    try:
        # Its name is durable only once the folder is synced; the journal's sync does not
        # do it when the journal lives elsewhere (--journal).
        sparse.sync_dir(dir_fd)
    except OSError as e:
        os.close(fd)
        raise IOFailure(f"{dest}: cannot sync its folder: {e.strerror}") from None
    return fd


def _follow_dest_link(dir_fd: int, name: str, st: os.stat_result, dest: str,
                      full: bool) -> tuple[int, str]:
    """One step through the symbolic link name in dir_fd: the folder (held open, dir_fd
    closed) and name it points to, if the rules of open_dest allow following it."""
    if full:
        raise IOFailure(f"{dest}: is a symbolic link; a full patch creates a file and does not "
                        "write through one: give the path of the file itself")
    if st.st_uid not in (os.geteuid(), 0):
        raise IOFailure(f"{dest}: refusing to follow a symbolic link owned by uid {st.st_uid} "
                        f"(only links of uid {os.geteuid()} or root are followed): give its "
                        "target's path")
    try:
        target = os.readlink(name, dir_fd=dir_fd)
        again = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        raise _dest_error(dest, e) from None
    if (again.st_dev, again.st_ino, again.st_uid) != (st.st_dev, st.st_ino, st.st_uid):
        raise IOFailure(f"{dest}: replaced while it was being opened")
    parent, name = os.path.split(target)
    if not name:
        raise IOFailure(f"{dest}: is a directory")
    if parent:
        try:
            nxt = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as e:
            raise _dest_error(dest, e) from None
        os.close(dir_fd)
        dir_fd = nxt
    return dir_fd, name


def claim_dest(fd: int, dest: str, allow_in_use: bool = False) -> None:
    """Refuse a destination something else is using, before anything is written: another
    apply (always), a program holding a lock on it (qemu), or a loop device backed by it
    (a mounted image). allow_in_use skips the last two."""
    sparse.lock_destination(fd, dest, allow_in_use)
    if allow_in_use or not stat.S_ISREG(os.fstat(fd).st_mode):
        return  # a device is opened O_EXCL: mounted or claimed elsewhere, it is refused there
    loops = sparse.loop_devices_of(fd)
    if loops:
        raise Locked(f"{dest}: in use: backing file of {', '.join(loops)}; "
                     "--allow-in-use applies anyway")


def default_journal(dest: str) -> str:
    """Beside a file; for a block device (whose /dev folder is not durable) in a private
    state directory, named by device number and size."""
    try:
        st = os.stat(dest)
    except OSError:
        return journal_path(dest)
    if stat.S_ISBLK(st.st_mode):
        fd = sparse.open_path(dest, os.O_RDONLY)
        try:
            size = sparse.file_size(fd)
        finally:
            os.close(fd)
        return os.path.join(state_dir(), device_journal_name(st.st_rdev, size))
    return journal_path(dest)


def open_journal(dest: str, fd: int, override: str | None = None, inputs: Sequence[str] = ()) -> Journal:
    """The journal for the destination open on fd (not yet read): override, or beside a
    file, or in the private state directory for a block device. Only the destination's
    owner and we may own an existing journal beside it or at override; in the private
    directory, only we. The journal may be neither the destination nor one of inputs
    (the patch's files)."""
    st = os.fstat(fd)
    owners = frozenset({os.geteuid(), st.st_uid})
    not_files = {(st.st_dev, st.st_ino): f"the destination {dest}"}
    for path in inputs:
        if path != "-":
            with contextlib.suppress(OSError):
                s = os.stat(path)
                not_files.setdefault((s.st_dev, s.st_ino), f"the patch {path}")
    if override is None and stat.S_ISBLK(st.st_mode):
        folder = state_dir()
        name = device_journal_name(st.st_rdev, sparse.file_size(fd))
        return Journal(open_private_dir(folder), name, os.path.join(folder, name),
                       frozenset({os.geteuid()}), not_files)
    path = override or journal_path(dest)
    folder, name = os.path.split(path)
    try:
        dir_fd = sparse.open_dir(folder)
    except OSError as e:
        raise IOFailure(f"{folder or '.'}: cannot open the journal's folder: {e.strerror}") from None
    if override is None:
        # The folder looked up by path must be the one the destination was opened in, or
        # the journal would guard another file.
        try:
            here = os.stat(os.path.basename(dest), dir_fd=dir_fd)
        except OSError:
            here = None
        if here is None or (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
            os.close(dir_fd)
            raise IOFailure(f"{dest}: was moved or replaced while apply opened it")
    return Journal(dir_fd, name, path, owners, not_files)
