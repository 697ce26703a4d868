"""The undo patch an apply writes with --undo (spec/FORMAT.md, section 9.6): an ordinary patch
from the patch's target back to its base, holding the base content of every block the apply
overwrites or punches, and of the tail a shrink cuts off.

The content of a block must be durable in the undo before the block is overwritten: a power
cut after the write would otherwise lose its only copy. Records are appended to a spool
beside UNDO (the undo patch without its trailer) and the spool is synced before the writes
they cover begin. A rerun finds the spool, checks it record by record, cuts a torn tail and
goes on; every block it finds already written must be in the spool, or the undo is refused.
At the end the trailer is appended and the spool renamed to UNDO."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from . import paths, sparse
from .errors import (
    AuthenticationError,
    FormatError,
    IOFailure,
    Locked,
    SparsePatchError,
    UsageError,
    WrongBase,
    io_errors,
    io_failure,
)
from .format import (
    CRC,
    FLAG_MAC,
    FRAME_END,
    FRAME_START,
    MAC_LEN,
    MAX_RECORD_BLOCKS,
    MAX_WINDOW_LOG,
    MIN_WINDOW_LOG,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGE_ZERO,
    PATCH_HEADER,
    REC_COPY,
    REC_DATA,
    REC_STAGE,
    REC_ZERO,
    ZERO_HASH,
    ZERO_PAGE,
    FrameDecoder,
    MacChain,
    PatchHeader,
    PatchReader,
    PatchTrailer,
    RangeSet,
    Record,
    blocks_for,
    data_record_max_blocks,
    decode_data,
    decode_patch_header,
    encode_patch_header,
    encode_patch_trailer,
    encode_record,
    hash_block,
    pages_per_block,
)

UNDO_LEVEL = 3  # zstd level: apply is not the place for slow compression
SYNC_BATCH = 32 << 20  # bytes of undo (or of held patch data) between two syncs of the spool


def spool_name(name: str) -> str:
    return f".{name}.sparsepatch-undo"


def undo_header(h: PatchHeader, authenticated: bool) -> PatchHeader:
    """The header of the undo of the patch h: from h's target back to h's base. It is
    written before any record is known, so its window_log admits the largest record:
    each DATA record of an undo is a frame of its own (FRAME_START and FRAME_END)."""
    largest = data_record_max_blocks(h.block_shift) << h.block_shift
    window_log = min(MAX_WINDOW_LOG, max(MIN_WINDOW_LOG, (largest - 1).bit_length()))
    return PatchHeader(FLAG_MAC if authenticated else 0, h.block_shift, h.target_size, h.base_size,
                       h.target_identity, h.base_identity, window_log=window_log)


class Undo:
    """Owns the spool of one apply --undo: loading what an interrupted run left, deciding
    for each block the apply touches whether its base content must be recorded, is already
    recorded, or is lost (refused), and the final rename to UNDO.

    recording is False during the dry run: blocks are judged, nothing is written."""

    def __init__(self, path: str, h: PatchHeader, key: bytes | None, dest_name: str,
                 not_files: dict[tuple[int, int], str] | None = None):
        self.path = path
        if os.path.basename(path) in ("", ".", ".."):
            raise UsageError(f"{path}: is a folder; --undo names the file to write")
        folder, self.name = os.path.split(paths.absolute(path))
        self.spool = spool_name(self.name)
        self.spool_path = os.path.join(folder, self.spool)
        self.dest_name = dest_name
        self.not_files = not_files or {}  # (st_dev, st_ino) -> what the spool must not be
        self.h = h
        self.key = key
        self.uh = undo_header(h, key is not None)
        self.shift = h.block_shift
        self.per = pages_per_block(1 << h.block_shift)
        self.base_blocks = blocks_for(h.base_size, h.block_shift)
        with io_errors(f"{path}: cannot write the undo patch there"):
            self.dir_fd = paths.open_dir(folder)
        self.fd: int | None = None
        self.pos = 0  # bytes of the spool that hold valid elements
        self.mac: MacChain | None = None
        self.covered = RangeSet()  # blocks the spool holds
        self.end = 0  # end block of the spool's last record
        self.records = 0
        self.counts = {REC_DATA: 0, REC_ZERO: 0, REC_COPY: 0}
        self.payload_bytes = 0
        self.unsynced = 0
        self.recording = False
        # UNDO already is this patch's undo (a run stopped after the rename, or an apply
        # repeated): it holds the base content of every block the patch changes, so there
        # is nothing to record.
        self.complete = False
        self.done = RangeSet()  # blocks UNDO holds, when complete
        self.needs = False  # a block whose base content this run records
        self.gone_at: int | None = None  # first block already written and in no spool
        self._start: tuple[bool, int | None] = (False, None)
        self.kind = 0  # the record being built: kind, first block, hashes, data
        self.first = 0
        self.count = 0
        self.meta: list[bytes] = []
        self.data: list[bytes] = []
        self.cctx: object | None = None

    # -- loading -------------------------------------------------------------------------

    def load(self, dest_size: int) -> None:
        """Open the spool an interrupted run left, keep its valid records and cut the rest;
        find out whether UNDO already is this patch's undo."""
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            # Found only at the final rename, it would fail an update already written.
            raise UsageError(f"{self.path}: is a folder; --undo names the file to write")
        fd = sparse.open_side(self.dir_fd, self.spool, self.spool_path, "undo spool")
        if fd is not None:
            self.fd = fd
            self._check(fd)
            self._lock(fd)
            self._read_spool(fd)
        if not self.records and self._undo_done():
            self.complete = True
            return
        if self.h.target_size < self.h.base_size and dest_size < self.h.base_size and not self.pos:
            # Already cut short: the tail a shrink removes is gone with no spool holding it.
            # (A spool with a valid header was synced before the cut, records or none.)
            self._gone(blocks_for(self.h.target_size, self.shift))
        self._start = (self.needs, self.gone_at)

    def _check(self, fd: int) -> None:
        st = os.fstat(fd)
        what = self.not_files.get((st.st_dev, st.st_ino))
        if what is not None:
            # Its torn tail would be cut: a file with no valid prefix would be emptied.
            raise UsageError(f"{self.spool_path}: is {what}; the undo spool must be another "
                             "file: name another UNDO")
        why = sparse.not_ours(fd, frozenset({os.geteuid()}))
        if why is not None:
            raise IOFailure(f"{self.spool_path}: refusing the undo spool: {why}")

    def _lock(self, fd: int) -> None:
        """Another apply writing the same UNDO (for another copy of the image) would cut
        what this one has not synced yet and write its records over this one's."""
        try:
            taken = sparse.lock_whole(fd)
        except OSError:
            return  # no locks there (ENOLCK): the guard is against a mistake, not an attack
        if not taken:
            raise Locked(f"{self.spool_path}: another apply is writing this undo spool; "
                         "wait for it, or name another UNDO")

    def _read_spool(self, fd: int) -> None:
        """Keep the longest valid prefix: header, then whole records, each checked (CRC, MAC,
        payload against the base hash). A torn tail is what a kill leaves; it is cut."""
        head_len = PATCH_HEADER.size + CRC.size
        head = os.pread(fd, head_len, 0)
        try:
            found = decode_patch_header(head) if len(head) == head_len else None
        except FormatError:
            found = None  # torn while first written: nothing after it was durable either
        if found is not None and found != self.uh:
            raise WrongBase(
                f"{self.spool_path}: an undo spool of another patch (or made with another key) "
                "is in the way; finish that apply, or remove it if its undo is not needed"
            )
        good, tag = 0, b""
        if found is not None:
            with os.fdopen(os.dup(fd), "rb") as f:
                try:
                    good, tag = self._records(f.read)
                except AuthenticationError:
                    if self._whole_tag(fd, head_len):
                        # A whole header Tag that this key does not make: the spool of the
                        # same update signed with another key. Its base content may be the
                        # only copy left: keep it.
                        raise WrongBase(
                            f"{self.spool_path}: an undo spool made with another key is in the "
                            "way; finish that apply with its key, or remove the spool if its "
                            "undo is not needed"
                        ) from None
                    good, tag = 0, b""  # its Tag torn while first written
        self.pos = good
        if good and self.key is not None:
            self.mac = MacChain(self.key)
            self.mac.tag = tag
        with io_errors(f"{self.spool_path}: cannot cut its torn tail"):
            sparse.set_size(fd, good)

    def _records(self, read: Callable[[int], bytes]) -> tuple[int, bytes]:
        """Walk the spool's records; returns the byte length of its valid prefix and the
        MAC chain's last tag there."""
        try:
            reader = PatchReader(read, self.spool_path, self.key)
        except AuthenticationError:
            raise  # torn, or another key's: _read_spool tells which
        except SparsePatchError:
            return 0, b""
        good = reader.r.pos
        tag = reader.mac.tag if reader.mac else b""
        frames = FrameDecoder(self.uh)
        try:
            for rec in reader.records():
                if rec.kind in (REC_COPY, REC_STAGE) or rec.payload and rec.flags != FRAME_START | FRAME_END:
                    break  # not what an undo writes: a frame across records would be cut apart
                if rec.kind == REC_DATA:
                    decode_data(frames, rec)
                good = reader.r.pos
                tag = reader.mac.tag if reader.mac else b""
                self._count(rec)
        except SparsePatchError:
            pass
        return good, tag

    @staticmethod
    def _whole_tag(fd: int, at: int) -> bool:
        """Whether the header's Tag is all there: not short and not the zeros a write that
        never reached the disk leaves."""
        tag = os.pread(fd, MAC_LEN, at)
        return len(tag) == MAC_LEN and any(tag)

    def _count(self, rec: Record) -> None:
        self.records += 1
        self.counts[rec.kind] += rec.count
        self.payload_bytes += len(rec.payload)
        self.covered.add(rec.first_block, rec.first_block + rec.count)
        self.end = rec.first_block + rec.count

    def _undo_done(self) -> bool:
        """Whether UNDO exists and is a whole, valid undo of this patch (a run that was
        stopped after renaming it, or an apply repeated). Its header is public (the patch
        holds the sizes and identities), so one that another user put there, in a shared
        folder, proves nothing: only a file of the user running apply counts, and see()
        still requires it to hold every block the patch touches."""
        try:
            fd = sparse.open_at(self.dir_fd, self.name, os.O_RDONLY)
        except OSError:
            return False
        try:
            with os.fdopen(fd, "rb") as f:
                if sparse.not_ours(f.fileno(), frozenset({os.geteuid()}), one_link=False) is not None:
                    # Only read: a backup link is fine.
                    return False
                reader = PatchReader(f.read, self.path, self.key, unauthenticated_ok=self.key is None)
                if reader.header != self.uh:
                    return False
                done = RangeSet()
                for rec in reader.records():
                    done.add(rec.first_block, rec.first_block + rec.count)
                self.done = done
                return True
        except (OSError, SparsePatchError):
            return False

    # -- judging blocks ------------------------------------------------------------------

    def begin_run(self) -> None:
        """After the dry run, which judged every block the same way: start recording."""
        self.needs, self.gone_at = self._start
        self.checked()
        self.recording = True

    def see(self, block: int, base: bytes, target: bytes, cur: bytes, buf: bytearray) -> None:
        """A block the apply touches, its patch hashes and its current content: record its
        base content if it is still the base; else it must be recorded already."""
        if block >= self.base_blocks or self.covered.meets(block, block + 1):
            return  # past the base's end (the undo truncates it) or already in the spool
        if self.complete:
            if self.done.meets(block, block + 1):
                return
            raise WrongBase(
                f"{self.path}: is an undo of this patch but holds no base content for the "
                f"block at byte {block << self.shift}, which the patch changes: it cannot "
                "lead back to the base; remove it or name another UNDO"
            )
        if cur != base:
            self._gone(block)
            return
        if self.gone_at is not None and self.recording:
            raise self._lost(self.gone_at)
        self.needs = True
        if self.recording:
            self._add(block, target, base, buf)

    def _gone(self, block: int) -> None:
        if self.gone_at is None:
            self.gone_at = block
        if self.recording:
            raise self._lost(block)

    def checked(self) -> None:
        """After the dry run: refuse now, before anything is written, if the undo cannot
        lead back to the base."""
        if self.gone_at is None:
            return
        if not self.needs:
            raise UsageError(f"{self.dest_name} already is the patch's target: there is nothing "
                             "to undo (apply without --undo)")
        raise self._lost(self.gone_at)

    def _lost(self, block: int) -> WrongBase:
        return WrongBase(
            f"{self.dest_name}: block at byte {block << self.shift} was already written by an "
            f"earlier apply and no undo spool ({self.spool_path}) holds its base content: "
            "an undo cannot lead back to the base; apply without --undo"
        )

    # -- writing -------------------------------------------------------------------------

    def _add(self, block: int, ubase: bytes, utarget: bytes, buf: bytes | bytearray) -> None:
        kind = REC_ZERO if utarget == ZERO_HASH else REC_DATA
        limit = data_record_max_blocks(self.shift) if kind == REC_DATA else MAX_RECORD_BLOCKS
        if self.count and (kind != self.kind or block != self.first + self.count or self.count >= limit):
            self._close()
        if not self.count:
            self.kind, self.first = kind, block
        self.count += 1
        if kind == REC_ZERO:
            self.meta.append(ubase)
        else:
            # The base content as literal pages, its zero pages (and so every page past the
            # base's end) as ZERO pages.
            kinds = bytearray(self.per)
            view = memoryview(buf)
            for p in range(self.per):
                page = view[p << PAGE_SHIFT : (p + 1) << PAGE_SHIFT]
                if page == ZERO_PAGE:
                    kinds[p] = PAGE_ZERO
                else:
                    self.data.append(bytes(page))
                    self.unsynced += PAGE_SIZE
            self.meta.append(ubase + utarget + bytes(kinds))

    def _close(self) -> None:
        """Write the record being built to the spool."""
        if not self.count:
            return
        payload = b""
        flags = 0
        if self.kind == REC_DATA:
            raw = b"".join(self.data)
            if raw:
                # A frame per record: the spool's torn tail is cut at any record boundary,
                # and what is left must still be whole frames.
                payload = self._compress(raw)
                flags = FRAME_START | FRAME_END
        rec = Record(self.kind, self.first, self.count, b"".join(self.meta), 0, payload,
                     flags=flags, pages=self.per)
        self._emit(encode_record(rec))
        self._count(rec)
        self.count = 0
        self.meta, self.data = [], []

    def _compress(self, raw: bytes) -> bytes:
        import zstandard

        if self.cctx is None:
            self.cctx = zstandard.ZstdCompressor(level=UNDO_LEVEL, write_checksum=True,
                                                 write_content_size=True)
        assert isinstance(self.cctx, zstandard.ZstdCompressor)
        out: bytes = self.cctx.compress(raw)
        return out

    def _emit(self, element: bytes) -> None:
        """Append one element of the undo patch, and its tag when authenticating."""
        if self.fd is None or self.pos == 0:
            self._create()
        self._write(element)
        if self.key is not None:
            assert self.mac is not None
            self._write(self.mac.next(element))

    def _write(self, data: bytes) -> None:
        assert self.fd is not None
        try:
            sparse.pwrite_full(self.fd, data, self.pos)
        except OSError as e:
            raise io_failure(e, f"{self.spool_path}: cannot write the undo spool") from None
        self.pos += len(data)
        self.unsynced += len(data)

    def _create(self) -> None:
        """The spool with the undo's header, its name durable in the folder."""
        if self.fd is None:
            self.fd = sparse.create_side(self.dir_fd, self.spool, self.spool_path, "undo spool")
            self._lock(self.fd)
            with io_errors(f"{self.spool_path}: cannot sync its folder"):
                sparse.sync_dir(self.dir_fd)
        self.mac = MacChain(self.key) if self.key is not None else None
        head = encode_patch_header(self.uh)
        self._write(head)
        if self.mac is not None:
            self._write(self.mac.next(head))

    def sync(self) -> None:
        """Make every record so far durable: called before the writes they cover."""
        self._close()
        if self.fd is None or not self.unsynced:
            return
        with io_errors(f"{self.spool_path}: cannot sync the undo spool"):
            sparse.sync(self.fd)
        self.unsynced = 0

    def tail(self, read: Callable[[int], bytearray],
             data_extents: Callable[[int, int], list[tuple[int, int]]], size: int) -> None:
        """Before a shrink's truncate (size: the destination's size now): record the base
        blocks past the target's end that hold data. Zero blocks need nothing: the undo's
        final size brings them back as holes."""
        if not self.recording or self.complete or self.h.target_size >= self.h.base_size:
            return
        if size < self.h.base_size:
            return  # truncated by the interrupted run, after its spool held the tail
        first = max(blocks_for(self.h.target_size, self.shift), self.end)
        zero = bytes(1 << self.shift)
        for a, b in data_extents(first << self.shift, self.h.base_size):
            # Extents end at pages, not blocks: two of them may share a block.
            start, first = max(first, a >> self.shift), max(first, blocks_for(b, self.shift))
            for block in range(start, min(first, self.base_blocks)):
                buf = read(block)
                if buf != zero:
                    self._add(block, ZERO_HASH, hash_block(buf, 1 << self.shift), buf)
                    if self.unsynced >= SYNC_BATCH:
                        self._close()
        if self.fd is None or self.pos == 0:
            # Even with nothing to record, the spool must exist before the cut: a rerun after
            # it finds the destination short and can tell "recorded" from "lost" only by it.
            self._create()

    def finish(self) -> None:
        """Trailer, sync, rename to UNDO. When UNDO already was this patch's undo (a rerun
        after the rename), there is nothing to write."""
        if self.complete:
            self._drop_spool()
            return
        self._close()
        if self.fd is None or self.pos == 0:
            self._create()
        t = PatchTrailer(self.records, self.counts[REC_DATA], self.counts[REC_ZERO], 0,
                         self.payload_bytes, self.pos)
        self._emit(encode_patch_trailer(t))
        self.sync()
        with io_errors(f"{self.path}: cannot rename the undo spool into place"):
            sparse.rename(self.spool, self.name, self.dir_fd)
            sparse.sync_dir(self.dir_fd)

    def _drop_spool(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with io_errors(f"{self.spool_path}: cannot remove the undo spool"):
            sparse.remove_side(self.dir_fd, self.spool, fd)

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd = None
        self.dir_fd = -1

