"""The hardware floor of a signature or diff: read only the data extents of a file
(SEEK_DATA/SEEK_HOLE) into one reused 4 MiB buffer with os.preadv, and BLAKE3 every block,
in one thread, in a plain loop. A script of its own that imports nothing but os, sys and
blake3, so that its start-up is Python's and no more.

    python bench/floor.py FILE [BLOCK_SIZE]
"""

import os
import sys

import blake3

CHUNK = 4 << 20


def floor(path: str, bs: int) -> int:
    """Digests computed: one per block of the data extents (rounded out to blocks)."""
    mv = memoryview(bytearray(CHUNK))
    per = CHUNK // bs
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    pos = 0
    digests = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        b, b1 = start // bs, -(-end // bs)
        while b < b1:
            n = min(b1 - b, per)
            got = os.preadv(fd, [mv[: n * bs]], b * bs)
            for k in range(0, got, bs):
                blake3.blake3(mv[k : k + bs]).digest()
                digests += 1
            b += n
        pos = b1 * bs
    os.close(fd)
    return digests


if __name__ == "__main__":
    floor(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16 << 10)
