"""Command line: options, progress, one-line errors, exit codes and summaries.
Never touches file contents: everything goes through api."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from . import __version__, api
from .errors import KeyRequired, SparsePatchError

EXIT_CODES = """\b
Exit codes: 0 success, 1 other error, 2 usage, 3 I/O (missing file, no space,
permission), 4 corrupt, truncated, unauthenticated or unsupported input, 5 wrong
base (the destination is not what the signature saw), 6 source changed while
being read, 7 destination locked or in use (another apply, a program's lock, a
loop device, a mount), 8 verify found a difference."""

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class SizeType(click.ParamType):
    """Sizes like 64K, 4M, 4G, 65536 (binary units)."""

    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", str(value).lower())
        if not m:
            self.fail(f"{value!r} is not a size like 64K, 4M, 4G or 65536", param, ctx)
        return int(m.group(1)) * _UNITS[m.group(2)]


class SplitSizeType(SizeType):
    """A size, or fat32: the largest file FAT32 holds (4 GiB - 1 byte)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, str) and value.strip().lower() == "fat32":
            return api.FAT_MAX_FILE
        return super().convert(value, param, ctx)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup
    runs: the output's temporary removed, the worker process stopped."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: Any) -> None:
    # Once is enough: a second signal must not cut the cleanup of the first short.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def _catch_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(sig, _terminate)


def _guard_std_fds() -> None:
    """Started with stdin, stdout or stderr closed (`<&-`): put /dev/null on the number,
    so that no file opened later takes it and receives what was meant for the stream.
    sys.stdin (or stdout) stays None, which files reports as a closed stream."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd, inheritable=False)
                os.close(null)


def _echo_out(text: str, nl: bool = True) -> None:
    """Text for stdout, which must be open to take it."""
    if sys.stdout is None:
        click.echo("sparsepatch: error: standard output is closed", err=True)
        sys.exit(3)
    click.echo(text, nl=nl)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Bytes done of total on stderr: a redrawn bar on a terminal, or one line every
    few seconds for logs. Total is data-extent bytes (or patch bytes), not apparent size."""

    def __init__(self, label: str, total: int | None, mode: str):
        self.label, self.total, self.mode = label, total, mode
        self.done = 0
        self.start = self.last = time.monotonic()
        self.every = 0.2 if mode == "bar" else 10.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-6)
        text = f"{self.label}: {human(self.done)}"
        bar = ""
        if self.total:
            frac = min(self.done / self.total, 1.0)
            left = (self.total - self.done) / rate if rate > 0 else 0
            text += f" of {human(self.total)} ({frac:.0%}), {human(rate)}/s, {_clock(left)} left"
            width = 24
            bar = "[" + "#" * int(frac * width) + "." * (width - int(frac * width)) + "] "
        else:
            text += f", {human(rate)}/s"
        if self.mode == "bar":
            click.echo(f"\r{bar}{text}\x1b[K", err=True, nl=False)
        else:
            click.echo(text, err=True)

    def close(self) -> None:
        if self.mode == "bar" and self.done:
            click.echo("\r\x1b[K", err=True, nl=False)


def _progress(label: str, total: Callable[[], int | None], mode: str, quiet: bool) -> Progress | None:
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "none"
    if quiet or mode == "none":
        return None
    try:
        size = total()
    except SparsePatchError:
        size = None  # the command itself will report the problem
    return Progress(label, size, mode)


def _run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    prog = kwargs.get("progress")
    try:
        return fn(*args, **kwargs)
    except SparsePatchError as e:
        if prog:
            prog.close()
            prog = None
        hint = "; pass --key-file, or --no-auth to apply it unchecked" if isinstance(e, KeyRequired) else ""
        click.echo(f"sparsepatch: error: {e}{hint}", err=True)
        sys.exit(e.exit_code)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): nothing more to say, like other filters.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except Terminated as e:
        click.echo(f"\nsparsepatch: terminated by {signal.Signals(e.signum).name}", err=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        click.echo("\nsparsepatch: interrupted", err=True)
        sys.exit(130)
    finally:
        if prog:
            prog.close()


def _refuse_tty(output: str | None) -> None:
    if (output is None or output == "-") and sys.stdout is not None and sys.stdout.isatty():
        click.echo("sparsepatch: error: refusing to write binary output to a terminal; "
                   "use -o FILE or a pipe", err=True)
        sys.exit(2)


def _stats_target(as_json: bool, stats: str | None, stdout_busy: bool) -> str | None:
    if as_json and stats:
        raise click.UsageError("use either --json or --stats FILE")
    if as_json:
        if sys.stdout is None:
            click.echo("sparsepatch: error: standard output is closed", err=True)
            sys.exit(3)
        if stdout_busy:
            raise click.UsageError("stdout carries data here: use --stats FILE (or -o)")
        return "-"
    return stats


def _finish(command: str, result: Any, seconds: float, summary: str, quiet: bool,
            stats_to: str | None, sources: list[str | None]) -> None:
    """Print the summary, and write the stats (no more readable than sources) if asked."""
    if not quiet:
        click.echo(f"{summary}, {seconds:.1f} s", err=True)
    if stats_to:
        is_stats = dataclasses.is_dataclass(result) and not isinstance(result, type)
        d = dataclasses.asdict(result) if is_stats else dict(result or {})
        d = {"command": command, **d, "seconds": round(seconds, 3)}
        import json  # only --json and --stats need it

        text = json.dumps(d, indent=2, sort_keys=True) + "\n"
        if stats_to == "-":
            _echo_out(text, nl=False)
        else:
            _run(api.write_file, stats_to, text.encode(), sources)


class _Group(click.Group):
    """Usage errors as one line, like every other error, instead of click's three."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        _guard_std_fds()
        _catch_signals()
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            click.echo(f"sparsepatch: error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"sparsepatch: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except Terminated as e:
            click.echo(f"sparsepatch: terminated by {signal.Signals(e.signum).name}", err=True)
            sys.exit(128 + e.signum)
        except (click.Abort, KeyboardInterrupt):
            click.echo("sparsepatch: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="sparsepatch")
def main() -> None:
    """Keep huge sparse files in sync with small, safe, offline patches.

    \b
    On the destination host, with a link to the source host:
      sparsepatch signature img | ssh src sparsepatch diff - img | sparsepatch apply - img
    Offline (USB stick):
      dest$ sparsepatch signature img -o /media/usb/img.sig
      src$  sparsepatch diff /media/usb/img.sig img -o /media/usb/img.patch
      dest$ sparsepatch apply /media/usb/img.patch img
    First copy:
      src$  sparsepatch diff --full img -o first.patch
      dest$ sparsepatch apply first.patch img

    Shell completion (bash): eval "$(_SPARSEPATCH_COMPLETE=bash_source sparsepatch)"
    """


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--stats", metavar="FILE", help="Write JSON stats to FILE.")(fn)
    fn = click.option("--json", "as_json", is_flag=True,
                      help="Print JSON stats on stdout (when stdout carries no data).")(fn)
    fn = click.option("--progress", type=click.Choice(["auto", "bar", "lines", "none"]),
                      default="auto", show_default=True,
                      help="Progress on stderr: a bar on a terminal, lines for logs.")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress and no summary.")(fn)
    return fn


_output = click.option("-o", "--output", metavar="FILE",
                       help="Write here (atomically: renamed when complete) instead of stdout.")


_jobs = click.option("-j", "--jobs", type=click.IntRange(1, 4096), metavar="N",
                     help="Processes that read and hash (default: one per CPU this process may "
                          "use, its affinity and cgroup quota respected). The output is the "
                          "same for any N.")


def _source_check(content: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--source-check", type=click.Choice(["mtime", "content"]), default="mtime",
        show_default=True,
        help="How a file that changes while it is read is noticed (exit 6): mtime compares "
             f"its mtime, ctime and size before and after; content {content}")


def _warn(message: str) -> None:
    click.echo(f"sparsepatch: warning: {message}", err=True)


@main.command(epilog=EXIT_CODES)
@click.argument("dest", metavar="DEST")
@_output
@_jobs
@click.option("-b", "--block-size", type=SizeType(), default=str(api.DEFAULT_BLOCK_SIZE),
              show_default="16K", help="Block size, a power of two from 4K to 16M.")
@_source_check("compares only its size (for a file whose mtime is always new, such as a FUSE "
               "export; a change in place then goes unseen here, and apply refuses the "
               "blocks it touches that changed).")
@_common
def signature(dest: str, output: str | None, jobs: int | None, block_size: int, source_check: str,
              quiet: bool,
              progress: str, as_json: bool, stats: str | None) -> None:
    """Write the signature (block hashes and hole map) of DEST ('-': stdin).

    \b
    Examples:
      sparsepatch signature /var/lib/libvirt/images/vm.img -o vm.sig
      sparsepatch signature /dev/vg0/vm | ssh src sparsepatch diff - vm.img > vm.patch
    """
    stats_to = _stats_target(as_json, stats, output in (None, "-"))
    _run(api.refuse_stats_over, stats_to, [output], [dest])
    _refuse_tty(output)
    prog = _progress("signature", lambda: api.data_size(dest), progress, quiet)
    t = time.monotonic()
    s = _run(api.signature, dest, output, block_size, progress=prog, source_check=source_check,
             warn=_warn, jobs=jobs)
    _finish("signature", s, time.monotonic() - t,
            f"signature: {human(s.file_size)} apparent, {human(s.bytes_read)} read, "
            f"{s.data_blocks:,} data blocks, signature {human(s.signature_bytes)}", quiet, stats_to,
            [dest])


@main.command(epilog=EXIT_CODES)
@click.argument("args", nargs=-1, metavar="SIG SOURCE | --full SOURCE")
@_jobs
@_output
@click.option("--full", is_flag=True, help="No signature: a patch that creates the whole file.")
@click.option("-b", "--block-size", type=SizeType(), default=str(api.DEFAULT_BLOCK_SIZE),
              show_default="16K", help="Block size for --full (otherwise the signature's).")
@click.option("-l", "--level", type=click.IntRange(1, 19), default=3, show_default=True,
              help="zstd compression level.")
@click.option("--window-log", type=click.IntRange(10, 27), default=27, show_default=True,
              metavar="N", help="zstd window of at most 2^N bytes: the memory diff's compressor "
              "(about 1.2 x 2^N) and apply's decoder (2^N) take. 27: 128 MiB.")
@click.option("-k", "--key-file", metavar="KEY",
              help="Authenticate the patch with a keyed MAC derived from this file's bytes.")
@click.option("--split", type=SplitSizeType(), metavar="SIZE",
              help="With -o: write FILE.000, FILE.001, ... of at most SIZE each "
                   "(fat32: 4 GiB - 1 byte, the largest file FAT32 holds).")
@click.option("--since", metavar="SNAPSHOT",
              help="A reflink copy of the state SIG describes (XFS, btrfs): read only what "
                   "changed since, from the extent maps. You vouch that it matches SIG.")
@click.option("--next-signature", "next_signature", metavar="FILE",
              help="Also write the signature the destination will have once the patch is "
                   "applied: the next diff starts from it, with nothing sent back.")
@_source_check("compares its size, and hashes the blocks the patch carries again in the second "
               "reading against the first (for a source whose mtime is always new, such "
               "as a FUSE export).")
@_common
def diff(args: tuple[str, ...], jobs: int | None, output: str | None, full: bool, block_size: int,
         level: int, window_log: int, key_file: str | None, split: int | None, since: str | None,
         next_signature: str | None, source_check: str, quiet: bool, progress: str, as_json: bool,
         stats: str | None) -> None:
    """Write a patch that turns the file SIG describes into SOURCE ('-': stdin).

    \b
    Examples:
      sparsepatch diff vm.sig vm.img -o vm.patch
      sparsepatch diff --full vm.img -o /media/usb/vm.patch --split fat32
      sparsepatch diff -k secret.key vm.sig vm.img -o vm.patch
      sparsepatch diff --source-check content vm.sig /mnt/fuse/vm.img -o vm.patch
      sparsepatch diff vm.sig vm.img -o vm.patch --next-signature vm.sig.next
      sparsepatch diff --since vm.snap vm.sig vm.img -o vm.patch
    """
    want = 1 if full else 2
    if len(args) != want:
        raise click.UsageError("expected --full SOURCE" if full else "expected SIG SOURCE")
    if split is not None and split < 4096:
        raise click.UsageError("--split SIZE must be at least 4K")
    stats_to = _stats_target(as_json, stats, output in (None, "-"))
    _run(api.refuse_stats_over, stats_to, [output, next_signature], [*args, key_file, since],
         output if split else None)
    _refuse_tty(output)
    prog = _progress("diff", lambda: api.data_size(args[-1]), progress, quiet)
    t = time.monotonic()
    sig = None if full else args[0]
    s = _run(api.diff, sig, args[-1], output, full=full, block_size=block_size, level=level,
             key_file=key_file, split=split, progress=prog, source_check=source_check,
             warn=_warn, next_signature=next_signature, since=since, jobs=jobs,
             window_log=window_log)
    changed = s.data_blocks + s.zero_blocks + s.copy_blocks
    _finish("diff", s, time.monotonic() - t,
            f"diff: {human(s.target_size)} apparent, {human(s.bytes_read)} read, "
            f"{changed:,} blocks changed ({s.data_blocks:,} data, {s.zero_blocks:,} zero, "
            f"{s.copy_blocks:,} copy){f', {s.moved_pages:,} pages moved' if s.moved_pages else ''}, "
            f"patch {human(s.patch_bytes)}", quiet, stats_to, [*args, since])


@main.command(epilog=EXIT_CODES)
@click.argument("args", nargs=-1, required=True, metavar="PATCH... DEST")
@click.option("--verify", is_flag=True, help="Re-hash the result and compare it with the target.")
@click.option("-k", "--key-file", metavar="KEY",
              help="Require and check the patch's MAC with the key derived from this file.")
@click.option("--no-auth", is_flag=True,
              help="Apply an authenticated patch without checking its MAC (not recommended).")
@click.option("--journal", metavar="FILE",
              help="Where the resume journal lives (default: beside DEST; for a device, in "
                   "/var/lib/sparsepatch when root).")
@click.option("--discard", is_flag=True,
              help="Block devices: BLKDISCARD zero ranges (kept only where they read back as zeros).")
@click.option("--allow-in-use", is_flag=True,
              help="Apply to a file that backs a loop device or that another program (qemu) "
                   "holds a lock on. Another apply is still refused.")
@click.option("--undo", metavar="UNDO",
              help="Also write UNDO, a patch from the target back to the destination as it "
                   "was (authenticated with -k's key too); applying it rolls the update back.")
@click.option("--scratch", metavar="DIR",
              help="Folder for the base pages a patch with moved content copies aside before "
                   "it writes (default: beside DEST; for a device, in /var/lib/sparsepatch "
                   "when root).")
@_common
def apply(args: tuple[str, ...], verify: bool, key_file: str | None, no_auth: bool,
          journal: str | None, discard: bool, allow_in_use: bool, undo: str | None,
          scratch: str | None, quiet: bool, progress: str, as_json: bool,
          stats: str | None) -> None:
    """Apply PATCH ('-': stdin) to DEST in place, sparsely; safe to repeat or resume.

    Give the pieces of a split patch in order (or just PATCH.000: the rest are found).

    \b
    Examples:
      sparsepatch apply vm.patch /var/lib/libvirt/images/vm.img --verify
      sparsepatch apply /media/usb/vm.patch.000 vm.img
      cat /media/usb/vm.patch.* | sparsepatch apply - vm.img
      sparsepatch apply vm.patch vm.img --undo vm.undo   # later: apply vm.undo vm.img
    """
    if len(args) < 2:
        raise click.UsageError("expected PATCH... DEST")
    patches, dest = list(args[:-1]), args[-1]
    stats_to = _stats_target(as_json, stats, False)
    pieces = _run(api.patch_pieces, patches)
    _run(api.refuse_stats_over, stats_to, [undo, journal], [*pieces, dest, key_file])
    total = lambda: sum(api.input_size(p) or 0 for p in pieces) or None  # noqa: E731
    prog = _progress("apply", total, progress, quiet)
    t = time.monotonic()
    s = _run(api.apply, patches, dest, verify, key_file=key_file, unauthenticated_ok=no_auth,
             journal=journal, discard=discard, allow_in_use=allow_in_use, progress=prog, undo=undo,
             scratch=scratch, warn=lambda m: click.echo(f"sparsepatch: warning: {m}", err=True))
    _finish("apply", s, time.monotonic() - t,
            f"apply: {s.blocks_written:,} blocks written, {s.blocks_punched:,} punched, "
            f"{s.blocks_copied:,} copied, {s.blocks_skipped:,} already current, "
            f"{human(s.bytes_written)} written"
            f"{f', {s.moved_pages:,} pages moved' if s.moved_pages else ''}"
            f"{f', {human(s.scratch_bytes)} staged' if s.scratch_bytes else ''}"
            f"{', resumed' if s.resumed else ''}"
            f"{', verified' if verify else ''}", quiet, stats_to, [*pieces, dest])


@main.command(epilog=EXIT_CODES)
@click.argument("patches", nargs=-1, required=True, metavar="PATCH1 PATCH2 [PATCH...]")
@_output
@click.option("-l", "--level", type=click.IntRange(1, 19), default=3, show_default=True,
              help="zstd level of the merged patch's literal.")
@click.option("--window-log", type=click.IntRange(10, 27), default=27, show_default=True,
              help="Largest compression window, 2^N bytes: what apply's decoder needs.")
@click.option("-k", "--key-file", metavar="KEY",
              help="Check every patch's MAC with this key, and authenticate the merged patch.")
@click.option("--no-auth", is_flag=True,
              help="Read authenticated patches without checking their MAC (the output is not "
                   "authenticated).")
@click.option("--split", type=SplitSizeType(), metavar="SIZE",
              help="Write pieces of at most SIZE bytes (-o FILE.000, .001, ...), as diff does.")
@_common
def merge(patches: tuple[str, ...], output: str | None, level: int, window_log: int,
          key_file: str | None, no_auth: bool, split: int | None, quiet: bool, progress: str,
          as_json: bool, stats: str | None) -> None:
    """Merge a chain of patches into one: from the first one's base to the last one's target.

    Each patch must start where the one before it leads (apply them in this order); the
    merged patch applies like the chain, from the patches alone. Give a split patch by its
    .000.

    \b
    Examples:
      sparsepatch merge mon.patch tue.patch wed.patch -o mon-wed.patch
      sparsepatch merge -k secret.key a.patch b.patch -o ab.patch --split fat32
    """
    if len(patches) < 2:
        raise click.UsageError("expected at least two patches")
    if split is not None and split < 4096:
        raise click.UsageError("--split SIZE must be at least 4K")
    stats_to = _stats_target(as_json, stats, output in (None, "-"))
    _run(api.refuse_stats_over, stats_to, [output], [*patches, key_file], output if split else None)
    _refuse_tty(output)
    pieces = [p for patch in patches for p in _run(api.patch_pieces, [patch])]
    total = lambda: sum(api.input_size(p) or 0 for p in pieces) or None  # noqa: E731
    prog = _progress("merge", total, progress, quiet)
    t = time.monotonic()
    s = _run(api.merge, list(patches), output, key_file=key_file, unauthenticated_ok=no_auth,
             split=split, level=level, window_log=window_log, progress=prog)
    changed = s.data_blocks + s.zero_blocks + s.copy_blocks
    _finish("merge", s, time.monotonic() - t,
            f"merge: {s.patches} patches of {human(s.input_bytes)}, {changed:,} blocks changed "
            f"({s.data_blocks:,} data, {s.zero_blocks:,} zero, {s.copy_blocks:,} copy)"
            f"{f', {s.moved_pages:,} pages moved' if s.moved_pages else ''}, "
            f"patch {human(s.patch_bytes)}", quiet, stats_to, list(patches))


@main.command(epilog=EXIT_CODES)
@click.argument("args", nargs=-1, metavar="PATCH... | --against SIG_OR_PATCH FILE")
@click.option("--against", metavar="SIG_OR_PATCH",
              help="Check FILE against a signature (block by block) or a patch's target.")
@click.option("-k", "--key-file", metavar="KEY", help="Also check the patch's MAC with this key.")
@_common
def verify(args: tuple[str, ...], against: str | None, key_file: str | None, quiet: bool,
           progress: str, as_json: bool, stats: str | None) -> None:
    """Check a patch end to end without a destination, or a file against a signature
    or a patch's target. Exit 0 when good; otherwise the first difference (exit 8).

    Give the pieces of a split patch in order (or just PATCH.000: the rest are found).

    \b
    Examples:
      sparsepatch verify vm.patch
      sparsepatch verify /media/usb/vm.patch.000
      sparsepatch verify --against vm.sig /var/lib/libvirt/images/vm.img
      sparsepatch verify --against vm.patch /var/lib/libvirt/images/vm.img
    """
    if not args or (against is not None and len(args) != 1):
        raise click.UsageError("expected PATCH..., or --against SIG_OR_PATCH FILE")
    stats_to = _stats_target(as_json, stats, False)
    _run(api.refuse_stats_over, stats_to, [], [*args, against, key_file])
    t = time.monotonic()
    s = _run(api.verify, args[0] if against else list(args), against, key_file)
    if s is None:
        _finish("verify", {"file": args[0], "against": against, "match": True},
                time.monotonic() - t, f"verify: {args[0]} matches {against}", quiet, stats_to,
                [*args, against])
        return
    auth = "MAC checked" if s.authenticated else "no MAC checked"
    _finish("verify", s, time.monotonic() - t,
            f"verify: {args[0]} is intact: {s.records:,} records, {human(s.data_bytes)} of data, "
            f"{_checked(s.base_blocks)}, {auth}", quiet, stats_to, [*args, against])


def _checked(base_blocks: int) -> str:
    if not base_blocks:
        return "every block hash checked"
    # Not "every": a block made with the base's pages is checked only where the base is.
    return (f"every block hash checked but {base_blocks:,} made with the base's pages "
            "(apply checks those)")


@main.command(epilog=EXIT_CODES)
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(files: tuple[str, ...], as_json: bool) -> None:
    """Show what a signature or patch holds (and check its framing whole).

    Give the pieces of a split patch in order (or just PATCH.000: the rest are found).

    \b
    Examples:
      sparsepatch info vm.patch
      sparsepatch info vm.sig --json
      sparsepatch info /media/usb/vm.patch.000
    """
    d = _run(api.info, list(files))
    if as_json:
        import json

        _echo_out(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b:,}" for a, b in v.items())
        elif isinstance(v, int) and not isinstance(v, bool) and k != "version":
            v = f"{v:,}" + (f" ({human(v)})" if k.endswith(("size", "bytes")) else "")
        _echo_out(f"{k.replace('_', ' ')}: {v}")


if __name__ == "__main__":
    main()
