"""Checks without applying: a patch on its own, or a file against a signature or a
patch's target."""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass

from .blocks import Scanner
from .errors import VerifyMismatch
from .format import (
    REC_DATA,
    ZERO_HASH,
    PatchReader,
    Signature,
    decode_data,
)


@dataclass(frozen=True)
class VerifyStats:
    records: int
    data_bytes: int
    authenticated: bool


def verify_patch(reader: PatchReader) -> VerifyStats:
    """Decode every record, decompress every payload and check every block hash."""
    n = raw = 0
    for rec in reader.records():
        if rec.kind == REC_DATA:
            raw += len(decode_data(reader.header, rec))
        n += 1
    return VerifyStats(n, raw, reader.mac is not None)


def _describe(h: bytes) -> str:
    return "a hole or zeros" if h == ZERO_HASH else f"hash {h.hex()}"


def against_signature(fd: int, name: str, sig: Signature) -> None:
    """Raise VerifyMismatch naming the first block where the file differs from sig."""
    shift = sig.header.block_shift
    scan = Scanner(fd, shift, name)
    if scan.seekable and scan.size != sig.header.file_size:
        raise VerifyMismatch(f"{name}: {scan.size} bytes, the signature says {sig.header.file_size}")
    di, nd, d = sig.data_index, len(sig.data_index), 0

    def differ(block: int, expected: bytes, found: bytes) -> VerifyMismatch:
        return VerifyMismatch(
            f"{name}: block at byte {block << shift} differs (expected {_describe(expected)}, "
            f"found {_describe(found)})"
        )

    with closing(iter(scan)) as blocks:  # closed at once when a difference is raised
        for i, digest, _ in blocks:
            if d < nd and di[d] < i:
                raise differ(di[d], sig.hash_at(d), ZERO_HASH)
            if d < nd and di[d] == i:
                expected = sig.hash_at(d)
                d += 1
                if expected != digest:
                    raise differ(i, expected, digest)
            else:
                raise differ(i, ZERO_HASH, digest)
    if d < nd:
        raise differ(di[d], sig.hash_at(d), ZERO_HASH)
    if scan.size != sig.header.file_size:
        raise VerifyMismatch(f"{name}: {scan.size} bytes, the signature says {sig.header.file_size}")

