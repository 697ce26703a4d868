"""The output side of the verbs: stdout, or a file written under a temporary name and
renamed over its final one when complete, so that an interrupted run never leaves a file
that looks finished; the pieces of a split patch and their names; and the permission bits
an output may have. Everything after the folder is opened goes through descriptors: in a
folder another user can write to, a name may be swapped for a symlink between two calls."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Callable, Iterator
from typing import IO

from . import paths, sparse
from .errors import IOFailure, UsageError, io_errors, io_failure
from .paths import old_piece_name, piece_name


def _stdout() -> IO[bytes]:
    if sys.stdout is None:  # started with descriptor 1 closed (`>&-`)
        raise IOFailure("standard output is closed")
    return sys.stdout.buffer


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
    if os.path.basename(path) in ("", ".", ".."):
        # abspath drops such an ending: the file (or a split patch's pieces, as .000, .001)
        # would be written beside the folder named, in its parent.
        raise IOFailure(f"{path}: names a folder; name the file to write")
    folder, name = os.path.split(paths.absolute(path))
    with io_errors(f"{path}: cannot create output"):
        dfd = paths.open_dir(folder)
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


# Mount types of FAT12/16/32 (exFAT holds larger files). fusefat is how a USB stick is
# mounted where the vfat module is not loaded, or without root.
FAT_TYPES = ("vfat", "msdos", "fat", "umsdos", "fuse.fusefat")


def _check_piece_size(dfd: int, folder: str, split: int) -> None:
    if split > FAT_MAX_FILE and _fs_type(dfd) in FAT_TYPES:
        raise UsageError(f"{folder} is on FAT, whose largest file is 4 GiB - 1 byte: "
                         "use --split fat32 (or 4095M)")


def _fs_type(fd: int) -> str:
    """The type of the filesystem fd is on ("" if unknown)."""
    return sparse.fs_type(os.fstat(fd).st_dev)


def _trusted(owner: int) -> bool:
    """Whose symlinks, FIFOs and devices an output may go through or into: ours, or root's
    (/dev/null). Not the folder owner's: root writing into a folder another user owns
    would otherwise follow that user's symlink onto a disk."""
    return owner in (os.geteuid(), 0)


def _open_special(dfd: int, name: str, path: str) -> int | None:
    """An open descriptor for path when it is a device or FIFO to write into; None when the
    output is to be a new regular file renamed over the name (a regular file, nothing, or
    a symlink to one of those).

    The name is resolved one component at a time, symlinks in the folders of a link's
    target included. Every symlink on the way and the device or FIFO at the end must be
    ours or root's (_trusted). If not: in a sticky folder others can write to, refused,
    since another user planted it; elsewhere, the name is replaced like a regular file,
    and nothing is written through it."""
    shared = paths.shared(os.fstat(dfd))
    cur = os.dup(dfd)
    todo = [name]  # components still to resolve, the next one last
    links = 0

    def untrusted(st: os.stat_result) -> None:
        if shared:
            kind = "symlink" if stat.S_ISLNK(st.st_mode) else "FIFO or device"
            whose = (f"with {st.st_nlink} hard links" if _trusted(st.st_uid)
                     else f"owned by uid {st.st_uid}")
            raise IOFailure(f"{path}: refusing to write through a {kind} {whose} in a "
                            "folder others can write to")

    try:
        while todo:
            comp = todo.pop()
            last = not todo
            if comp in ("", "."):
                if last:
                    raise IOFailure(f"{path}: is a directory")
                continue
            try:
                st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise IOFailure(f"{path}: cannot create output: {e.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                # A hard link of root's own link (to a disk, say) passes for root's where
                # fs.protected_hardlinks is off: in a shared folder, one name or none.
                if not _trusted(st.st_uid) or (st.st_nlink > 1 and paths.shared(os.fstat(cur))):
                    untrusted(st)
                    return None
                links += 1
                if links > 40:
                    raise IOFailure(f"{path}: too many levels of symbolic links")
                target = os.readlink(comp, dir_fd=cur)
                if last and not _resolves(cur, target):
                    # A link whose text names nothing, yet that leads somewhere: one of
                    # /proc's (/dev/stdout to a pipe); only the kernel can follow it.
                    return _open_node(cur, comp, path, follow=True)
                if target.startswith("/"):
                    nxt = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    os.close(cur)
                    cur = nxt
                todo.extend(reversed(target.split("/")))
                continue
            if stat.S_ISDIR(st.st_mode):
                if last:
                    raise IOFailure(f"{path}: is a directory")
                with io_errors(f"{path}: cannot open"):
                    nxt = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=cur)
                os.close(cur)
                cur = nxt
                continue
            if not last:
                raise IOFailure(f"{path}: cannot create output: {os.strerror(errno.ENOTDIR)}")
            if stat.S_ISREG(st.st_mode):
                return None
            if not _trusted(st.st_uid):
                untrusted(st)
                return None
            fd = _open_node(cur, comp, path, follow=False)
            assert fd is not None
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                raise IOFailure(f"{path}: replaced while it was being opened")
            return fd
        raise IOFailure(f"{path}: is a directory")  # an empty name
    finally:
        os.close(cur)


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
            for name, first in ((piece_name, len(pieces)), (old_piece_name, max(len(pieces), 900))):
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
    with io_errors(f"{path}: cannot remove the stale piece"):
        try:
            os.unlink(os.path.basename(path), dir_fd=dfd)
        except FileNotFoundError:
            return False
    return True


@contextlib.contextmanager
def _direct(f: IO[bytes], name: str) -> Iterator[Callable[[bytes], object]]:
    """Writes to an already open stream, with errors as one line (a broken pipe stays a
    BrokenPipeError: the CLI treats a reader that went away as a quiet exit)."""
    where = f"{name}: write failed"

    def write(b: bytes) -> None:
        with io_errors(where):
            f.write(b)

    yield write
    with io_errors(where):
        f.flush()


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
                self.tmp = ""  # not ours: abort() must leave that name alone
                raise io_failure(e, f"{path}: cannot create output") from None
        st = os.fstat(self.fd)
        self.ident = (st.st_dev, st.st_ino)
        self.f = os.fdopen(self.fd, "wb", buffering=1 << 20)

    def write(self, b: bytes | memoryview) -> None:
        assert self.f is not None
        try:
            self.f.write(b)
        except OSError as e:
            raise IOFailure(f"{self.path}: write failed: {_write_error(e)}") from None

    def close(self) -> None:
        assert self.f is not None
        try:
            self.f.flush()
            try:
                os.fchmod(self.f.fileno(), self.mode & ~_umask() & 0o7777)
            except OSError as e:
                # A filesystem without modes (FAT through fusefat says ENOSYS; the kernel's
                # vfat ignores the call): the file we created is as private as it can be.
                if e.errno not in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
                    raise
            sparse.sync(self.f.fileno())
            self.f.close()
        except OSError as e:
            raise IOFailure(f"{self.path}: cannot finish output: {_write_error(e)}") from None

    def commit(self) -> None:
        with io_errors(f"{self.path}: cannot finish output"):
            st = os.stat(self.tmp, dir_fd=self.dfd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != self.ident:
                raise IOFailure(f"{self.path}: the temporary file {self.tmp} was replaced by "
                                "someone else; the output was not written")
            os.replace(self.tmp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
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


def _resolves(dfd: int, target: str) -> bool:
    try:
        os.stat(target, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _open_node(dfd: int, name: str, path: str, follow: bool) -> int | None:
    """Open a FIFO or device for writing without ever blocking: a FIFO no one reads is
    refused at once rather than waited on. follow: name is a link that may lead nowhere
    (None: the output replaces it)."""
    flags = os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(name, flags if follow else flags | os.O_NOFOLLOW, dir_fd=dfd)
    except FileNotFoundError:
        if follow:
            return None
        raise IOFailure(f"{path}: replaced while it was being opened") from None
    except OSError as e:
        try:
            fifo = stat.S_ISFIFO(os.stat(name, dir_fd=dfd, follow_symlinks=follow).st_mode)
        except OSError:
            fifo = False
        if e.errno == errno.ENXIO and fifo:
            raise IOFailure(f"{path}: a FIFO with no reader; start the reader first") from None
        raise IOFailure(f"{path}: cannot open: {e.strerror}") from None
    st = os.fstat(fd)
    if follow and (stat.S_ISREG(st.st_mode) or not _trusted(st.st_uid)):
        os.close(fd)
        raise IOFailure(f"{path}: cannot write through this link; name a file or FIFO")
    os.set_blocking(fd, True)
    return fd


def _write_error(e: OSError) -> str:
    # A write to a file we created and hold open is not a permission matter: fusefat says
    # EPERM when the FAT is full.
    if e.errno == errno.EPERM:
        return "no space left (or the filesystem refused the write)"
    return e.strerror or str(e)
