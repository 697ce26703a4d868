"""The resume journal: which block range an interrupted apply may have been writing.
Two CRC-protected slots (spec/FORMAT.md, journal) written alternately and synced before
the range they name is written."""

from __future__ import annotations

import os

from . import sparse
from .errors import IOFailure
from .format import JOURNAL_SLOT_SIZE, JournalSlot, decode_journal_slot, encode_journal_slot


def journal_path(dest: str) -> str:
    head, tail = os.path.split(dest)
    return os.path.join(head, f".{tail}.sparsepatch-journal")


class Journal:
    """Two CRC-protected slots, written alternately; the valid one with the higher sequence
    number says which block range an apply may have been writing when it stopped."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None
        self.seq = 0

    def load(self) -> JournalSlot | None:
        try:
            with open(self.path, "rb") as f:
                buf = f.read(2 * JOURNAL_SLOT_SIZE)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise IOFailure(f"{self.path}: cannot read the apply journal: {e.strerror}") from None
        slots = [decode_journal_slot(buf[i * JOURNAL_SLOT_SIZE : (i + 1) * JOURNAL_SLOT_SIZE])
                 for i in range(2)]
        valid = [s for s in slots if s is not None]
        if not valid:
            return None
        best = max(valid, key=lambda s: s.seq)
        self.seq = best.seq
        return best

    def write(self, base: bytes, target: bytes, start: int, end: int) -> None:
        if self.fd is None:
            self.fd = sparse.open_path(self.path, os.O_RDWR | os.O_CREAT)
            sparse.sync_dir(os.path.dirname(self.path))  # a journal lost to power is no journal
        self.seq += 1
        slot = encode_journal_slot(JournalSlot(self.seq, base, target, start, end))
        try:
            sparse.pwrite_full(self.fd, slot, (self.seq % 2) * JOURNAL_SLOT_SIZE)
            sparse.sync(self.fd)
        except OSError as e:
            raise IOFailure(f"{self.path}: cannot write the apply journal: {e.strerror}") from None

    def remove(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            sparse.unlink(self.path)
        except FileNotFoundError:
            return
        sparse.sync_dir(os.path.dirname(self.path))
