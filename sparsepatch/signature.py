"""Signature of a destination: its size, its hole map and one hash per data block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .blocks import Scanner, SignatureBuilder, Stamp, scan_into
from .format import blocks_for


@dataclass(frozen=True)
class SignatureStats:
    file_size: int
    block_size: int
    blocks: int
    data_blocks: int
    hole_blocks: int
    bytes_read: int
    signature_bytes: int
    identity: str
    holes_skipped: bool  # False: every byte was read (a stream, a device, no hole map)


def write_signature(fd: int, shift: int, name: str, write: Callable[[bytes], object],
                    progress: Callable[[int], None] | None = None,
                    mtime_ns: int | None = 0, *, source_check: str | None = None,
                    warn: Callable[[str], object] | None = None) -> SignatureStats:
    """The signature of fd, written through write. mtime_ns None records the file's own
    mtime (0 for a stream or device). With source_check ("mtime" or "content", see
    blocks.Stamp), a regular file that changes while it is read raises SourceChanged:
    the signature would describe no state the file was ever in."""
    stamp = Stamp(fd, source_check or "mtime")
    if mtime_ns is None:
        mtime_ns = stamp.mtime_ns
    scan = Scanner(fd, shift, name, progress=progress, warn=warn)
    out = SignatureBuilder(shift, scan.size if scan.seekable else None, write)
    scan_into(scan, out)
    if source_check is not None:
        stamp.verify(name, "signature")
    identity = out.finish(scan.size, mtime_ns)
    blocks = blocks_for(scan.size, shift)
    return SignatureStats(scan.size, 1 << shift, blocks, out.data_blocks, blocks - out.data_blocks,
                          scan.bytes_read, out.written, identity.hex(), scan.holes_skipped)
