"""The destination of apply as a path: opening it (a full patch may create it), claiming
it against other users (another apply, a program's lock, a loop device), and finding
its journal. Below this, apply sees an open descriptor and a Journal."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence

from . import paths, sparse
from .errors import IOFailure, Locked, UsageError, io_errors, io_failure
from .journal import Journal, device_journal_name, journal_path, open_private_dir, state_dir
from .scratch import Scratch, device_scratch_name, scratch_name, shared_scratch_name


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
        dir_fd = paths.open_dir(folder)
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


def open_journal(dest: str, fd: int, override: str | None = None, inputs: Sequence[str] = (),
                 key_file: str | None = None) -> Journal:
    """The journal for the destination open on fd (not yet read): override, or beside a
    file, or in the private state directory for a block device. Only the destination's
    owner and we may own an existing journal beside it or at override; in the private
    directory, only we. The journal may be neither the destination nor one of inputs
    (the patch's files) nor the key file (32 zero bytes would pass for a journal)."""
    st = os.fstat(fd)
    owners = frozenset({os.geteuid(), st.st_uid})
    not_files = {(st.st_dev, st.st_ino): f"the destination {dest}"}
    for path in inputs:
        if path != "-":
            with contextlib.suppress(OSError):
                s = os.stat(path)
                not_files.setdefault((s.st_dev, s.st_ino), f"the patch {path}")
    if key_file:
        with contextlib.suppress(OSError):
            s = os.stat(key_file)
            not_files.setdefault((s.st_dev, s.st_ino), f"the key file {key_file}")
    if override is None and stat.S_ISBLK(st.st_mode):
        folder = state_dir()
        name = device_journal_name(st.st_rdev, sparse.file_size(fd))
        return Journal(open_private_dir(folder), name, os.path.join(folder, name),
                       frozenset({os.geteuid()}), not_files)
    path = override or journal_path(dest)
    folder, name = os.path.split(path)
    if name in ("", ".", ".."):
        # Found only at the first journal write, after the scratch is staged.
        raise UsageError(f"{path}: is a folder; --journal names the file to write")
    with io_errors(f"{folder or '.'}: cannot open the journal's folder"):
        dir_fd = paths.open_dir(folder)
    if override is None:
        # The folder looked up by path must be the one the destination was opened in, or
        # the journal would guard another file.
        _check_folder_holds(dir_fd, dest, st)
    return Journal(dir_fd, name, path, owners, not_files)


def _check_folder_holds(dir_fd: int, dest: str, st: os.stat_result) -> None:
    """dir_fd, opened by path, must hold the destination apply opened (st): else the name
    was moved or replaced meanwhile (dir_fd is closed then)."""
    try:
        here = os.stat(os.path.basename(dest), dir_fd=dir_fd)
    except OSError:
        here = None
    if here is None or (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
        os.close(dir_fd)
        raise IOFailure(f"{dest}: was moved or replaced while apply opened it")


def open_scratch(dest: str, fd: int, folder: str | None, journal: Journal) -> Scratch:
    """The scratch for the destination open on fd: in folder (`--scratch DIR`), or beside a
    file, or in the private state directory for a block device. Trusted like the journal
    (open_journal), and it may not be any file the journal may not be."""
    st = os.fstat(fd)
    device = stat.S_ISBLK(st.st_mode)
    if device:
        name = device_scratch_name(st.st_rdev, sparse.file_size(fd))
    else:
        name = scratch_name(dest) if folder is None else shared_scratch_name(dest, st)
    if folder is None and device:
        where = state_dir()
        return Scratch(open_private_dir(where), name, os.path.join(where, name),
                       frozenset({os.geteuid()}), journal.not_files)
    where = folder if folder is not None else os.path.dirname(dest)
    with io_errors(f"{where or '.'}: cannot open the scratch's folder"):
        dir_fd = paths.open_dir(where)
    if folder is None:
        _check_folder_holds(dir_fd, dest, st)
    return Scratch(dir_fd, name, os.path.join(where, name), frozenset({os.geteuid(), st.st_uid}),
                   journal.not_files)


class NewDest:
    """A destination this run created: the folder it was created in, held open, and the
    file's identity. Removing it then removes that file and no other, even if a folder on
    its path has been swapped for a symbolic link meanwhile."""

    def __init__(self, dir_fd: int, name: str, fd: int):
        self.dir_fd, self.name = dir_fd, name
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)

    def narrow_mode(self, fd: int, allowed: int) -> None:
        """Take away the permission bits that allowed (the modes of the patch files read)
        does not have: the file was created with those of the files opened by then and the
        paths of the rest, and a piece read later may be more private than its path said."""
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o666 & ~allowed:
            try:
                os.fchmod(fd, mode & (allowed | ~0o666))
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise io_failure(e, f"{self.name}: cannot set its mode") from None
                # FAT through FUSE has no modes to narrow.

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
    if isinstance(e, PermissionError) and not isinstance(e, paths.LinkRefused):
        return IOFailure(f"{dest}: permission denied")
    return IOFailure(f"{dest}: {e.strerror}")


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
        raise io_failure(e, f"{dest}: cannot sync its folder") from None
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
    if st.st_nlink > 1 and paths.shared(os.fstat(dir_fd)):
        # Root's own link from elsewhere (to a golden image, say), hard-linked here by
        # another user where fs.protected_hardlinks is off.
        raise IOFailure(f"{dest}: refusing to follow a symbolic link with {st.st_nlink} hard "
                        "links in a sticky folder others can write to: give its target's path")
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
            # The link is trusted, the folders its text names are not: one of them may be
            # another user's link in /tmp.
            nxt = paths.open_dir(parent, dir_fd=dir_fd)
        except OSError as e:
            raise _dest_error(dest, e) from None
        os.close(dir_fd)
        dir_fd = nxt
    return dir_fd, name
