"""Checks without applying: a patch on its own, or a file against a signature or a
patch's target."""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass

from .blocks import Scanner, differences
from .errors import VerifyMismatch
from .format import (
    PAGE_LITERAL,
    PAGE_MOVED,
    PAGE_SAME,
    PAGE_ZERO,
    REC_DATA,
    REC_STAGE,
    ZERO_HASH,
    FrameDecoder,
    PatchReader,
    Signature,
    decode_data,
)
from .scratch import Staged


@dataclass(frozen=True)
class VerifyStats:
    records: int
    data_bytes: int
    authenticated: bool
    # DATA blocks with same or moved pages: their hash covers base pages, which only apply
    # (or verify --against) can read, so a patch alone cannot check them.
    base_blocks: int = 0


def verify_patch(reader: PatchReader) -> VerifyStats:
    """Decode every record, decompress every payload and check every block hash that the
    patch alone determines."""
    n = raw = needs_base = 0
    frames = FrameDecoder(reader.header)
    staged = Staged()
    for rec in reader.records():
        if rec.kind == REC_STAGE:
            staged.add(rec)
        if rec.kind == REC_DATA:
            staged.mark_read(rec)
            raw += len(decode_data(frames, rec))
            if rec.kinds.count(PAGE_SAME) + rec.kinds.count(PAGE_MOVED):
                needs_base += sum(1 for k in range(rec.count)
                                  if rec.page_kinds(k).translate(None, bytes((PAGE_LITERAL, PAGE_ZERO))))
        n += 1
    staged.check_read(reader.name)
    return VerifyStats(n, raw, reader.mac is not None, needs_base)


def _describe(h: bytes | bytearray) -> str:
    return "a hole or zeros" if h == ZERO_HASH else f"hash {h.hex()}"


def against_signature(fd: int, name: str, sig: Signature) -> None:
    """Raise VerifyMismatch naming the first block where the file differs from sig."""
    shift = sig.header.block_shift
    scan = Scanner(fd, shift, name)
    if scan.seekable and scan.size != sig.header.file_size:
        raise VerifyMismatch(f"{name}: {scan.size} bytes, the signature says {sig.header.file_size}")
    with closing(scan.chunks()) as chunks:  # closed at once when a difference is raised
        for block, expected, found, _, _ in differences(sig, chunks, shift):
            raise VerifyMismatch(
                f"{name}: block at byte {block << shift} differs (expected {_describe(expected)}, "
                f"found {_describe(found)})"
            )
    if scan.size != sig.header.file_size:
        raise VerifyMismatch(f"{name}: {scan.size} bytes, the signature says {sig.header.file_size}")
