"""Bad input: one error line, the documented exit code, no traceback, and a destination that
is left alone (or, for damage found mid-way, holds only whole base or target blocks and is
finished by the good patch)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import pty
import random
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import KiB, MiB, error_line, make_sparse, pattern, run_cli

from sparsepatch import SparsePatchError, api
from sparsepatch.errors import IOFailure, UsageError, io_errors
from sparsepatch.format import CRC, PATCH_HEADER, PATCH_TRAILER, RECORD, SIG_HEADER, PatchReader, crc32c

BS = 4 * KiB


# ---------------------------------------------------------------------------- helpers


def digest(path: Path) -> tuple[int, str]:
    return os.path.getsize(path), hashlib.sha256(path.read_bytes()).hexdigest()


def blocks(data: bytes) -> list[bytes]:
    return [data[i : i + BS] for i in range(0, len(data), BS)]


def only_base_or_target_blocks(dest: bytes, base: bytes, target: bytes) -> None:
    """Every block of dest is the base's block or the target's block (zeros past an end)."""
    n = max(len(base), len(target), len(dest))
    pad = -(-n // BS) * BS
    d, b, t = (blocks(x.ljust(pad, b"\0")) for x in (dest, base, target))
    bad = [i for i in range(len(d)) if d[i] not in (b[i], t[i])]
    assert not bad, f"blocks {bad[:10]} are neither base nor target"
    assert len(dest) in range(min(len(base), len(target)), max(len(base), len(target)) + 1)


@dataclass
class Case:
    tmp: Path
    base: Path
    target: Path
    dest: Path
    sig: Path
    patch: Path

    def journal(self) -> Path:
        return self.dest.parent / f".{self.dest.name}.sparsepatch-journal"

    def reset(self) -> None:
        self.dest.write_bytes(self.base.read_bytes())
        if self.journal().exists():
            self.journal().unlink()


@pytest.fixture
def case(tmp: Path) -> Case:
    """A small base and a target reached by data, zero and copy records, grown and unaligned."""
    size = 600 * KiB + 123
    text = b"".join(b"line %06d of a log that compresses well\n" % i for i in range(2000))
    base = make_sparse(tmp / "base.img", size, [
        (0, text[: 40 * KiB]), (100 * KiB, pattern(3 * BS, 1)), (300 * KiB, text[: 24 * KiB]),
        (size - 200, 200),
    ])
    target = make_sparse(tmp / "target.img", size + 300 * KiB, [
        (0, text[: 40 * KiB]), (8 * KiB + 5, b"changed"),  # data record
        (100 * KiB, pattern(3 * BS, 1)),
        (200 * KiB, pattern(3 * BS, 1)),  # copy of an unchanged extent
        (400 * KiB, text[1000 : 1000 + 2 * BS]),  # new data
        (size - 200, 200), (size + 4000, b"end"),
    ])  # the extent at 300 KiB is gone (a zero record); grown, the new end is a hole
    dest = tmp / "dest.img"
    dest.write_bytes(base.read_bytes())
    sig, patch = tmp / "dest.sig", tmp / "update.patch"
    run_cli("signature", str(dest), "-o", str(sig), "-b", str(BS))
    run_cli("diff", str(sig), str(target), "-o", str(patch))
    info = api.info(str(patch))
    assert all(info["records"][k] >= 1 for k in ("data", "zero", "copy")), info
    return Case(tmp, base, target, dest, sig, patch)


def apply_lib(patch: bytes, case: Case, via: str = "file") -> SparsePatchError | None:
    """Apply patch bytes in-process, from a file or as a stream on stdin."""
    p = case.tmp / "bad.patch"
    p.write_bytes(patch)
    saved = sys.stdin
    try:
        if via == "stdin":
            sys.stdin = io.TextIOWrapper(io.BytesIO(patch))
        api.apply("-" if via == "stdin" else str(p), str(case.dest))
    except SparsePatchError as e:
        return e
    finally:
        sys.stdin = saved
    return None


def finish_with_good_patch(case: Case) -> None:
    """After a refused apply, the good patch still finishes the job. (When the refused run
    left no trace at all, that is the plain apply every other test makes: skipped for speed.)"""
    if case.dest.read_bytes() == case.base.read_bytes() and not case.journal().exists():
        return
    api.apply(str(case.patch), str(case.dest))
    assert case.dest.read_bytes() == case.target.read_bytes()


def layout(patch: bytes) -> dict[str, list[int]]:
    """Byte positions of each part of a patch, by kind of part."""
    reader = PatchReader(io.BytesIO(patch).read, "patch", None, unauthenticated_ok=True)
    head = PATCH_HEADER.size + CRC.size
    parts: dict[str, list[int]] = {"header": list(range(head)), "record header": [],
                                   "metadata": [], "payload": [], "trailer": []}
    for rec in reader.records():
        meta = len(rec.meta) + CRC.size
        parts["record header"] += range(rec.offset, rec.offset + RECORD.size)
        parts["metadata"] += range(rec.offset + RECORD.size, rec.offset + RECORD.size + meta)
        p0 = rec.offset + RECORD.size + meta
        parts["payload"] += range(p0, p0 + len(rec.payload))
    parts["trailer"] = list(range(len(patch) - PATCH_TRAILER.size - CRC.size, len(patch)))
    assert sum(len(v) for v in parts.values()) == len(patch)
    return parts


# ---------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("which", ["signature dest", "diff sig", "diff source", "diff --full source",
                                   "apply patch", "apply dest", "info file", "-o folder"])
def test_missing_file(case: Case, which: str) -> None:
    missing = str(case.tmp / "no-such-file")
    before = digest(case.dest)
    args = {
        "signature dest": ["signature", missing, "-o", str(case.tmp / "s")],
        "diff sig": ["diff", missing, str(case.target), "-o", str(case.tmp / "p")],
        "diff source": ["diff", str(case.sig), missing, "-o", str(case.tmp / "p")],
        "diff --full source": ["diff", "--full", missing, "-o", str(case.tmp / "p")],
        "apply patch": ["apply", missing, str(case.dest)],
        "apply dest": ["apply", str(case.patch), missing],
        "info file": ["info", missing],
        "-o folder": ["signature", str(case.dest), "-o", str(case.tmp / "no-dir" / "s")],
    }[which]
    line = error_line(run_cli(*args, check=False), 3, warnings_ok=True)
    assert "no-such-file" in line or "no-dir" in line
    assert digest(case.dest) == before
    assert not os.path.exists(missing)
    assert not (case.tmp / "s").exists() and not (case.tmp / "p").exists()
    assert not [n for n in os.listdir(case.tmp) if n.endswith(".part")]


# ---------------------------------------------------------------------------- wrong kind of file


def test_signature_given_as_patch(case: Case) -> None:
    before = digest(case.dest)
    line = error_line(run_cli("apply", str(case.sig), str(case.dest), check=False), 4, warnings_ok=True)
    assert "signature" in line.split(":", 2)[2].replace(str(case.sig), "")
    assert digest(case.dest) == before


def test_patch_given_as_signature(case: Case) -> None:
    line = error_line(run_cli("diff", str(case.patch), str(case.target), "-o", str(case.tmp / "p"),
                              check=False), 4, warnings_ok=True)
    assert "patch" in line.replace(str(case.patch), "")
    assert not (case.tmp / "p").exists()


def test_small_signature_given_as_patch(case: Case) -> None:
    empty = make_sparse(case.tmp / "empty.img", 0, [])
    run_cli("signature", str(empty), "-o", str(case.tmp / "empty.sig"))
    before = digest(case.dest)
    line = error_line(
        run_cli("apply", str(case.tmp / "empty.sig"), str(case.dest), check=False), 4, warnings_ok=True
    )
    assert digest(case.dest) == before
    assert "signature" in line.replace(str(case.tmp / "empty.sig"), "")


def test_text_file_has_unknown_magic(case: Case) -> None:
    text = case.tmp / "notes.txt"
    text.write_bytes(b"These are not the bytes you are looking for.\n" * 10)
    before = digest(case.dest)
    for args in (["apply", str(text), str(case.dest)], ["info", str(text)],
                 ["diff", str(text), str(case.target), "-o", str(case.tmp / "p")]):
        line = error_line(run_cli(*args, check=False), 4, warnings_ok=True)
        assert "magic" in line, args
    assert digest(case.dest) == before


def test_short_text_file_has_unknown_magic(case: Case) -> None:
    text = case.tmp / "short.txt"
    text.write_bytes(b"hello\n")
    before = digest(case.dest)
    line = error_line(run_cli("apply", str(text), str(case.dest), check=False), 4, warnings_ok=True)
    assert digest(case.dest) == before
    assert "magic" in line


# ---------------------------------------------------------------------------- unsupported format


def _with_version(data: bytes, struct_size: int, version: int) -> bytes:
    b = bytearray(data)
    b[8:10] = version.to_bytes(2, "little")
    b[struct_size : struct_size + 4] = CRC.pack(crc32c(bytes(b[:struct_size])))
    return bytes(b)


@pytest.mark.parametrize("version", [0, 1, 3, 0xFFFF])
def test_unsupported_patch_version(case: Case, version: int) -> None:
    bad = case.tmp / "v.patch"
    bad.write_bytes(_with_version(case.patch.read_bytes(), PATCH_HEADER.size, version))
    before = digest(case.dest)
    line = error_line(run_cli("apply", str(bad), str(case.dest), check=False), 4, warnings_ok=True)
    assert "version" in line and str(version) in line
    assert digest(case.dest) == before
    error_line(run_cli("info", str(bad), check=False), 4, warnings_ok=True)


@pytest.mark.parametrize("version", [0, 1, 3])
def test_unsupported_signature_version(case: Case, version: int) -> None:
    bad = case.tmp / "v.sig"
    bad.write_bytes(_with_version(case.sig.read_bytes(), SIG_HEADER.size, version))
    line = error_line(run_cli("diff", str(bad), str(case.target), "-o", str(case.tmp / "p"),
                              check=False), 4, warnings_ok=True)
    assert "version" in line
    assert not (case.tmp / "p").exists()


def test_unknown_patch_flag(case: Case) -> None:
    b = bytearray(case.patch.read_bytes())
    b[10:12] = (0x8000).to_bytes(2, "little")
    b[PATCH_HEADER.size : PATCH_HEADER.size + 4] = CRC.pack(crc32c(bytes(b[: PATCH_HEADER.size])))
    bad = case.tmp / "f.patch"
    bad.write_bytes(bytes(b))
    before = digest(case.dest)
    error_line(run_cli("apply", str(bad), str(case.dest), check=False), 4, warnings_ok=True)
    assert digest(case.dest) == before


# ---------------------------------------------------------------------------- damaged patches


def _flip(data: bytes, pos: int, mask: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


def _check_damaged(case: Case, accepted: bool, where: str) -> None:
    base, target, dest = case.base.read_bytes(), case.target.read_bytes(), case.dest.read_bytes()
    if accepted:
        assert dest == target, f"{where}: accepted, but the result is not the target"
    else:
        only_base_or_target_blocks(dest, base, target)
        finish_with_good_patch(case)


def test_flipped_byte_in_every_part_of_a_patch_cli(case: Case) -> None:
    good = case.patch.read_bytes()
    parts = layout(good)
    rng = random.Random(1)
    bad = case.tmp / "bad.patch"
    for part, positions in parts.items():
        assert positions, part
        for pos in sorted({positions[0], positions[-1], *rng.sample(positions, min(3, len(positions)))}):
            case.reset()
            bad.write_bytes(_flip(good, pos, 1 << rng.randrange(8)))
            r = run_cli("apply", str(bad), str(case.dest), check=False)
            if r.returncode != 0:
                error_line(r, 4, warnings_ok=True)
            _check_damaged(case, r.returncode == 0, f"{part} byte {pos}")


# From a stream, apply writes each record as it arrives, so damage found late leaves earlier
# records written; the good patch must still finish the job.
VIAS = ["file", "stdin"]


@pytest.mark.parametrize("via", VIAS)
def test_flipped_byte_anywhere_in_a_patch(case: Case, via: str) -> None:
    """Every byte of the patch, flipped in the library: refused with a format error (exit
    code 4), or applied bit-identically. Outside compressed payloads (which zstd's checksum
    and the block hashes guard) every byte is covered by a CRC: always refused."""
    good = case.patch.read_bytes()
    assert len(good) < 40_000  # small enough to try every position
    payload = set(layout(good)["payload"])
    for pos in range(len(good)):
        case.reset()
        err = apply_lib(_flip(good, pos, 0x01 if pos % 2 else 0x80), case, via)
        if err is not None:
            assert err.exit_code == 4, (pos, err)
        else:
            assert pos in payload, f"a flipped byte at {pos} outside any payload was not noticed"
        _check_damaged(case, err is None, f"byte {pos}")


@pytest.mark.parametrize("via", VIAS)
def test_truncated_patch_at_every_offset(case: Case, via: str) -> None:
    good = case.patch.read_bytes()
    base, target = case.base.read_bytes(), case.target.read_bytes()
    for cut in range(len(good)):
        case.reset()
        err = apply_lib(good[:cut], case, via)
        assert err is not None and err.exit_code == 4, cut
        only_base_or_target_blocks(case.dest.read_bytes(), base, target)
        finish_with_good_patch(case)


def test_truncated_patch_cli(case: Case) -> None:
    good = case.patch.read_bytes()
    parts = layout(good)
    cuts = [0, 7, 8, 50, PATCH_HEADER.size, PATCH_HEADER.size + CRC.size,
            parts["payload"][0], parts["payload"][-1], parts["trailer"][0], len(good) - 1]
    bad = case.tmp / "cut.patch"
    for cut in cuts:
        case.reset()
        bad.write_bytes(good[:cut])
        line = error_line(run_cli("apply", str(bad), str(case.dest), check=False), 4, warnings_ok=True)
        assert "truncated" in line, (cut, line)
        only_base_or_target_blocks(case.dest.read_bytes(), case.base.read_bytes(),
                                   case.target.read_bytes())
        r = run_cli("apply", str(case.patch), str(case.dest), check=False)
        assert r.returncode == 0, (cut, r.stderr)
        assert case.dest.read_bytes() == case.target.read_bytes()
    # From a pipe as well.
    case.reset()
    r = subprocess.run([sys.executable, "-m", "sparsepatch", "apply", "-", str(case.dest)],
                       input=good[: len(good) // 2], capture_output=True)
    error_line(r, 4, warnings_ok=True)
    finish_with_good_patch(case)


# ---------------------------------------------------------------------------- wrong destination


def test_patch_for_another_file(case: Case) -> None:
    other = case.tmp / "other.img"
    data = bytearray(case.base.read_bytes())
    data[8 * KiB : 9 * KiB] = pattern(KiB, 99)  # the very first block the patch changes
    other.write_bytes(bytes(data))
    before = digest(other)
    line = error_line(run_cli("apply", str(case.patch), str(other), check=False), 5, warnings_ok=True)
    assert "neither base nor target" in line
    assert digest(other) == before


def test_patch_for_a_file_of_another_size(case: Case) -> None:
    other = make_sparse(case.tmp / "other.img", 3 * MiB, [(0, MiB)])
    before = digest(other)
    line = error_line(run_cli("apply", str(case.patch), str(other), check=False), 5, warnings_ok=True)
    assert str(3 * MiB) in line and "size" in line
    assert digest(other) == before


def _apply_via(via: str, patch: Path, dest: Path) -> subprocess.CompletedProcess[bytes]:
    if via == "file":
        return run_cli("apply", str(patch), str(dest), check=False)
    return run_cli("apply", "-", str(dest), input=patch.read_bytes(), check=False)


def _differs_late(case: Case) -> Path:
    other = case.tmp / "other.img"
    data = bytearray(case.base.read_bytes())
    data[400 * KiB : 401 * KiB] = pattern(KiB, 98)  # only the last data record sees this
    other.write_bytes(bytes(data))
    return other


def test_patch_for_a_file_that_differs_late_leaves_it_untouched(case: Case) -> None:
    other = _differs_late(case)
    before = digest(other)
    line = error_line(_apply_via("file", case.patch, other), 5, warnings_ok=True)
    assert "neither base nor target" in line
    assert digest(other) == before


def test_streamed_patch_for_a_file_that_differs_late_stops_between_whole_blocks(case: Case) -> None:
    """A stream cannot be read twice, so it is checked record by record (documented in
    README and spec): records before the refused one are applied, each block whole."""
    other = _differs_late(case)
    original = other.read_bytes()
    line = error_line(_apply_via("stdin", case.patch, other), 5, warnings_ok=True)
    assert "neither base nor target" in line
    only_base_or_target_blocks(other.read_bytes(), original, case.target.read_bytes())


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_right_patch_applies_after_a_refused_wrong_one(case: Case, via: str) -> None:
    other = _differs_late(case)
    original = case.tmp / "other-original.img"
    original.write_bytes(other.read_bytes())
    run_cli("signature", str(original), "-o", str(case.tmp / "o.sig"), "-b", str(BS))
    run_cli("diff", str(case.tmp / "o.sig"), str(case.target), "-o", str(case.tmp / "o.patch"))
    error_line(_apply_via(via, case.patch, other), 5, warnings_ok=True)
    r = _apply_via(via, case.tmp / "o.patch", other)
    assert r.returncode == 0, r.stderr
    assert other.read_bytes() == case.target.read_bytes()


def test_locked_destination(case: Case) -> None:
    before = digest(case.dest)
    with open(case.dest, "r+b") as f:
        # The lock an apply holds: an OFD write lock over the whole file (a reader's flock
        # must not count, tests/test_root_safety.py).
        fcntl.fcntl(f, fcntl.F_OFD_SETLK, struct.pack("@hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0) + bytes(8))
        line = error_line(run_cli("apply", str(case.patch), str(case.dest), check=False), 7, warnings_ok=True)
    assert "apply" in line or "lock" in line
    assert digest(case.dest) == before
    run_cli("apply", str(case.patch), str(case.dest))
    assert case.dest.read_bytes() == case.target.read_bytes()


# ---------------------------------------------------------------------------- unwritable places


def test_destination_is_a_directory(case: Case) -> None:
    folder = case.tmp / "folder"
    folder.mkdir()
    run_cli("diff", "--full", str(case.target), "-o", str(case.tmp / "full.patch"))
    for patch in (case.patch, case.tmp / "full.patch"):
        line = error_line(run_cli("apply", str(patch), str(folder), check=False), 3, warnings_ok=True)
        assert "directory" in line
    assert os.listdir(folder) == []


def test_destination_in_a_missing_folder(case: Case) -> None:
    run_cli("diff", "--full", str(case.target), "-o", str(case.tmp / "full.patch"))
    dest = case.tmp / "missing" / "dest.img"
    error_line(run_cli("apply", str(case.tmp / "full.patch"), str(dest), check=False), 3, warnings_ok=True)
    error_line(run_cli("apply", str(case.patch), str(dest), check=False), 3, warnings_ok=True)
    assert not dest.parent.exists()


def test_missing_destination_needs_a_full_patch(case: Case) -> None:
    dest = case.tmp / "new.img"
    line = error_line(run_cli("apply", str(case.patch), str(dest), check=False), 3, warnings_ok=True)
    assert "full" in line
    assert not dest.exists()


def test_destination_is_a_kernel_file(case: Case) -> None:
    before = Path("/proc/version").read_bytes()
    run_cli("diff", "--full", str(case.target), "-o", str(case.tmp / "full.patch"))
    for patch in (case.patch, case.tmp / "full.patch"):
        r = run_cli("apply", str(patch), "/proc/version", check=False)
        assert r.returncode in (3, 5), r.stderr
        error_line(r, r.returncode, warnings_ok=True)
    assert Path("/proc/version").read_bytes() == before
    assert not [n for n in os.listdir("/proc") if "sparsepatch" in n]


# ---------------------------------------------------------------------------- usage


def test_binary_output_to_a_terminal_is_refused(case: Case) -> None:
    for args in (["signature", str(case.dest)], ["diff", str(case.sig), str(case.target)],
                 ["diff", "--full", str(case.target), "-o", "-"]):
        leader, follower = pty.openpty()
        try:
            r = subprocess.run([sys.executable, "-m", "sparsepatch", *args], stdout=follower,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            os.close(follower)
            follower = -1
            seen = b""
            try:
                while chunk := os.read(leader, 4096):
                    seen += chunk
            except OSError:  # EIO: the terminal's other end is closed
                pass
        finally:
            if follower >= 0:
                os.close(follower)
            os.close(leader)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr.decode()
        assert r.stderr.decode().startswith("sparsepatch: error:")
        assert "terminal" in r.stderr.decode()
        assert seen == b"", args


def test_full_and_signature_together_is_a_usage_error(case: Case) -> None:
    r = run_cli("diff", "--full", str(case.sig), str(case.target), "-o", str(case.tmp / "p"),
                check=False)
    assert "--full" in error_line(r, 2, warnings_ok=True)
    assert not (case.tmp / "p").exists()
    with pytest.raises(UsageError):
        api.diff(str(case.sig), str(case.target), str(case.tmp / "p"), full=True)
    assert not (case.tmp / "p").exists()


@pytest.mark.parametrize("args", [["diff", "TARGET"], ["apply", "PATCH"], ["apply"], ["signature"],
                                  ["nosuch"], ["signature", "DEST", "-b", "abc"],
                                  ["diff", "SIG", "TARGET", "-l", "99"],
                                  ["apply", "--bogus", "PATCH", "DEST"]])
def test_command_line_mistakes_are_usage_errors(case: Case, args: list[str]) -> None:
    names = {"TARGET": str(case.target), "PATCH": str(case.patch), "DEST": str(case.dest),
             "SIG": str(case.sig)}
    before = digest(case.dest)
    error_line(run_cli(*[names.get(a, a) for a in args], check=False), 2, warnings_ok=True)
    assert digest(case.dest) == before


@pytest.mark.parametrize("size", ["3K", "2K", "32M", "5000"])
def test_bad_block_size(case: Case, size: str) -> None:
    line = error_line(run_cli("signature", str(case.dest), "-b", size, "-o", str(case.tmp / "s"),
                              check=False), 2, warnings_ok=True)
    assert "block size" in line
    assert not (case.tmp / "s").exists()


def test_both_inputs_from_stdin(case: Case) -> None:
    r = run_cli("diff", "-", "-", input=case.sig.read_bytes(), check=False)
    line = error_line(r, 2, warnings_ok=True)
    assert "stdin" in line


@pytest.mark.parametrize("command", ["signature", "diff"])
def test_output_over_an_input_is_refused(case: Case, command: str) -> None:
    image = case.tmp / "image.img"
    image.write_bytes(case.target.read_bytes())
    before = digest(image)
    if command == "signature":
        args = ["signature", str(image), "-o", str(image)]
    else:
        args = ["diff", str(case.sig), str(image), "-o", str(image)]
    r = run_cli(*args, check=False)
    assert digest(image) == before
    error_line(r, 2, warnings_ok=True)


# ---------------------------------------------------------------------------- authentication


def test_authenticated_patch_needs_the_right_key(case: Case) -> None:
    key, other = case.tmp / "key", case.tmp / "other-key"
    key.write_bytes(pattern(32, 1))
    other.write_bytes(pattern(32, 2))
    signed = case.tmp / "signed.patch"
    run_cli("diff", str(case.sig), str(case.target), "-o", str(signed), "-k", str(key))
    before = digest(case.dest)
    error_line(run_cli("apply", str(signed), str(case.dest), check=False), 4, warnings_ok=True)
    error_line(
        run_cli("apply", str(signed), str(case.dest), "-k", str(other), check=False), 4, warnings_ok=True
    )
    error_line(
        run_cli("apply", str(case.patch), str(case.dest), "-k", str(key), check=False), 4, warnings_ok=True
    )
    assert digest(case.dest) == before
    run_cli("apply", str(signed), str(case.dest), "-k", str(key))
    assert case.dest.read_bytes() == case.target.read_bytes()


# ---------------------------------------------------------------------------- io_errors


def test_io_errors_turns_an_os_error_into_one_line_saying_where_and_why() -> None:
    with pytest.raises(IOFailure) as e, io_errors("/img: write failed at byte 4096"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(e.value) == "/img: write failed at byte 4096: No space left on device"
    assert e.value.__suppress_context__  # the CLI prints the line, never the OSError's traceback


@pytest.mark.parametrize(("code", "words"), [(errno.ENOENT, "no such file"),
                                             (errno.EISDIR, "is a directory"),
                                             (errno.EACCES, "permission denied"),
                                             (errno.EPERM, "permission denied"),
                                             (errno.ELOOP, os.strerror(errno.ELOOP))])
def test_io_errors_short_names_what_a_user_meets_opening_a_path(code: int, words: str) -> None:
    with pytest.raises(IOFailure, match=f"^/img: {words}$"), io_errors("/img", short=True):
        raise OSError(code, os.strerror(code))


def test_io_errors_lets_a_broken_pipe_and_other_errors_through() -> None:
    with pytest.raises(BrokenPipeError), io_errors("standard output: write failed"):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
    with pytest.raises(ValueError), io_errors("/img"):
        raise ValueError("not an I/O error")
