"""The patch writer that diff and merge share: the header, STAGE records, records whose
literal goes into the frames of the literal stream (spec section 5.2), the MAC chain
(section 5.5) and the trailer's counts. The caller decides the records; this module only
encodes them, so that every patch is written the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .format import (
    FRAME_END,
    FRAME_START,
    MAX_FRAME_RAW,
    MAX_WINDOW_LOG,
    MIN_WINDOW_LOG,
    REC_COPY,
    REC_DATA,
    REC_STAGE,
    REC_ZERO,
    MacChain,
    PatchHeader,
    PatchTrailer,
    Record,
    encode_patch_header,
    encode_patch_trailer,
    encode_record,
)


def frame_sizes(plan: Iterator[tuple[int, int, int, int]],
                literal: Callable[[int, int], int]) -> list[int]:
    """The raw literal of each frame of the literal stream: frames are cut at a record
    boundary so that none passes MAX_FRAME_RAW (a record is far smaller)."""
    sizes: list[int] = []
    cur = 0
    for kind, k, m, _ in plan:
        if kind != REC_DATA:
            continue
        raw = literal(k, m)
        if cur and cur + raw > MAX_FRAME_RAW:
            sizes.append(cur)
            cur = 0
        cur += raw
    if cur:
        sizes.append(cur)
    return sizes


def window_log_for(raw: int, cap: int = MAX_WINDOW_LOG) -> int:
    """The window of a frame of raw bytes: all of it (repeats in an OS image lie tens of
    MiB apart), within zstd's smallest window and the cap (diff --window-log)."""
    return min(cap, MAX_WINDOW_LOG, max(MIN_WINDOW_LOG, (raw - 1).bit_length()))


class LiteralStream:
    """The writer of the literal stream: one zstd stream per frame, fed record by record
    and flushed at each record's end (so every payload is whole blocks that decode, given
    the frame's earlier records, to that record's bytes), finished at the frame's last
    record. Single-threaded zstd: the bytes depend on the inputs, level and window only."""

    def __init__(self, frames: list[int], level: int, cap: int):
        self.frames = iter(frames)
        self.level = level
        self.cap = cap
        self.cobj: Any = None
        self.left = 0  # raw bytes the open frame still takes

    def payload(self, raw: bytes) -> tuple[int, bytes]:
        """Flags and payload of a DATA record carrying raw."""
        if not raw:
            return 0, b""
        import zstandard  # imported where used: a signature never needs it

        flags = 0
        if self.cobj is None:
            size = next(self.frames)
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, source_size=size, window_log=window_log_for(size, self.cap),
                enable_ldm=True, threads=0, write_checksum=1, write_content_size=1)
            self.cobj = zstandard.ZstdCompressor(compression_params=params).compressobj(size=size)
            self.left = size
            flags |= FRAME_START
        self.left -= len(raw)
        out = self.cobj.compress(raw)
        if self.left:
            out += self.cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        else:
            out += self.cobj.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
            flags |= FRAME_END
            self.cobj = None
        return flags, out


class PatchWriter:
    """Writes one patch through write: every element followed by its Tag with a key, the
    records counted for the trailer. Call header(), stage(), frames() (before the first
    DATA record with literal), record() for each record in order, then finish()."""

    def __init__(self, write: Callable[[bytes], object], key: bytes | None = None):
        self.write = write
        self.mac = MacChain(key) if key is not None else None
        self.written = 0
        self.counts = {REC_DATA: 0, REC_ZERO: 0, REC_COPY: 0}
        self.records = self.payload_bytes = self.data_bytes = 0
        self.stream: LiteralStream | None = None

    def emit(self, b: bytes) -> None:
        """Write one element of the patch, followed by its tag when authenticating."""
        self.write(b)
        self.written += len(b)
        if self.mac is not None:
            tag = self.mac.next(b)
            self.write(tag)
            self.written += len(tag)

    def header(self, header: PatchHeader) -> None:
        self.emit(encode_patch_header(header))

    def stage(self, runs: Iterable[tuple[int, int, bytes]], per: int) -> None:
        """STAGE records: (first page, count, page hashes) each."""
        for first, count, hashes in runs:
            self.emit(encode_record(Record(REC_STAGE, first, count, hashes, pages=per)))
            self.records += 1

    def frames(self, sizes: list[int], level: int, cap: int) -> None:
        """The raw literal of each frame (frame_sizes), the zstd level and the window cap."""
        self.stream = LiteralStream(sizes, level, cap)

    def record(self, kind: int, first: int, count: int, meta: bytes, last: int, raw: bytes,
               per: int) -> None:
        """One DATA, ZERO or COPY record; raw: a DATA record's literal pages."""
        flags, payload = 0, b""
        if kind == REC_DATA and raw:
            assert self.stream is not None
            flags, payload = self.stream.payload(raw)
        self.emit(encode_record(Record(kind, first, count, meta, last, payload, flags=flags,
                                       pages=per)))
        self.counts[kind] += count
        self.records += 1
        self.data_bytes += len(raw)
        self.payload_bytes += len(payload)

    def finish(self) -> int:
        """Write the trailer; returns the patch's length."""
        c = self.counts
        self.emit(encode_patch_trailer(PatchTrailer(self.records, c[REC_DATA], c[REC_ZERO],
                                                    c[REC_COPY], self.payload_bytes, self.written)))
        return self.written

