"""Path-level verbs: signature(), diff(), apply(), info(). They open files (``-`` is
stdin/stdout), write outputs under a temporary name renamed when complete, and return
stats objects. The CLI is a thin layer over this module."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

from . import files, fork, inputs, outputs, paths
from . import since as since_
from .apply import ApplyStats, apply_patch
from .diff import DEFAULT_LEVEL, DiffStats, write_patch
from .errors import FormatError, UsageError, VerifyMismatch
from .format import (
    CRC,
    MAC_LEN,
    MAX_WINDOW_LOG,
    MIN_WINDOW_LOG,
    PAGE_SIZE,
    PATCH_TRAILER,
    REC_DATA,
    REC_NAMES,
    REC_STAGE,
    VERSION,
    PatchReader,
    SigHeader,
    Signature,
    SignatureEncoder,
    derive_mac_key,
    raw_length,
    read_signature,
    shift_for_block_size,
)
from .journal import Journal
from .merge import MergeStats, merge_patches
from .scratch import Scratch
from .signature import SignatureStats, write_signature
from .undo import Undo
from .verify import VerifyStats, against_signature, verify_patch

data_size = inputs.data_size
input_size = inputs.input_size
patch_pieces = inputs.patch_pieces
FAT_MAX_FILE = outputs.FAT_MAX_FILE

DEFAULT_BLOCK_SIZE = 16 << 10  # measured on changed ext4 images: bench/BLOCKSIZE.md

__all__ = ["signature", "diff", "apply", "merge", "info", "check", "verify", "VerifyStats", "ApplyStats",
           "DiffStats", "MergeStats", "SignatureStats", "DEFAULT_BLOCK_SIZE"]


block_shift = shift_for_block_size


def signature(dest: str, output: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
              progress: Callable[[int], None] | None = None, *, source_check: str = "mtime",
              warn: Callable[[str], object] | None = None, jobs: int | None = None) -> SignatureStats:
    """Write the signature of dest (a path or '-') to output (a path, '-' or None: stdout).
    A file that changes while it is read raises SourceChanged; source_check "content"
    looks at its size only, for a file whose mtime is always new (see diff). jobs: the
    processes that hash (default: one per CPU this process may use); the output is the
    same for any number."""
    shift = block_shift(block_size)
    outputs.refuse_overwrite(output, dest)
    with fork.jobs(jobs), inputs.open_source(dest) as fd:
        mode = paths.read_mode(None if dest == "-" else fd)
        with outputs.open_output(output, mode=mode) as write:
            return write_signature(fd, shift, dest, write, progress, None,
                                   source_check=source_check, warn=warn)


def write_file(path: str, data: bytes, sources: Sequence[str | None] = ()) -> None:
    """Write a small output (--stats FILE) the way -o writes: under a temporary name
    renamed into place, and never through another user's symlink or FIFO; no more readable
    than the sources it describes (their sizes and identities are in it)."""
    with outputs.open_output(path, mode=outputs.output_mode(*sources)) as write:
        write(data)


def refuse_stats_over(stats: str | None, outs: list[str | None], ins: list[str | None],
                      split_of: str | None = None) -> None:
    """--stats FILE is renamed into place at the end, like -o: naming one of the command's
    inputs or outputs would replace it (an image, a patch, an undo) with its JSON. split_of:
    the -o of a split patch, whose pieces are its outputs too."""
    if stats is None or stats == "-":
        return
    if _is_piece(stats, split_of):
        raise UsageError(f"{stats}: the stats would replace a piece of the split patch {split_of}")
    for path in outs:
        # An output may not exist yet: compare the names too.
        if path and path != "-" and paths.absolute(path) == paths.absolute(stats):
            raise UsageError(f"{stats}: the stats would replace the output {path}")
    outputs.refuse_overwrite(stats, *outs, *ins)


def _is_piece(path: str, split_of: str | None) -> bool:
    """Whether path names a piece of the split patch written to split_of (-o with --split)."""
    if not split_of or split_of == "-" or path == "-":
        return False
    stem, piece = paths.absolute(split_of) + ".", paths.absolute(path)
    return piece.startswith(stem) and piece[len(stem):].isdigit()


def _read_signature(path: str) -> tuple[Signature, int]:
    """The signature at path, and the mode an output made from it may have (read_mode)."""
    with inputs.open_input(path) as f:
        name = "signature" if path == "-" else path
        mode = paths.read_mode(None if path == "-" else f.fileno())
        return read_signature(f.read, name), mode


def empty_signature(block_size: int) -> Signature:
    enc = SignatureEncoder(SigHeader(block_shift(block_size), 0))
    data = enc.start() + enc.finish()[0]
    return read_signature(io.BytesIO(data).read, "empty signature")


def load_key(path: str) -> bytes:
    """The MAC key derived from a key file's bytes."""
    with os.fdopen(inputs.open_file(path), "rb") as f:
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
         progress: Callable[[int], None] | None = None, source_check: str = "mtime",
         warn: Callable[[str], object] | None = None, next_signature: str | None = None,
         since: str | None = None, jobs: int | None = None,
         window_log: int = MAX_WINDOW_LOG) -> DiffStats:
    """Write a patch turning the file sig describes into source. With full=True (and sig
    None) the patch creates the whole file. A source that changes while it is read raises
    SourceChanged: source_check "mtime" compares its mtime, ctime and size before and
    after; "content" (a source whose mtime is always new, such as a FUSE export) its size,
    and relies on the second reading of the blocks the patch carries, which are hashed
    again and compared with the first. next_signature names a file for the signature the
    destination will have after the patch (the target's, read at no extra cost): the next
    diff can start from it without a signature from the destination. since names a
    copy-on-write snapshot (a reflink copy) of the state sig describes, on the source's
    XFS or btrfs filesystem: only the ranges whose extents differ from it are read. jobs:
    as for signature. window_log caps the compression window at
    2^window_log bytes (10..27): the memory diff's compressor and apply's decoder take."""
    if not MIN_WINDOW_LOG <= window_log <= MAX_WINDOW_LOG:
        raise UsageError(f"window log {window_log} is outside {MIN_WINDOW_LOG}..{MAX_WINDOW_LOG}")
    if full == (sig is not None):
        raise UsageError("diff needs either a signature or --full, not both")
    if sig == "-" and source == "-":
        raise UsageError("signature and source cannot both be stdin")
    outputs.refuse_overwrite(output, sig, source, key_file)
    if next_signature is not None:
        if next_signature == "-" and output in (None, "-"):
            raise UsageError("--next-signature - and the patch cannot both go to standard output")
        if output not in (None, "-") and paths.absolute(next_signature) == paths.absolute(output):
            raise UsageError(f"{next_signature}: --next-signature names the patch's own output")
        if split and _is_piece(next_signature, output):
            # Committed after the pieces, it would replace one of them.
            raise UsageError(f"{next_signature}: --next-signature names a piece of the split "
                             f"patch {output}")
        outputs.refuse_overwrite(next_signature, sig, source, key_file)
    key = load_key(key_file) if key_file else None
    signature_, mode = (empty_signature(block_size), 0o666) if sig is None else _read_signature(sig)
    if since is not None and (sig is None or source == "-"):
        raise UsageError("--since needs a signature and a source file (not --full, not stdin)")
    with fork.jobs(jobs), inputs.open_source(source) as fd:
        mode &= paths.read_mode(None if source == "-" else fd)
        changed = None if since is None else _since_ranges(since, fd, source, signature_.header.file_size)
        # The next signature is committed only after the patch is: never one without the other
        # (a signature of a target no patch leads to would make the next diff's patch useless).
        with contextlib.ExitStack() as outs:
            nxt = (outs.enter_context(outputs.open_output(next_signature, None, mode))
                   if next_signature is not None else None)
            write = outs.enter_context(outputs.open_output(output, split, mode))
            return write_patch(signature_, fd, source, write, full=full, level=level, key=key,
                               progress=progress, source_check=source_check, warn=warn,
                               next_signature=nxt, since=changed,
                               window_log=window_log)


def _since_ranges(snapshot: str, fd: int, source: str, size: int) -> list[tuple[int, int]]:
    """The byte ranges of source that differ from snapshot's extents (since.py)."""
    with inputs.open_source(snapshot) as snap:
        return since_.changed_ranges(snap, snapshot, fd, source, size)[0]


def apply(patch: str | list[str], dest: str, verify: bool = False, *, key_file: str | None = None,
          unauthenticated_ok: bool = False, warn: Callable[[str], object] | None = None,
          journal: str | None = None, discard: bool = False, precheck: bool = True,
          allow_in_use: bool = False, progress: Callable[[int], None] | None = None,
          undo: str | None = None, scratch: str | None = None) -> ApplyStats:
    """Apply patch (a path, '-', or the pieces of a split patch in order) to dest in place;
    create dest for a full patch.

    An authenticated patch needs key_file (or unauthenticated_ok=True to skip the check);
    with key_file, an unauthenticated patch is refused. warn receives non-fatal notes.
    journal overrides where the resume journal lives; discard uses BLKDISCARD for zero
    ranges on block devices (checked to read back as zeros). When the patch is a file (not
    a stream), precheck reads it once whole first, so that a corrupt, truncated or
    wrong-base patch is refused before anything is written. allow_in_use applies to a
    file that backs a loop device or that another program holds a lock on. undo names a
    file to write the undo patch to (target back to base, authenticated with the same
    key), made durable block by block before each block is overwritten. scratch names the
    folder for the base pages a patch with moved content stages (default: beside dest)."""
    if dest == "-":
        raise UsageError("-: apply writes in place: DEST must be a file or a block device, "
                         "not standard output")
    key = load_key(key_file) if key_file else None
    pieces = inputs.patch_pieces([patch] if isinstance(patch, str) else list(patch))
    if undo is not None:
        if undo == "-":
            raise UsageError("--undo needs a file: it is written beside a temporary that a "
                             "rerun resumes")
        outputs.refuse_overwrite(undo, dest, *pieces, key_file)
    # A patch file is read twice, a stream once: see the precheck below.
    twice = precheck and all(inputs.input_size(p) is not None for p in pieces)
    with inputs.open_inputs(pieces, twice) as chain:
        read = chain.read if progress is None else inputs.counting(chain.read, progress)
        name = "patch" if pieces == ["-"] else pieces[0]
        reader = PatchReader(chain.read if twice else read, name, key, unauthenticated_ok)
        h = reader.header

        def reread() -> PatchReader:
            chain.rewind()
            return PatchReader(read, name, key, unauthenticated_ok)

        if undo is not None and h.full:
            raise UsageError(f"{name}: a full patch creates {dest} from nothing; its undo would be "
                             "removing the file, so --undo is for patches that update one")
        # The pieces read so far by what was read (a path may name another file by now),
        # the rest by their paths.
        fd, created = files.open_dest(dest, h.full, outputs.output_mode(*pieces) & chain.mode)
        journal_: Journal | None = None
        undo_: Undo | None = None
        scratch_: Scratch | None = None
        try:
            files.claim_dest(fd, dest, allow_in_use)
            journal_ = files.open_journal(dest, fd, journal, pieces, key_file)
            scratch_ = files.open_scratch(dest, fd, scratch, journal_)
            if undo is not None:
                # Loading a spool cuts it to its valid prefix: it may be none of the files
                # the journal may not be (the destination, the patch, the key).
                undo_ = Undo(undo, h, key, dest, journal_.not_files)
                _refuse_undo_at_journal(undo_, journal_)
            stats = apply_patch(reader, fd, dest, journal_, created=created is not None,
                                reread=reread if twice else None, discard=discard, warn=warn,
                                undo=undo_, scratch=scratch_)
            if created is not None:
                created.narrow_mode(fd, chain.mode)  # every piece has been read now
        except BaseException:
            # A file this run created and never wrote to would only mislead (a rerun takes
            # an empty file for an interrupted first copy): remove it, by the folder it was
            # created in, and only if the name still is that file.
            if created is not None:
                created.remove_if_empty(fd)
            raise
        finally:
            if journal_ is not None:
                journal_.close()
            if scratch_ is not None:
                scratch_.close()
            if undo_ is not None:
                undo_.close()
            if created is not None:
                created.close()
            os.close(fd)
    if verify:
        check(dest, h.block_shift, h.target_identity, h.target_size)
    return stats


def merge(patches: list[str], output: str | None = None, *, key_file: str | None = None,
          unauthenticated_ok: bool = False, split: int | None = None,
          level: int = DEFAULT_LEVEL, window_log: int = MAX_WINDOW_LOG,
          progress: Callable[[int], None] | None = None) -> MergeStats:
    """Write to output one patch from the first patch's base to the last one's target,
    made from the patches alone (a chain: each starts where the one before leads). Each
    of patches is a path, a split patch's .000 (its pieces are found as apply finds them)
    or '-' (once). With key_file every patch must be authenticated with it, and so is the
    output; unauthenticated_ok reads authenticated patches unchecked. Nothing is written
    until every patch was read and checked: a broken chain leaves no output."""
    if len(patches) < 2:
        raise UsageError("merge needs at least two patches")
    if patches.count("-") > 1:
        raise UsageError("only one of the patches can be standard input")
    if not MIN_WINDOW_LOG <= window_log <= MAX_WINDOW_LOG:
        raise UsageError(f"window log {window_log} is outside {MIN_WINDOW_LOG}..{MAX_WINDOW_LOG}")
    key = load_key(key_file) if key_file else None
    pieces = [inputs.patch_pieces([p]) for p in patches]
    every = [p for ps in pieces for p in ps]
    outputs.refuse_overwrite(output, *every, key_file)
    for path in every if split else ():
        if _is_piece(path, output):
            raise UsageError(f"{output}: the output's pieces would replace the input {path}")
    size = sum(inputs.input_size(p) or 0 for p in every)
    with contextlib.ExitStack() as stack:
        readers, chains = [], []
        for path, ps in zip(patches, pieces, strict=True):
            chain = stack.enter_context(inputs.open_inputs(ps))
            chains.append(chain)
            name = "patch" if path == "-" else path
            read = chain.read if progress is None else inputs.counting(chain.read, progress)
            readers.append(PatchReader(read, name, key, unauthenticated_ok))
        sink: list[Callable[[bytes], object]] = []

        def opened() -> None:
            # Every piece was read by now: the mode of the files read, not of whatever
            # their paths name now (a secret patch renamed away for a public one meanwhile).
            mode = 0o666
            for c in chains:
                mode &= c.mode
            sink.append(stack.enter_context(outputs.open_output(output, split, mode)))

        return merge_patches(readers, lambda b: sink[0](b), key=key, level=level,
                             window_log=window_log, opened=opened, input_bytes=size)


def _refuse_undo_at_journal(undo: Undo, journal: Journal) -> None:
    """UNDO renamed over the journal would leave a file that every later apply refuses as
    a journal; a spool at the journal's name would make the journal refuse itself midway."""
    if journal.name not in (undo.name, undo.spool):
        return
    a, b = os.fstat(undo.dir_fd), os.fstat(journal.dir_fd)
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        raise UsageError(f"{undo.path}: the undo patch (or its spool {undo.spool}) would be the "
                         f"journal {journal.path}; name another file")


def check(path: str, shift: int, identity: bytes, size: int | None = None) -> None:
    """Re-hash path's data extents and compare with a target identity (and size)."""
    with inputs.open_source(path) as fd:
        st = write_signature(fd, shift, path, lambda b: None)
    if size is not None and st.file_size != size:
        raise VerifyMismatch(f"{path}: {st.file_size} bytes, the patch's target is {size} bytes")
    if st.identity != identity.hex():
        raise VerifyMismatch(
            f"{path}: content does not match the target identity "
            f"(expected {identity.hex()[:16]}..., found {st.identity[:16]}...)"
        )


def verify(path: str | list[str], against: str | None = None,
           key_file: str | None = None) -> VerifyStats | None:
    """Without against: check a patch end to end (every CRC, MAC, payload and block hash);
    path may be the pieces of a split patch in order, or its .000 alone (the rest are
    found as apply finds them). With against (a signature or patch, or a split patch's
    .000): check the file path against it; raise VerifyMismatch naming the first difference."""
    if against is None:
        key = load_key(key_file) if key_file else None
        pieces = inputs.patch_pieces([path] if isinstance(path, str) else list(path))
        with inputs.open_inputs(pieces) as chain:
            name = "patch" if pieces == ["-"] else pieces[0]
            return verify_patch(PatchReader(chain.read, name, key, unauthenticated_ok=key is None))
    if not isinstance(path, str):
        raise UsageError("verify --against checks one FILE")
    with inputs.open_inputs(inputs.patch_pieces([against])) as f:
        name = "input" if against == "-" else against
        kind, read = inputs.sniff_read(f.read, name)
        if kind == "signature":
            sig = read_signature(read, name)
        else:
            h = PatchReader(read, name, None, unauthenticated_ok=True).header
    if kind == "patch":
        check(path, h.block_shift, h.target_identity, h.target_size)
        return None
    with inputs.open_source(path) as fd:
        against_signature(fd, path, sig)
    return None


def info(path: str | list[str]) -> dict[str, Any]:
    """What a signature or patch holds. Every header, record and trailer field and CRC is
    checked; payloads are not decompressed (verify does that). A split patch is read from
    its pieces, given in order or found from its .000 as apply finds them."""
    pieces = inputs.patch_pieces([path] if isinstance(path, str) else list(path))
    with inputs.open_inputs(pieces) as f:
        name = "input" if pieces == ["-"] else pieces[0]
        kind, read = inputs.sniff_read(f.read, name)
        if kind == "signature":
            s = read_signature(read, name)
            return {
                "kind": "signature", "version": VERSION, "block_size": s.block_size,
                "page_size": PAGE_SIZE, "file_size": s.header.file_size,
                "blocks": s.header.block_count, "data_blocks": len(s.data_index),
                "hole_blocks": s.hole_blocks, "page_hashes": len(s.data_index) * s.pages_per_block,
                "runs": s.runs,
                "mtime_ns": s.mtime_ns, "identity": s.identity.hex(),
            }
        reader = PatchReader(read, name, None, unauthenticated_ok=True)
        h = reader.header
        records = {name_: 0 for name_ in REC_NAMES.values()}
        raw = stage_pages = moved_pages = 0
        for rec in reader.records():
            records[REC_NAMES[rec.kind]] += 1
            if rec.kind == REC_DATA:
                raw += raw_length(h, rec)
                moved_pages += rec.moved_pages
            elif rec.kind == REC_STAGE:
                stage_pages += rec.count
        assert reader.trailer is not None
        t = reader.trailer
        return {
            "kind": "patch", "version": VERSION, "full": h.full, "authenticated": h.authenticated,
            "block_size": h.block_size,
            "base_size": h.base_size, "target_size": h.target_size,
            "base_identity": h.base_identity.hex(), "target_identity": h.target_identity.hex(),
            "records": records, "frames": reader.frames, "window_log": h.window_log,
            "blocks": {"data": t.data_blocks, "zero": t.zero_blocks, "copy": t.copy_blocks},
            "data_bytes": raw, "payload_bytes": t.payload_bytes,
            "stage_pages": stage_pages, "moved_pages": moved_pages,
            "patch_bytes": t.body_bytes + PATCH_TRAILER.size + CRC.size
            + (MAC_LEN if h.authenticated else 0),
        }

