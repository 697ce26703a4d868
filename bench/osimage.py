#!/usr/bin/env python3
"""Build real operating-system disk images for measuring patches: Debian installed with
debootstrap into a sparse ext4 image, then changed the three ways administrators and CI
change images. Needs root, loop devices, debootstrap and a Debian mirror.

    base      debootstrap --variant=minbase bookworm into a fresh sparse ext4 image
    install   base + `apt-get install` of a web server and compilers, inside the image
    upgrade   base + `apt-get upgrade` from the security suite, inside the image
    rebuilt   the base's files copied into a freshly made ext4 image (a CI image build)

Images are cached in --dir (they take minutes to build) and reused when present.
--measure prints, for each changed image against the base, R (zstd -3, as one stream, of the
target's blocks that differ from the base at the same offset: what an aligned block patch
must send) and what the data allows (the target's 4 KiB pages found nowhere in the base,
as one `zstd -3 --long=27` stream).

    python bench/osimage.py --dir /var/tmp/osimg [--size 16G] [--measure]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
SUITE = "bookworm"
INSTALL = ["nginx", "gcc", "g++", "make"]
FS_UUID = "7d0c7a7e-31f6-4c1e-9a57-5b1f3b0c2a11"


def sh(*cmd: str, **kw: object) -> None:
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


@contextlib.contextmanager
def mounted(image: str, chroot: bool = False, readonly: bool = False) -> Iterator[str]:
    mnt = tempfile.mkdtemp(prefix="osimg-")
    # A read-write mount writes the superblock (mount count, times): a base must stay as built.
    sh("mount", "-o", "loop,ro,noload" if readonly else "loop", image, mnt)
    binds = []
    try:
        if chroot:
            for d in ("proc", "sys", "dev"):
                target = os.path.join(mnt, d)
                os.makedirs(target, exist_ok=True)
                sh("mount", "--bind", f"/{d}", target)
                binds.append(target)
            shutil.copy("/etc/resolv.conf", os.path.join(mnt, "etc/resolv.conf"))
        yield mnt
    finally:
        for b in reversed(binds):
            subprocess.run(["umount", "-l", b], check=False)
        sh("umount", mnt)
        os.rmdir(mnt)


def mkfs(image: str, size: int) -> None:
    with open(image, "wb") as f:
        f.truncate(size)
    sh("mkfs.ext4", "-q", "-F", "-U", FS_UUID, "-E", "lazy_itable_init=0,lazy_journal_init=0", image)


def sparse_copy(src: str, dst: str) -> None:
    sh("cp", "--sparse=always", src, dst)


def chroot_apt(mnt: str, *args: str) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    sh("chroot", mnt, "apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0", *args, env=env,
       stdout=subprocess.DEVNULL)


def build_base(path: str, size: int) -> None:
    tmp = path + ".tmp"
    mkfs(tmp, size)
    with mounted(tmp) as mnt:
        sh("debootstrap", "--variant=minbase", SUITE, mnt, MIRROR, stdout=subprocess.DEVNULL)
    os.replace(tmp, path)


def build_install(base: str, path: str) -> None:
    tmp = path + ".tmp"
    sparse_copy(base, tmp)
    with mounted(tmp, chroot=True) as mnt:
        chroot_apt(mnt, "update")
        chroot_apt(mnt, "install", "--no-install-recommends", *INSTALL)
        chroot_apt(mnt, "clean")
    os.replace(tmp, path)


def build_upgrade(base: str, path: str) -> None:
    tmp = path + ".tmp"
    sparse_copy(base, tmp)
    with mounted(tmp, chroot=True) as mnt:
        with open(os.path.join(mnt, "etc/apt/sources.list"), "a") as f:
            f.write(f"deb {SECURITY} {SUITE}-security main\n")
        chroot_apt(mnt, "update")
        chroot_apt(mnt, "upgrade")
        chroot_apt(mnt, "clean")
    os.replace(tmp, path)


def build_rebuilt(base: str, path: str, size: int) -> None:
    tmp = path + ".tmp"
    mkfs(tmp, size)
    with mounted(base, readonly=True) as src, mounted(tmp) as dst:
        sh("cp", "-a", src + "/.", dst)
    os.replace(tmp, path)


def _blocks(path: str, bs: int) -> dict[int, bytes]:
    """The non-zero blocks of path's data extents, by offset."""
    out = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            for off in range(start // bs * bs, end, bs):
                b = os.pread(fd, bs, off)
                if b.count(0) != len(b):
                    out[off] = b
            pos = end
    finally:
        os.close(fd)
    return out


def measure(base: str, target: str, bs: int = 16 << 10, page: int = 4 << 10) -> dict[str, int]:
    import blake3
    import zstandard

    b, t = _blocks(base, bs), _blocks(target, bs)
    changed = [t[o] for o in sorted(t) if b.get(o) != t[o]]
    r = len(zstandard.ZstdCompressor(level=3).compress(b"".join(changed)))
    pages = {blake3.blake3(x[k : k + page]).digest(16) for x in b.values() for k in range(0, bs, page)}
    novel = [p for x in changed for k in range(0, bs, page) if (p := x[k : k + page]).count(0) != page
             and blake3.blake3(p).digest(16) not in pages]
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27, enable_ldm=True)
    allows = len(zstandard.ZstdCompressor(compression_params=params).compress(b"".join(novel)))
    return {"changed_blocks": len(changed), "R": r, "novel_pages": len(novel), "allows": allows}


NAMES = ("base", "install", "upgrade", "rebuilt")


def missing_tools() -> str | None:
    """Why images cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (mount, chroot)"
    for tool in ("debootstrap", "mkfs.ext4", "mount", "chroot", "losetup"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install debootstrap e2fsprogs mount)"
    r = subprocess.run(["losetup", "-f"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"no free loop device: {r.stderr.strip()}"
    return None


def ensure(cache: str, size: int = 16 << 30, names: tuple[str, ...] = NAMES) -> dict[str, str]:
    """The images' paths in cache, building those that are missing (and the base they need)."""
    os.makedirs(cache, exist_ok=True)
    img = {n: os.path.join(cache, f"{n}.img") for n in NAMES}
    steps = {"base": lambda: build_base(img["base"], size),
             "install": lambda: build_install(img["base"], img["install"]),
             "upgrade": lambda: build_upgrade(img["base"], img["upgrade"]),
             "rebuilt": lambda: build_rebuilt(img["base"], img["rebuilt"], size)}
    for name in NAMES:
        if name != "base" and name not in names:
            continue
        if os.path.exists(img[name]):
            print(f"{name}: cached {img[name]}", file=sys.stderr)
            continue
        print(f"{name}: building", file=sys.stderr)
        steps[name]()
    return img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--size", default="16G")
    p.add_argument("--measure", action="store_true", help="print R and what the data allows")
    a = p.parse_args(argv)
    size = int(a.size[:-1]) << {"G": 30, "M": 20}[a.size[-1].upper()]
    img = ensure(a.dir, size)
    if a.measure:
        for name in ("install", "upgrade", "rebuilt"):
            m = measure(img["base"], img[name])
            print(f"{name}: {m['changed_blocks']} changed 16 KiB blocks, R {m['R'] / 2**20:.1f} MiB, "
                  f"{m['novel_pages']} pages not in the base, the data allows {m['allows'] / 2**20:.1f} MiB "
                  f"= {m['allows'] / m['R']:.2f} R")
    return 0


if __name__ == "__main__":
    sys.exit(main())
