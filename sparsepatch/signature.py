"""Signature of a destination: its size, its hole map and one hash per data block."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass

from .blocks import Scanner
from .format import SigHeader, SignatureEncoder, blocks_for


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
    written = 0

    def emit(b: bytes) -> None:
        nonlocal written
        if b:
            write(b)
            written += len(b)

    if scan.seekable:
        enc = SignatureEncoder(SigHeader(shift, scan.size))
        emit(enc.start())
        for i, digest, _ in scan:
            emit(enc.data_at(i, digest))
    else:
        # A stream's size is known only at its end, and the header comes first: keep the
        # hashes compactly (24 bytes a data block) and encode once the size is known.
        index, hashes = array("Q"), bytearray()
        for i, digest, _ in scan:
            index.append(i)
            hashes += digest
        enc = SignatureEncoder(SigHeader(shift, scan.size))
        emit(enc.start())
        for k, i in enumerate(index):
            emit(enc.data_at(i, bytes(hashes[16 * k : 16 * k + 16])))
    tail, identity = enc.finish(mtime_ns)
    emit(tail)
    blocks = blocks_for(scan.size, shift)
    return SignatureStats(scan.size, 1 << shift, blocks, enc.data_blocks, blocks - enc.data_blocks,
                          scan.bytes_read, written, identity.hex())
