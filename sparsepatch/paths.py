"""Folders looked up as the kernel's fs.protected_symlinks=1 would, even where it is off.

A root apply or diff names folders in places other users can write (/tmp, /var/tmp): a
symbolic link another user planted there as a folder of an output, journal, scratch or
destination path would send root's writes wherever that user likes. open_dir resolves a
path one component at a time, and follows a symbolic link met in a sticky folder that
others may write to only if the link belongs to the user running the command or to that
folder's owner (the kernel's rule), and has one name (a hard link of root's own link from
elsewhere would pass for root's). Elsewhere links are followed as usual: a folder that is
not sticky is in the hands of whoever may write it, link or no link.

Also what inputs and outputs share: the names of a split patch's pieces, which outputs
writes and inputs reads, and the mode an output made from a file read may have."""

from __future__ import annotations

import errno
import os
import stat

from .errors import IOFailure

MAX_LINKS = 40  # as the kernel's limit on links followed in one lookup
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class LinkRefused(PermissionError):
    """A symbolic link the rule above does not follow (errno EACCES)."""


def absolute(path: str) -> str:
    """os.path.abspath, with one line for a relative path when the current folder was
    removed (another user may remove one of theirs that root works in)."""
    try:
        return os.path.abspath(path)
    except FileNotFoundError:
        raise IOFailure(f"{path}: the current folder was removed: give an absolute path") from None


def shared(st: os.stat_result) -> bool:
    """A sticky folder that others may write to (/tmp), where anyone may plant a name."""
    return bool(st.st_mode & stat.S_ISVTX and st.st_mode & (stat.S_IWOTH | stat.S_IWGRP))


def _in_proc(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/proc/")
    except OSError:
        return False


def open_dir(path: str, nofollow: bool = False, dir_fd: int | None = None) -> int:
    """A directory held open, so that names are looked up in it and not through a path
    that may be renamed meanwhile. With nofollow, its last component may not be a link;
    with dir_fd, a relative path starts there. Raises LinkRefused naming a link the rule
    above refuses."""
    path = path or "."
    cur = os.open("/" if path.startswith("/") else ".", DIR_FLAGS, dir_fd=dir_fd)
    todo = list(reversed(path.split("/")))
    links = 0
    try:
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                nxt = os.open(comp, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=cur)
                os.close(cur)
                cur = nxt
                continue
            if nofollow and not any(c not in ("", ".") for c in todo):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            here = os.fstat(cur)
            if shared(here) and st.st_uid not in (os.geteuid(), here.st_uid):
                raise LinkRefused(errno.EACCES,
                                  f"refusing to follow the symbolic link {comp!r} owned by uid "
                                  f"{st.st_uid} in a sticky folder others can write to")
            if shared(here) and st.st_nlink > 1:
                # A hard link of someone's link from elsewhere keeps its owner: where the
                # kernel's fs.protected_hardlinks is off, any user can put one of root's
                # links (/var/lock, or /lib, relative) here.
                raise LinkRefused(errno.EACCES,
                                  f"refusing to follow the symbolic link {comp!r}, which has "
                                  f"{st.st_nlink} hard links, in a sticky folder others can "
                                  "write to")
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = os.readlink(comp, dir_fd=cur)
            if _in_proc(cur):
                # /proc's links (/dev/fd/N leads there) may name nothing that resolves as
                # text; only the kernel can follow them, and /proc is the kernel's.
                nxt = os.open(comp, DIR_FLAGS, dir_fd=cur)
                os.close(cur)
                cur = nxt
                continue
            if target.startswith("/"):
                nxt = os.open("/", DIR_FLAGS)
                os.close(cur)
                cur = nxt
            todo.extend(reversed(target.split("/")))
        return cur
    except BaseException:
        os.close(cur)
        raise


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


def old_piece_name(stem: str, k: int) -> str:
    """The names sparsepatch 0.1.0 gave: on from STEM.900 to STEM.999, STEM.1000, ..."""
    return f"{stem}.{k:03d}"


def read_mode(fd: int | None) -> int:
    """The permission bits an output made from what was read on fd may have (see
    output_mode); None for a stream. From the descriptor read, not a path looked up again:
    a path swapped in between would give a secret's output a public file's mode."""
    if fd is None:
        return 0o600
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return st.st_mode & 0o666
    return 0o600
