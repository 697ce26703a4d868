"""Signature of a destination: its size, its hole map and one hash per data block."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

from .blocks import Scanner, SignatureBuilder
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


def write_signature(fd: int, shift: int, name: str, write: Callable[[bytes], object],
                    progress: Callable[[int], None] | None = None,
                    mtime_ns: int = 0) -> SignatureStats:
    scan = Scanner(fd, shift, name, progress=progress)
    out = SignatureBuilder(shift, scan.size if scan.seekable else None, write)
    with closing(scan.chunks()) as chunks:  # closed at once on error: its worker is reaped
        for _, index, digests, _ in chunks:
            out.add_many(index, digests)
    identity = out.finish(scan.size, mtime_ns)
    blocks = blocks_for(scan.size, shift)
    return SignatureStats(scan.size, 1 << shift, blocks, out.data_blocks, blocks - out.data_blocks,
                          scan.bytes_read, out.written, identity.hex())
