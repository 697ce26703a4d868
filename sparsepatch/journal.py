"""The resume journal: which block range an interrupted apply may have been writing.
Two CRC-protected slots (spec/FORMAT.md, journal) written alternately and synced before
the range they name is written.

apply often runs as root on files in folders other users can write to, so the journal is
handled by descriptor: looked up in a folder held open, never through a symbolic link,
created only where nothing exists yet, and an existing one is used only if it is a regular
file with one link, owned by us or by the destination's owner (who could write the
destination anyway). A block device's journal lives in a private directory."""

from __future__ import annotations

import errno
import os
import stat

from . import paths, sparse
from .errors import IOFailure, UsageError, io_errors, io_failure
from .format import JOURNAL_MAGIC, JOURNAL_SLOT_SIZE, JournalSlot, decode_journal, encode_journal_slot

# Not /var/tmp (shared: anyone can put a file under a name we would open) and not /run
# (lost on a power cut, the one time a journal is needed).
ROOT_STATE_DIR = "/var/lib/sparsepatch"


def journal_path(dest: str) -> str:
    head, tail = os.path.split(dest)
    return os.path.join(head, f".{tail}.sparsepatch-journal")


def state_dir() -> str:
    """Where device journals live: root's private directory, or the user's own."""
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "sparsepatch")


def device_journal_name(rdev: int, size: int) -> str:
    """Named by device number and size, so every path to the device finds it and a journal
    left for another device of that number (a loop device attached to another image) is
    not taken for this one's."""
    return f"blockdev-{os.major(rdev)}-{os.minor(rdev)}-{size}.journal"


def open_private_dir(path: str) -> int:
    """path, created 0700 if missing, held open: it must be a directory (not a symbolic
    link) owned by us and writable by nobody else."""
    try:
        if os.geteuid() != 0:
            os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise IOFailure(f"{path}: cannot create the journal directory: {e.strerror}; "
                        "give --journal FILE") from None
    try:
        fd = paths.open_dir(path, nofollow=True)
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise IOFailure(f"{path}: cannot use as the journal directory: {why}") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise IOFailure(
            f"{path}: the journal directory must be owned by uid {os.geteuid()} and writable by "
            f"it alone (owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        )
    return fd


class Journal:
    """Two CRC-protected slots, written alternately; the valid one with the higher sequence
    number says which block range an apply may have been writing when it stopped.

    Works on descriptors: dir_fd, the folder the journal lives in (held open: the name is
    looked up there, unlinked there, and the folder synced through it), and fd, the journal
    itself once it exists. path is for messages. Created only by the first write (an apply
    that writes nothing leaves nothing behind), with O_EXCL: a name that appears meanwhile
    is refused, not written through. owners: the uids an existing journal may belong to.
    not_files: files ((st_dev, st_ino) -> what they are) the journal must not be: the
    destination and the patch (--journal naming one would write slots into it, then
    remove it as the journal)."""

    def __init__(self, dir_fd: int, name: str, path: str, owners: frozenset[int],
                 not_files: dict[tuple[int, int], str] | None = None):
        self.dir_fd = dir_fd
        self.name = name
        self.path = path
        self.owners = owners
        self.not_files = not_files or {}
        self.fd: int | None = None
        self.seq = 0
        self.scratch_pages = 0  # carried by every slot written: the scratch the run relies on

    def load(self) -> JournalSlot | None:
        """Open an existing journal (kept open for the writes) and return its current slot."""
        fd = sparse.open_side(self.dir_fd, self.name, self.path, "apply journal")
        if fd is None:
            return None
        try:
            self._check(fd)
            buf = os.pread(fd, 2 * JOURNAL_SLOT_SIZE + 1, 0)
            if not looks_like_journal(buf):
                raise IOFailure(
                    f"{self.path}: refusing the apply journal: this file is not one ({os.fstat(fd).st_size} "
                    f"bytes; a journal is empty or at most {2 * JOURNAL_SLOT_SIZE} bytes of slots)"
                )
        except OSError as e:
            os.close(fd)
            raise io_failure(e, f"{self.path}: cannot read the apply journal") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        best = decode_journal(buf)
        if best is None:
            return None
        self.seq = best.seq
        self.scratch_pages = best.scratch_pages
        return best

    def _check(self, fd: int) -> None:
        st = os.fstat(fd)
        what = self.not_files.get((st.st_dev, st.st_ino))
        if what is not None:
            raise UsageError(f"{self.path}: is {what}; the journal must be another file")
        why = sparse.not_ours(fd, self.owners)
        if why is not None:
            raise IOFailure(f"{self.path}: refusing the apply journal: {why}")

    def write(self, base: bytes, target: bytes, start: int, end: int) -> None:
        if self.fd is None:
            self.fd = sparse.create_side(self.dir_fd, self.name, self.path, "apply journal")
            with io_errors(f"{self.path}: cannot sync its folder"):
                sparse.sync_dir(self.dir_fd)  # a journal lost to power is no journal
        self.seq += 1
        slot = encode_journal_slot(JournalSlot(self.seq, base, target, start, end,
                                               self.scratch_pages))
        with io_errors(f"{self.path}: cannot write the apply journal"):
            sparse.pwrite_full(self.fd, slot, (self.seq % 2) * JOURNAL_SLOT_SIZE)
            sparse.sync(self.fd)

    def remove(self) -> None:
        """Unlink the journal this run opened or created, if the name still is that file
        (one put in its place meanwhile is left alone), and sync the folder."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with io_errors(f"{self.path}: cannot remove the apply journal"):
            sparse.remove_side(self.dir_fd, self.name, fd)

    def close(self) -> None:
        """Close the descriptors; the journal, if any, stays on disk."""
        for fd in (self.fd, self.dir_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd = None
        self.dir_fd = -1


def looks_like_journal(buf: bytes) -> bool:
    """Whether buf, a file's first bytes (up to one byte past two slots), can be a journal
    or what a crash leaves of one: empty (created, never written), or at most two slots,
    each all zeros (never written, or its write lost), or starting with the journal magic
    (valid, or torn after it), or a torn first part of the magic followed by zeros."""
    if len(buf) > 2 * JOURNAL_SLOT_SIZE:
        return False
    for i in range(0, len(buf), JOURNAL_SLOT_SIZE):
        slot = buf[i : i + JOURNAL_SLOT_SIZE]
        if not (slot.startswith(JOURNAL_MAGIC) or JOURNAL_MAGIC.startswith(slot.rstrip(b"\0"))):
            return False
    return True
