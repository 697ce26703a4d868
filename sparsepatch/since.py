"""`diff --since SNAPSHOT`: the byte ranges of a source that may differ from a copy-on-write
snapshot of it, found from the two files' extent maps (FIEMAP) without reading their data.

On XFS and btrfs a reflink copy shares the original's disk extents, and a write to either file
moves the written range to new disk space. So where both files map a logical range to the same
physical range, both read the same bytes; where both have a hole, both read zeros. Everything
else (a range written since, a hole on one side, an extent whose place the kernel does not
report exactly) must be read. Nothing here can check that the snapshot is what the signature
describes: that is the user's promise, and `apply --verify` checks the result."""

from __future__ import annotations

import os
from collections.abc import Iterator

from . import sparse
from .errors import UsageError, io_errors

REFLINK_FILESYSTEMS = ("xfs", "btrfs")
# Extents whose physical address does not name their bytes one for one: unknown or not yet
# allocated, compressed or encrypted (btrfs reports the start of a whole compressed extent),
# inline in metadata, or packed with others.
UNPROVABLE = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400

Extent = tuple[int, int, int]  # logical start, logical end, physical start (-1: unprovable)


def _extents(fd: int, size: int, name: str) -> list[Extent]:
    out: list[Extent] = []
    with io_errors(f"{name}: reading its extent map"):
        try:
            for logical, physical, length, flags in sparse.extent_map(fd, size):
                end = min(logical + length, size)
                out.append((logical, end, -1 if flags & UNPROVABLE else physical))
        except OSError as e:
            raise UsageError(f"{name}: the filesystem gives no extent map ({os.strerror(e.errno or 0)}); "
                             "--since needs XFS or btrfs") from None
    return out


def _walk(a: list[Extent], b: list[Extent], size: int) -> Iterator[tuple[int, int, bool, bool]]:
    """(start, end, same, shared) over [0, size): same where both are holes or both map to the
    same physical bytes, shared where they map to the same physical bytes."""
    cuts = {0, size}
    for start, end, _ in a + b:
        cuts.update(x for x in (start, end) if x < size)
    points = sorted(cuts)
    ia = ib = 0
    for lo, hi in zip(points, points[1:], strict=False):
        while ia < len(a) and a[ia][1] <= lo:
            ia += 1
        while ib < len(b) and b[ib][1] <= lo:
            ib += 1
        ea = a[ia] if ia < len(a) and a[ia][0] <= lo else None
        eb = b[ib] if ib < len(b) and b[ib][0] <= lo else None
        if ea is None and eb is None:
            yield lo, hi, True, False
        elif ea is None or eb is None or ea[2] < 0 or eb[2] < 0:
            yield lo, hi, False, False
        else:
            same = ea[2] + (lo - ea[0]) == eb[2] + (lo - eb[0])
            yield lo, hi, same, same


def changed_ranges(snap_fd: int, snap_name: str, src_fd: int, src_name: str,
                   expected_size: int) -> tuple[list[tuple[int, int]], int]:
    """The byte ranges of the source to read, merged and ascending, and the bytes the two
    files share (proved equal without reading). Refuses (usage error) what the extent maps
    cannot prove: another filesystem, one without reflinks, a snapshot of another size than
    the signature's, a source shorter than the snapshot, or no shared extent at all."""
    snap, src = os.fstat(snap_fd), os.fstat(src_fd)
    if snap.st_dev != src.st_dev:
        raise UsageError(f"{snap_name}: the snapshot is on another filesystem than {src_name}, "
                         "so it cannot share its extents")
    if (snap.st_dev, snap.st_ino) == (src.st_dev, src.st_ino):
        raise UsageError(f"{snap_name}: the snapshot is the source itself, not a copy of it")
    kind = sparse.fs_type_of(src_fd)
    if kind not in REFLINK_FILESYSTEMS:
        raise UsageError(f"{src_name}: --since needs a reflink snapshot on XFS or btrfs; this is "
                         f"{kind or 'an unknown filesystem'}: run diff without --since")
    if snap.st_size != expected_size:
        raise UsageError(f"{snap_name}: the snapshot is {snap.st_size} bytes, the signature describes "
                         f"{expected_size}: it is not the state the signature was made from")
    if src.st_size < snap.st_size:
        raise UsageError(f"{src_name}: the source ({src.st_size} bytes) is shorter than the snapshot "
                         f"({snap.st_size}); --since handles growth only: run diff without --since")
    a = _extents(snap_fd, snap.st_size, snap_name)
    b = _extents(src_fd, src.st_size, src_name)
    ranges: list[tuple[int, int]] = []
    shared = 0
    for lo, hi, same, both in _walk(a, b, snap.st_size):
        if same:
            shared += (hi - lo) if both else 0
            continue
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    if src.st_size > snap.st_size:  # appended: everything past the snapshot's end
        if ranges and ranges[-1][1] == snap.st_size:
            ranges[-1] = (ranges[-1][0], src.st_size)
        else:
            ranges.append((snap.st_size, src.st_size))
    if a and not shared:
        raise UsageError(f"{snap_name}: shares no extent with {src_name}: not a reflink copy of it "
                         "(make it with cp --reflink=always), or everything changed: run diff "
                         "without --since")
    return ranges, shared
