"""Golden fixtures: sparse files described by small declarative maps, with their signatures
and patches, written to fixtures/<case>/ (run `make fixtures`).

A case map holds:
  block_size   bytes per block (4096 keeps the files tiny)
  full         true for a patch made by `diff --full` (the base is then the empty file)
  key          (optional) seed of a 32-byte key file: the patch is made with `--key-file`
               and the key file is kept in the folder as "key"
  mtime_ns     (optional) the mtime of both files, instead of MTIME_NS
  base/target  {"size": apparent size, "extents": [[offset, length, seed], ...]}: holes
               everywhere except the extents; an extent holds random.Random(seed).randbytes(length),
               written (allocated) zero bytes when its seed is "zero", or one character
               repeated when its seed is that character

Each case folder holds case.json (the map), base.sig (signature of the base), patch.bin
(the diff of base.sig against the target, or the full patch of the target), target.sig,
and key for a case with a key. Everything is derived from the map by sparsepatch itself;
files are built with a fixed mtime (signatures record it), so regenerating gives the same
bytes, except zstd payloads, whose bytes depend on the zstd library version (spec section
5.2): tests compare what they decode to, and every byte that does not depend on them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = ROOT / "fixtures"
FILES = ("case.json", "base.sig", "patch.bin", "target.sig")
KEY_FILE = "key"

B = 4096
MTIME_NS = 1_600_000_000_000_000_000  # every file built gets this mtime: signatures record it
SPEC_MTIME_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z, as spec section 10 says
B16 = 16384
EMPTY: dict[str, Any] = {"size": 0, "extents": []}


def _case(base: dict[str, Any], target: dict[str, Any], full: bool = False, block_size: int = B,
          key: int | None = None, mtime_ns: int | None = None) -> dict[str, Any]:
    case: dict[str, Any] = {"block_size": block_size}
    if full:
        case["full"] = True
    if key is not None:
        case["key"] = key
    if mtime_ns is not None:
        case["mtime_ns"] = mtime_ns
    case["base"] = base
    case["target"] = target
    return case


def _file(size: int, *extents: tuple[int, int, int | str]) -> dict[str, Any]:
    return {"size": size, "extents": [list(e) for e in extents]}


CASES: dict[str, dict[str, Any]] = {
    # both files empty: a signature with no runs, a patch with no records
    "empty-file": _case(EMPTY, EMPTY),
    # both files start with a hole; block 1 gains data
    "hole-at-start": _case(_file(4 * B, (2 * B, 2 * B, 2)),
                           _file(4 * B, (B, B, 3), (2 * B, 2 * B, 2))),
    # both files end with a hole; block 1 changes
    "hole-at-end": _case(_file(4 * B, (0, B, 4), (B, B, 5)),
                         _file(4 * B, (0, B, 4), (B, B, 6))),
    # the last block is 100 bytes long and changes
    "unaligned-size": _case(_file(3 * B + 100, (0, B, 7), (2 * B, B, 8), (3 * B, 100, 9)),
                            _file(3 * B + 100, (0, B, 7), (2 * B, B, 8), (3 * B, 100, 10))),
    # the target is longer, with data past the base's end and a partial last block
    "grows": _case(_file(2 * B, (0, B, 11)),
                   _file(5 * B + 123, (0, B, 11), (3 * B, B, 12), (5 * B, 123, 13))),
    # the target is cut inside block 1, whose remaining bytes change
    "shrinks": _case(_file(5 * B, (0, B, 14), (B, B, 15), (4 * B, B, 16)),
                     _file(B + 200, (0, B, 14), (B, 200, 17))),
    # blocks 1..2 reappear at blocks 4..5: one COPY record of two blocks from block 1
    "copy-record": _case(_file(6 * B, (0, B, 20), (B, B, 21), (2 * B, B, 22)),
                         _file(6 * B, (0, B, 20), (B, B, 21), (2 * B, B, 22),
                               (4 * B, B, 21), (5 * B, B, 22))),
    # block 1 becomes written zeros, block 2 a hole: one ZERO record of two blocks
    "zero-record": _case(_file(4 * B, (0, B, 30), (B, B, 31), (2 * B, B, 32), (3 * B, B, 33)),
                         _file(4 * B, (0, B, 30), (B, B, "zero"), (3 * B, B, 33))),
    # blocks 1..2 get new data: one DATA record of two blocks
    "data-record": _case(_file(3 * B, (0, B, 40), (B, B, 41), (2 * B, B, 42)),
                         _file(3 * B, (0, B, 40), (B, B, 43), (2 * B, B, 44))),
    # made without a signature: the base is the empty file
    "full-patch": _case(EMPTY, _file(3 * B + 17, (B, B, 50), (3 * B, 17, 51)), full=True),
    # nothing changes, zeros written in the base included
    "unchanged": _case(_file(3 * B, (0, B, 60), (B, B, "zero"), (2 * B, B, 61)),
                       _file(3 * B, (0, B, 60), (B, B, "zero"), (2 * B, B, 61))),
    # every record kind in one patch: DATA, ZERO, COPY, ZERO, DATA
    "mixed": _case(_file(8 * B, (0, B, 70), (B, B, 71), (2 * B, B, 72), (3 * B, B, 73),
                         (5 * B, B, 74)),
                   _file(8 * B, (0, B, 75), (B, B, 71), (2 * B, B, 72), (4 * B, B, 71),
                         (5 * B, B, "zero"), (7 * B, B, 76))),
    # the example of spec section 10, whose annotated dump shows base.sig and patch.bin
    "spec-example": _case(_file(3 * B, (0, B, "A"), (B, B, "B")),
                          _file(3 * B, (0, B, "A"), (B, B, "b")), mtime_ns=SPEC_MTIME_NS),
    # the same with --key-file: an authenticated patch (section 10 gives its offsets)
    "mac-patch": _case(_file(3 * B, (0, B, "A"), (B, B, "B")),
                       _file(3 * B, (0, B, "A"), (B, B, "b")), mtime_ns=SPEC_MTIME_NS, key=1),
    # 16 KiB blocks: a partial last block, every record kind, a block that grows past 4 KiB
    "block-16k": _case(_file(6 * B16 + 5000, (0, B16, "C"), (B16, B16, "D"), (2 * B16, B16, "E"),
                             (4 * B16, 3000, "F"), (6 * B16, 5000, "G")),
                       _file(6 * B16 + 9000, (0, B16, "H"), (B16, B16, "D"), (3 * B16, B16, "D"),
                             (2 * B16, B16, "zero"), (4 * B16, 3000, "F"), (6 * B16, 9000, "I")),
                       block_size=B16),
}


def extent_bytes(length: int, seed: int | str) -> bytes:
    if seed == "zero":
        return bytes(length)
    if isinstance(seed, str) and len(seed) == 1:
        return seed.encode("ascii") * length
    if not isinstance(seed, int):
        raise ValueError(f"extent seed {seed!r} is neither an integer, 'zero' nor one character")
    return random.Random(seed).randbytes(length)


def make_file(path: Path, spec: dict[str, Any], mtime_ns: int = MTIME_NS) -> Path:
    """Create path as the sparse file a base/target map describes, with mtime mtime_ns."""
    with open(path, "wb") as f:
        f.truncate(spec["size"])
        for offset, length, seed in spec["extents"]:
            f.seek(offset)
            f.write(extent_bytes(length, seed))
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def files_of(case: dict[str, Any]) -> tuple[str, ...]:
    """The files a case folder holds."""
    return FILES + ((KEY_FILE,) if "key" in case else ())


def key_bytes(seed: int) -> bytes:
    return random.Random(seed).randbytes(32)


def file_bytes(spec: dict[str, Any]) -> bytes:
    """The content of the file a map describes, holes read as zeros."""
    buf = bytearray(spec["size"])
    for offset, length, seed in spec["extents"]:
        buf[offset : offset + length] = extent_bytes(length, seed)
    return bytes(buf)


def case_json(case: dict[str, Any]) -> str:
    """The map as JSON with one extent a line, byte-stable."""
    text = json.dumps(case, indent=2)
    text = re.sub(r"\[\s+([^\[\]]*?)\s+\]",
                  lambda m: "[" + ", ".join(p.strip() for p in m.group(1).split(",")) + "]", text)
    return text + "\n"


def generate(case: dict[str, Any], out: Path) -> None:
    """Write the fixture files of case into the folder out."""
    from sparsepatch import api

    out.mkdir(parents=True, exist_ok=True)
    bs = case["block_size"]
    mtime = case.get("mtime_ns", MTIME_NS)
    key = None
    if "key" in case:
        (out / KEY_FILE).write_bytes(key_bytes(case["key"]))
        key = str(out / KEY_FILE)
    with tempfile.TemporaryDirectory(prefix="sparsepatch-fixture-") as work:
        base = make_file(Path(work) / "base", case["base"], mtime)
        target = make_file(Path(work) / "target", case["target"], mtime)
        api.signature(str(base), str(out / "base.sig"), block_size=bs)
        if case.get("full"):
            if case["base"]["size"]:
                raise ValueError("a full patch has the empty file as its base")
            api.diff(None, str(target), str(out / "patch.bin"), full=True, block_size=bs,
                     key_file=key)
        else:
            api.diff(str(out / "base.sig"), str(target), str(out / "patch.bin"), key_file=key)
        api.signature(str(target), str(out / "target.sig"), block_size=bs)
    (out / "case.json").write_text(case_json(case))


def zstd_independent(data: bytes, key: bytes | None) -> list[bytes]:
    """Every byte of a patch that does not depend on how zstd compressed its payloads, and
    what each payload decodes to. Left out: the payloads, the fields that count their bytes
    (payload_len, the trailer's payload_bytes and body_bytes), and the record and trailer
    CRCs and Tags over them; the reader has checked all of these."""
    from sparsepatch.format import (
        CRC,
        MAC_LEN,
        PATCH_HEADER,
        PATCH_TRAILER,
        REC_DATA,
        RECORD,
        FrameDecoder,
        PatchReader,
        decode_data,
    )

    reader = PatchReader(io.BytesIO(data).read, "patch", key)
    frames = FrameDecoder(reader.header)
    records = list(reader.records())
    h = PATCH_HEADER.size + CRC.size + (MAC_LEN if reader.header.authenticated else 0)
    parts = [data[:h]]
    for r in records:
        at = r.offset
        parts += [data[at : at + 16], data[at + 20 : at + RECORD.size], r.meta]
        if r.kind == REC_DATA:
            parts.append(decode_data(frames, r))
    at = reader.trailer.body_bytes if reader.trailer else -1
    parts.append(data[at : at + PATCH_TRAILER.size - 16])
    return parts


def case_key(folder: Path) -> bytes | None:
    """The MAC key of a fixture folder, None if the case has no key file."""
    from sparsepatch.format import derive_mac_key

    path = folder / KEY_FILE
    return derive_mac_key(path.read_bytes()) if path.exists() else None


def update(case: dict[str, Any], out: Path) -> list[str]:
    """Generate case and write into out the files that changed; a patch whose payloads only
    compress differently (another zstd version) is kept as it is. Returns the files written."""
    from sparsepatch.errors import SparsePatchError

    written = []
    with tempfile.TemporaryDirectory(prefix="sparsepatch-fixtures-") as work:
        fresh = Path(work) / out.name
        generate(case, fresh)
        out.mkdir(parents=True, exist_ok=True)
        for name in files_of(case):
            new, old = (fresh / name).read_bytes(), out / name
            if old.exists() and old.read_bytes() == new:
                continue
            if name == "patch.bin" and old.exists():
                key = case_key(fresh)
                with contextlib.suppress(SparsePatchError):
                    if zstd_independent(old.read_bytes(), key) == zstd_independent(new, key):
                        continue
            old.write_bytes(new)
            written.append(name)
    return written


def main() -> int:
    FIXTURES.mkdir(exist_ok=True)
    for old in sorted(FIXTURES.iterdir()):
        if old.is_dir() and (old / "case.json").exists() and old.name not in CASES:
            for name in (*FILES, KEY_FILE):
                (old / name).unlink(missing_ok=True)
            shutil.rmtree(old)
            print(f"removed stale case {old.name}")
    for name, case in CASES.items():
        written = update(case, FIXTURES / name)
        if written:
            print(f"{name}: wrote {', '.join(written)}")
        sizes = ", ".join(f"{f} {(FIXTURES / name / f).stat().st_size}" for f in files_of(case)[1:])
        print(f"{name}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
