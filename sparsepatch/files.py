"""The destination of apply as a path: opening it (a full patch may create it), claiming
it against other users (another apply, a program's lock, a loop device), and finding
its journal. Below this, apply sees an open descriptor and a Journal."""

from __future__ import annotations

import os
import stat

from . import sparse
from .errors import IOFailure, Locked, io_errors, io_failure
from .journal import Journal, device_journal_name, journal_path, open_private_dir, state_dir


def open_dest(dest: str, full: bool, mode: int = 0o666) -> tuple[int, bool]:
    """Open dest for update; a full patch may create it (with mode, less the umask).
    Returns (fd, created)."""
    if not os.path.exists(dest) and full:
        try:
            fd = sparse.create_new(dest, mode)
            try:
                # Its name is durable only once the folder is synced; the journal's sync
                # does not do it when the journal lives elsewhere (--journal).
                sparse.sync_dir(os.path.dirname(os.path.abspath(dest)))
            except OSError as e:
                os.close(fd)
                raise io_failure(e, f"{dest}: cannot sync its folder") from None
            return fd, True
        except FileExistsError:  # created by someone else meanwhile: treat as existing
            pass
        except OSError as e:
            raise io_failure(e, f"{dest}: cannot create") from None
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


def open_journal(dest: str, fd: int, override: str | None = None) -> Journal:
    """The journal for the destination open on fd (not yet read): override, or beside a
    file, or in the private state directory for a block device. Only the destination's
    owner and we may own an existing journal beside it or at override; in the private
    directory, only we."""
    st = os.fstat(fd)
    owners = frozenset({os.geteuid(), st.st_uid})
    if override is None and stat.S_ISBLK(st.st_mode):
        folder = state_dir()
        name = device_journal_name(st.st_rdev, sparse.file_size(fd))
        return Journal(open_private_dir(folder), name, os.path.join(folder, name),
                       frozenset({os.geteuid()}))
    path = override or journal_path(dest)
    folder, name = os.path.split(path)
    with io_errors(f"{folder or '.'}: cannot open the journal's folder"):
        dir_fd = sparse.open_dir(folder)
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
    return Journal(dir_fd, name, path, owners)
