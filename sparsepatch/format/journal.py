"""The apply journal's slots (spec section 6): encoding, decoding, and which slot is current."""

from __future__ import annotations

from dataclasses import dataclass

from .base import CRC, JOURNAL_MAGIC, JOURNAL_SLOT, JOURNAL_SLOT_SIZE, VERSION, crc32c, with_crc

SEQ_MOD = 1 << 32  # seq is a u32 that wraps: 0 follows 0xFFFFFFFF


@dataclass(frozen=True)
class JournalSlot:
    seq: int
    base_identity: bytes
    target_identity: bytes
    start_block: int
    end_block: int
    scratch_pages: int = 0  # pages the scratch holds (0: none)


def encode_journal_slot(s: JournalSlot) -> bytes:
    body = JOURNAL_SLOT.pack(JOURNAL_MAGIC, VERSION, 0, s.seq % SEQ_MOD, s.base_identity,
                             s.target_identity, s.start_block, s.end_block, s.scratch_pages)
    return with_crc(body).ljust(JOURNAL_SLOT_SIZE, b"\0")


def decode_journal_slot(buf: bytes) -> JournalSlot | None:
    """A valid slot, or None for a slot that is empty or torn (its CRC does not match)."""
    if len(buf) < JOURNAL_SLOT.size + CRC.size:
        return None
    body = buf[: JOURNAL_SLOT.size]
    magic, version, _, seq, base, target, start, end, scratch = JOURNAL_SLOT.unpack(body)
    if magic != JOURNAL_MAGIC or version != VERSION:
        return None
    if crc32c(body) != CRC.unpack_from(buf, JOURNAL_SLOT.size)[0]:
        return None
    return JournalSlot(seq, base, target, start, end, scratch)


def newer_slot(a: JournalSlot, b: JournalSlot) -> JournalSlot:
    """The later of two valid slots, in serial number arithmetic (RFC 1982) on the u32 seq:
    a is later if it is 1..2^31-1 steps ahead of b. Slots hold consecutive writes, so this
    is the one written last even after seq wrapped from 0xFFFFFFFF to 0."""
    return a if 0 < (a.seq - b.seq) % SEQ_MOD < SEQ_MOD // 2 else b


def decode_journal(buf: bytes) -> JournalSlot | None:
    """The current slot of a journal's bytes (both slots), or None if neither is valid."""
    slots = [decode_journal_slot(buf[i * JOURNAL_SLOT_SIZE : (i + 1) * JOURNAL_SLOT_SIZE])
             for i in range(2)]
    a, b = slots
    if a is None or b is None:
        return a or b
    return newer_slot(a, b)
