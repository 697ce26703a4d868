"""Path-level verbs: signature(), diff(), apply(), info(). They open files (``-`` is
stdin/stdout), write outputs under a temporary name renamed when complete, and return
stats objects. The CLI is a thin layer over this module."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

from . import sparse
from .apply import Applier, ApplyStats, Journal, journal_path
from .diff import DEFAULT_LEVEL, DiffStats, write_patch
from .errors import FormatError, IOFailure, UsageError, VerifyMismatch, WrongBase
from .format import (
    CRC,
    MAC_LEN,
    MAX_SHIFT,
    MIN_SHIFT,
    PATCH_TRAILER,
    REC_DATA,
    REC_NAMES,
    PatchReader,
    SigHeader,
    Signature,
    SignatureEncoder,
    derive_mac_key,
    raw_length,
    read_signature,
    sniff,
)
from .signature import SignatureStats, write_signature
from .verify import VerifyStats, against_signature, verify_patch

DEFAULT_BLOCK_SIZE = 16 << 10  # measured on changed ext4 images: bench/BLOCKSIZE.md

__all__ = ["signature", "diff", "apply", "info", "check", "verify", "VerifyStats", "ApplyStats", "DiffStats",
           "SignatureStats", "DEFAULT_BLOCK_SIZE"]


def block_shift(block_size: int) -> int:
    shift = block_size.bit_length() - 1
    if block_size <= 0 or 1 << shift != block_size or not MIN_SHIFT <= shift <= MAX_SHIFT:
        raise UsageError(f"block size {block_size} must be a power of two from 4 KiB to 16 MiB")
    return shift


@contextlib.contextmanager
def _input(path: str) -> Iterator[IO[bytes]]:
    if path == "-":
        yield sys.stdin.buffer
        return
    fd = sparse.open_path(path, os.O_RDONLY)
    with os.fdopen(fd, "rb", buffering=1 << 20) as f:
        yield f


def patch_pieces(paths: list[str]) -> list[str]:
    """The files a patch is read from: the paths given, or for a single PATCH.000 every
    numbered piece after it that exists (diff --split writes them)."""
    if len(paths) == 1 and paths[0].endswith(".000") and os.path.exists(paths[0][:-4] + ".001"):
        stem, k, out = paths[0][:-4], 0, []
        while os.path.exists(f"{stem}.{k:03d}"):
            out.append(f"{stem}.{k:03d}")
            k += 1
        return out or paths
    return paths


@contextlib.contextmanager
def _inputs(paths: list[str]) -> Iterator[_Chain]:
    """One reader over several files in order (pieces of a split patch)."""
    with contextlib.ExitStack() as stack:
        yield _Chain([stack.enter_context(_input(p)) for p in paths])


class _Chain:
    """Reads files one after the other; rewind() starts again from the first byte of the
    same open files (so a second pass reads what the first did, even if a path is
    replaced meanwhile)."""

    def __init__(self, files: list[IO[bytes]]):
        self.files = files
        self.current = 0

    def read(self, n: int) -> bytes:
        while self.current < len(self.files):
            chunk = self.files[self.current].read(n)
            if chunk:
                return chunk
            self.current += 1
        return b""

    def rewind(self) -> None:
        for f in self.files:
            f.seek(0)
        self.current = 0


@contextlib.contextmanager
def _output(path: str | None, split: int | None = None) -> Iterator[Callable[[bytes], object]]:
    """Write to stdout, or to a temporary file beside path renamed over it when complete,
    so that an interrupted run never leaves a file that looks finished. With split, write
    path.000, path.001, ... of at most split bytes each, all renamed at the end."""
    if path is None or path == "-":
        if split:
            raise UsageError("--split needs -o FILE")
        with _direct(sys.stdout.buffer, "standard output") as out:
            yield out
        return
    if not split and _is_special(path):
        # /dev/null, a FIFO, a tape: write into it; renaming over it would replace the node.
        try:
            f = open(path, "wb", buffering=0)  # nothing left to flush (and fail) at close
        except OSError as e:
            raise IOFailure(f"{path}: cannot open: {e.strerror}") from None
        with f, _direct(f, path) as out:
            yield out
        return
    pieces: list[_PartFile] = []
    left = split or 0

    def write(b: bytes) -> None:
        nonlocal left
        if not split:
            pieces[0].write(b)
            return
        view = memoryview(b)
        while view:
            if left == 0:
                _PartFile(f"{path}.{len(pieces):03d}", pieces)
                left = split
            n = min(len(view), left)
            pieces[-1].write(view[:n])
            left -= n
            view = view[n:]

    try:
        _PartFile(f"{path}.000" if split else path, pieces)
        left = split or 0
        yield write
        for piece in pieces:
            piece.close()
        if split:
            # Pieces a previous, longer patch of the same name left behind would be read on.
            k = len(pieces)
            while os.path.exists(f"{path}.{k:03d}"):
                os.unlink(f"{path}.{k:03d}")
                k += 1
        # Last piece first: PATCH.000, the name a user reaches for, appears only when the
        # rest are in place.
        for piece in reversed(pieces):
            piece.commit()
        sparse.sync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        for piece in pieces:
            piece.abort()
        raise


@contextlib.contextmanager
def _direct(f: IO[bytes], name: str) -> Iterator[Callable[[bytes], object]]:
    """Writes to an already open stream, with errors as one line (a broken pipe stays a
    BrokenPipeError: the CLI treats a reader that went away as a quiet exit)."""

    def write(b: bytes) -> None:
        try:
            f.write(b)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise IOFailure(f"{name}: write failed: {e.strerror}") from None

    yield write
    try:
        f.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise IOFailure(f"{name}: write failed: {e.strerror}") from None


class _PartFile:
    """An output file written under a temporary name beside its final one."""

    def __init__(self, path: str, registry: list[_PartFile]):
        self.path = path
        self.tmp = ""
        self.fd = -1
        self.f: IO[bytes] | None = None
        # Registered before the file exists, so that an interrupt at any point after
        # mkstemp still finds it to remove.
        registry.append(self)
        folder, base = os.path.split(os.path.abspath(path))
        for _ in range(100):
            # The name is known before the file exists (mkstemp would only say afterwards).
            self.tmp = os.path.join(folder, f".{base}.{os.urandom(4).hex()}.part")
            try:
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                  0o600)
                break
            except FileExistsError:
                continue
            except OSError as e:
                self.tmp = ""
                raise IOFailure(f"{path}: cannot create output: {e.strerror}") from None
        self.f = os.fdopen(self.fd, "wb", buffering=1 << 20)

    def write(self, b: bytes | memoryview) -> None:
        assert self.f is not None
        try:
            self.f.write(b)
        except OSError as e:
            raise IOFailure(f"{self.path}: write failed: {e.strerror}") from None

    def close(self) -> None:
        assert self.f is not None
        try:
            self.f.flush()
            sparse.sync(self.f.fileno())
            self.f.close()
            os.chmod(self.tmp, 0o666 & ~_umask())
        except OSError as e:
            raise IOFailure(f"{self.path}: cannot finish output: {e.strerror}") from None

    def commit(self) -> None:
        try:
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise IOFailure(f"{self.path}: cannot finish output: {e.strerror}") from None
        self.tmp = ""

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            if self.f is not None:
                self.f.close()
            elif self.fd >= 0:
                os.close(self.fd)
        if self.tmp:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


def _sniff(f: IO[bytes], name: str) -> tuple[str, Callable[[int], bytes]]:
    """What f holds, from its magic, and a read callable that still starts at byte 0
    (stdin cannot seek back)."""
    head = f.read(8)
    kind = sniff(head, name)
    pending = memoryview(head)

    def read(n: int) -> bytes:
        nonlocal pending
        if pending:
            out, pending = bytes(pending[:n]), pending[n:]
            return out
        return f.read(n)

    return kind, read


def _counting(read: Callable[[int], bytes], progress: Callable[[int], None]) -> Callable[[int], bytes]:
    def counted(n: int) -> bytes:
        chunk = read(n)
        progress(len(chunk))
        return chunk

    return counted


def _is_special(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _refuse_overwrite(output: str | None, *inputs: str | None) -> None:
    """-o naming an input would rename the output over it: a typo that destroys an image."""
    if output is None or output == "-" or not os.path.exists(output):
        return
    for path in inputs:
        if path and path != "-" and os.path.exists(path) and os.path.samefile(output, path):
            raise UsageError(f"{output}: the output would replace the input {path}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_source(path: str) -> tuple[int, bool]:
    if path == "-":
        return sys.stdin.fileno(), False
    return sparse.open_path(path, os.O_RDONLY), True


def data_size(path: str) -> int | None:
    """Bytes in path's data extents (what signature and diff will read); None for a stream."""
    if path == "-":
        return None
    fd = sparse.open_path(path, os.O_RDONLY)
    try:
        if not sparse.is_seekable(fd):
            return None
        size = sparse.file_size(fd)
        return sum(end - start for start, end in sparse.data_extents(fd, size))
    finally:
        os.close(fd)


def input_size(path: str) -> int | None:
    """Size of a regular file to be read whole (a patch), None for a stream."""
    if path == "-":
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def signature(dest: str, output: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
              progress: Callable[[int], None] | None = None) -> SignatureStats:
    """Write the signature of dest (a path or '-') to output (a path, '-' or None: stdout)."""
    shift = block_shift(block_size)
    _refuse_overwrite(output, dest)
    fd, own = _open_source(dest)
    try:
        with _output(output) as write:
            mtime = os.fstat(fd).st_mtime_ns if stat.S_ISREG(os.fstat(fd).st_mode) else 0
            return write_signature(fd, shift, dest, write, progress, mtime)
    finally:
        if own:
            os.close(fd)


def load_signature(path: str) -> Signature:
    with _input(path) as f:
        name = "signature" if path == "-" else path
        return read_signature(f.read, name)


def empty_signature(block_size: int) -> Signature:
    enc = SignatureEncoder(SigHeader(block_shift(block_size), 0))
    data = enc.start() + enc.finish()[0]
    return read_signature(io.BytesIO(data).read, "empty signature")


def load_key(path: str) -> bytes:
    """The MAC key derived from a key file's bytes."""
    fd = sparse.open_path(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        material = f.read((1 << 20) + 1)
    if len(material) > 1 << 20:
        raise UsageError(f"{path}: key file is larger than 1 MiB; use a small file of random bytes")
    try:
        return derive_mac_key(material)
    except FormatError as e:
        raise UsageError(f"{path}: {e}") from None


def diff(sig: str | None, source: str, output: str | None = None, *, full: bool = False,
         block_size: int = DEFAULT_BLOCK_SIZE, level: int = DEFAULT_LEVEL,
         key_file: str | None = None, split: int | None = None,
         progress: Callable[[int], None] | None = None) -> DiffStats:
    """Write a patch turning the file sig describes into source. With full=True (and sig
    None) the patch creates the whole file."""
    if full == (sig is not None):
        raise UsageError("diff needs either a signature or --full, not both")
    if sig == "-" and source == "-":
        raise UsageError("signature and source cannot both be stdin")
    _refuse_overwrite(output, sig, source, key_file)
    key = load_key(key_file) if key_file else None
    signature_ = empty_signature(block_size) if sig is None else load_signature(sig)
    fd, own = _open_source(source)
    try:
        with _output(output, split) as write:
            return write_patch(signature_, fd, source, write, full=full, level=level, key=key,
                               progress=progress)
    finally:
        if own:
            os.close(fd)


def _open_dest(dest: str, full: bool) -> tuple[int, bool]:
    """Open dest for update; a full patch may create it. Returns (fd, created)."""
    if not os.path.exists(dest) and full:
        try:
            return os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), True
        except FileExistsError:  # created by someone else meanwhile: treat as existing
            pass
        except OSError as e:
            raise IOFailure(f"{dest}: cannot create: {e.strerror}") from None
    try:
        fd = sparse.open_path(dest, os.O_RDWR)
    except IOFailure as e:
        if not full and not os.path.lexists(dest):
            raise IOFailure(
                f"{dest}: no such file; only a full patch (diff --full) can create a destination"
            ) from None
        raise e
    if sparse.is_block_device(fd):
        os.close(fd)
        return sparse.open_device_exclusive(dest), False
    return fd, False


def default_journal(dest: str) -> str:
    """Beside a file; for a block device (whose /dev folder is not durable) in /var/tmp."""
    try:
        st = os.stat(dest)
    except OSError:
        return journal_path(dest)
    if stat.S_ISBLK(st.st_mode):
        # Named by device number, so every path to the device finds the same journal.
        dev = f"{os.major(st.st_rdev)}-{os.minor(st.st_rdev)}"
        return os.path.join("/var/tmp", f"sparsepatch-blockdev-{dev}.journal")
    return journal_path(dest)


def apply(patch: str | list[str], dest: str, verify: bool = False, *, key_file: str | None = None,
          unauthenticated_ok: bool = False, warn: Callable[[str], object] | None = None,
          journal: str | None = None, discard: bool = False, precheck: bool = True,
          progress: Callable[[int], None] | None = None) -> ApplyStats:
    """Apply patch (a path, '-', or the pieces of a split patch in order) to dest in place;
    create dest for a full patch.

    An authenticated patch needs key_file (or unauthenticated_ok=True to skip the check);
    with key_file, an unauthenticated patch is refused. warn receives non-fatal notes.
    journal overrides where the resume journal lives; discard uses BLKDISCARD for zero
    ranges on block devices (checked to read back as zeros). When the patch is a file (not
    a stream), precheck reads it once whole first, so that a corrupt, truncated or
    wrong-base patch is refused before anything is written."""
    key = load_key(key_file) if key_file else None
    pieces = patch_pieces([patch] if isinstance(patch, str) else list(patch))
    jpath = journal or default_journal(dest)
    # A patch file is read twice, a stream once: see the precheck below.
    twice = precheck and all(input_size(p) is not None for p in pieces)
    with _inputs(pieces) as chain:
        read = chain.read if progress is None else _counting(chain.read, progress)
        name = "patch" if pieces == ["-"] else pieces[0]
        reader = PatchReader(chain.read if twice else read, name, key, unauthenticated_ok)
        h = reader.header
        fd, created = _open_dest(dest, h.full)
        try:
            sparse.lock_exclusive(fd, dest)
            journal_ = Journal(jpath)
            slot = journal_.load()
            if slot and (slot.base_identity, slot.target_identity) != (h.base_identity, h.target_identity):
                raise WrongBase(
                    f"{journal_.path}: an interrupted apply of another patch (target "
                    f"{slot.target_identity.hex()[:16]}) left this journal; finish that patch "
                    "first, or delete the journal if the destination is known to be intact"
                )
            size = sparse.file_size(fd)
            lo, hi = sorted((h.base_size, h.target_size))
            if sparse.is_block_device(fd) and size != h.target_size:
                raise UsageError(
                    f"{dest}: block device of {size} bytes cannot become {h.target_size} bytes"
                )
            if size not in (h.base_size, h.target_size) and not (slot and lo <= size <= hi):
                raise WrongBase(
                    f"{dest}: destination is {size} bytes; the patch expects the base size "
                    f"{h.base_size} (or the target size {h.target_size} if already applied)"
                )
            if h.full and not created and not slot and size:
                return _full_onto_existing(reader, fd, dest, verify)
            stale = bool(h.base_mtime_ns) and not slot and os.fstat(fd).st_mtime_ns != h.base_mtime_ns
            accepted = (slot.start_block, slot.end_block) if slot else None
            applier = Applier(reader, fd, dest, journal_, accepted, discard)
            if twice:
                applier.precheck(reader)
                chain.rewind()
                applier.reader = PatchReader(read, name, key, unauthenticated_ok)
                if applier.reader.header != h:
                    raise FormatError(f"{name}: the patch changed while apply was reading it")
            stats = applier.run()
            if warn and stale and stats.blocks_written + stats.blocks_punched + stats.blocks_copied:
                # Only worth saying when this run changed something: a repeated apply also
                # finds a new mtime, its own.
                warn(f"{dest} was modified after the signature was taken (its mtime differs); "
                     "blocks the patch touched were checked, others were not: use --verify")
        except BaseException:
            # A file this run created and never wrote to would only mislead: remove it.
            if created and sparse.file_size(fd) == 0 and not os.path.exists(jpath):
                os.unlink(dest)
            raise
        finally:
            os.close(fd)
    if verify:
        check(dest, h.block_shift, h.target_identity, h.target_size)
    return stats


def _full_onto_existing(reader: PatchReader, fd: int, dest: str, verify: bool) -> ApplyStats:
    """A full patch describes data blocks only, not the holes between them, so it cannot
    check an existing file block by block. Accept it only when the file already is the
    target (a repeated first copy); anything else is refused before writing."""
    h = reader.header
    found = write_signature(fd, h.block_shift, dest, lambda b: None)
    if found.file_size != h.target_size or found.identity != h.target_identity.hex():
        raise WrongBase(
            f"{dest}: exists and is not this patch's target; a full patch only creates a file "
            "(or resumes its interrupted creation): remove it, or update it with a signature"
        )
    n = blocks = 0
    for rec in reader.records():
        n += 1
        blocks += rec.count
    return ApplyStats(h.target_size, h.block_size, n, 0, 0, 0, blocks, 0, False)


def check(path: str, shift: int, identity: bytes, size: int | None = None) -> None:
    """Re-hash path's data extents and compare with a target identity (and size)."""
    fd, own = _open_source(path)
    try:
        st = write_signature(fd, shift, path, lambda b: None)
    finally:
        if own:
            os.close(fd)
    if size is not None and st.file_size != size:
        raise VerifyMismatch(f"{path}: {st.file_size} bytes, the patch's target is {size} bytes")
    if st.identity != identity.hex():
        raise VerifyMismatch(
            f"{path}: content does not match the target identity "
            f"(expected {identity.hex()[:16]}..., found {st.identity[:16]}...)"
        )


def verify(path: str, against: str | None = None, key_file: str | None = None) -> VerifyStats | None:
    """Without against: check a patch end to end (every CRC, MAC, payload and block hash).
    With against (a signature or patch): check the file path against it; raise
    VerifyMismatch naming the first difference."""
    if against is None:
        key = load_key(key_file) if key_file else None
        with _input(path) as f:
            name = "patch" if path == "-" else path
            return verify_patch(PatchReader(f.read, name, key, unauthenticated_ok=key is None))
    with _input(against) as f:
        name = "input" if against == "-" else against
        kind, read = _sniff(f, name)
        if kind == "signature":
            sig = read_signature(read, name)
        else:
            h = PatchReader(read, name, None, unauthenticated_ok=True).header
    if kind == "patch":
        check(path, h.block_shift, h.target_identity, h.target_size)
        return None
    fd, own = _open_source(path)
    try:
        against_signature(fd, path, sig)
    finally:
        if own:
            os.close(fd)
    return None


def info(path: str) -> dict[str, Any]:
    """What a signature or patch holds. Every header, record and trailer field and CRC is
    checked; payloads are not decompressed (verify does that)."""
    with _input(path) as f:
        name = "input" if path == "-" else path
        kind, read = _sniff(f, name)
        if kind == "signature":
            s = read_signature(read, name)
            return {
                "kind": "signature", "version": 1, "block_size": s.block_size,
                "file_size": s.header.file_size, "blocks": s.header.block_count,
                "data_blocks": len(s.data_index), "hole_blocks": s.hole_blocks, "runs": s.runs,
                "mtime_ns": s.mtime_ns, "identity": s.identity.hex(),
            }
        reader = PatchReader(read, name, None, unauthenticated_ok=True)
        h = reader.header
        records = {name_: 0 for name_ in REC_NAMES.values()}
        raw = 0
        for rec in reader.records():
            records[REC_NAMES[rec.kind]] += 1
            if rec.kind == REC_DATA:
                raw += raw_length(h, rec.first_block, rec.count)
        assert reader.trailer is not None
        t = reader.trailer
        return {
            "kind": "patch", "version": 1, "full": h.full, "authenticated": h.authenticated,
            "block_size": h.block_size,
            "base_size": h.base_size, "target_size": h.target_size,
            "base_identity": h.base_identity.hex(), "target_identity": h.target_identity.hex(),
            "records": records,
            "blocks": {"data": t.data_blocks, "zero": t.zero_blocks, "copy": t.copy_blocks},
            "data_bytes": raw, "payload_bytes": t.payload_bytes,
            "patch_bytes": t.body_bytes + PATCH_TRAILER.size + CRC.size
            + (MAC_LEN if h.authenticated else 0),
        }

