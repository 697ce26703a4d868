"""Command line: options, one-line errors, exit codes and summaries. Never touches bytes."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import click

from . import __version__, api
from .errors import SparsePatchError

EXIT_CODES = """\b
Exit codes: 0 success, 1 other error, 2 usage, 3 I/O (missing file, no space),
4 corrupt or unsupported input, 5 wrong base (destination is not what the
signature saw), 6 source changed while reading, 7 destination locked,
8 verify found a difference."""

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 64K, 1M or 65536")
    return int(m.group(1)) * _UNITS[m.group(2)]


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return _size(value)
        except click.BadParameter as e:
            self.fail(str(e), param, ctx)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except SparsePatchError as e:
        click.echo(f"sparsepatch: error: {e}", err=True)
        sys.exit(e.exit_code)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): nothing more to say, like other filters.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("sparsepatch: interrupted", err=True)
        sys.exit(130)


def _refuse_tty(output: str | None) -> None:
    if (output is None or output == "-") and sys.stdout.isatty():
        click.echo("sparsepatch: error: refusing to write binary output to a terminal; "
                   "use -o FILE or a pipe", err=True)
        sys.exit(2)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        click.echo(text, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="sparsepatch")
def main() -> None:
    """Keep huge sparse files in sync with small, safe, offline patches.

    \b
    On the destination host, with a link:
      sparsepatch signature img | ssh src sparsepatch diff - img | sparsepatch apply - img
    Offline (USB stick):
      dest$ sparsepatch signature img -o /media/usb/img.sig
      src$  sparsepatch diff /media/usb/img.sig img -o /media/usb/img.patch
      dest$ sparsepatch apply /media/usb/img.patch img
    """


_quiet = click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
_output = click.option("-o", "--output", metavar="FILE",
                       help="Write here (atomically: renamed when complete) instead of stdout.")


@main.command(epilog=EXIT_CODES)
@click.argument("dest", metavar="DEST")
@_output
@click.option("-b", "--block-size", type=SizeType(), default=str(api.DEFAULT_BLOCK_SIZE),
              show_default="64K", help="Block size, a power of two from 4K to 16M.")
@_quiet
def signature(dest: str, output: str | None, block_size: int, quiet: bool) -> None:
    """Write the signature (block hashes and hole map) of DEST ('-': stdin).

    \b
    Example: sparsepatch signature /var/lib/libvirt/images/vm.img -o vm.sig
    """
    _refuse_tty(output)
    t = time.monotonic()
    s = _run(api.signature, dest, output, block_size)
    _say(quiet, f"signature: {human(s.file_size)} apparent, {human(s.bytes_read)} read, "
                f"{s.data_blocks:,} data blocks, signature {human(s.signature_bytes)}, "
                f"{time.monotonic() - t:.1f} s")


@main.command(epilog=EXIT_CODES)
@click.argument("args", nargs=-1, metavar="SIG SOURCE | --full SOURCE")
@_output
@click.option("--full", is_flag=True, help="No signature: a patch that creates the whole file.")
@click.option("-b", "--block-size", type=SizeType(), default=str(api.DEFAULT_BLOCK_SIZE),
              show_default="64K", help="Block size for --full (otherwise the signature's).")
@click.option("-l", "--level", type=click.IntRange(1, 19), default=3, show_default=True,
              help="zstd compression level.")
@click.option("-k", "--key-file", metavar="KEY",
              help="Authenticate the patch with a keyed MAC derived from this file's bytes.")
@_quiet
def diff(args: tuple[str, ...], output: str | None, full: bool, block_size: int, level: int,
         key_file: str | None, quiet: bool) -> None:
    """Write a patch that turns the file SIG describes into SOURCE.

    \b
    Examples:
      sparsepatch diff vm.sig vm.img -o vm.patch
      sparsepatch diff --full vm.img -o vm-first-copy.patch
    """
    want = 1 if full else 2
    if len(args) != want:
        raise click.UsageError("expected --full SOURCE" if full else "expected SIG SOURCE")
    _refuse_tty(output)
    t = time.monotonic()
    sig = None if full else args[0]
    s = _run(api.diff, sig, args[-1], output, full=full, block_size=block_size, level=level,
             key_file=key_file)
    _say(quiet, f"diff: {human(s.target_size)} apparent, {human(s.bytes_read)} read, "
                f"{s.data_blocks + s.zero_blocks + s.copy_blocks:,} blocks changed "
                f"({s.data_blocks:,} data, {s.zero_blocks:,} zero, {s.copy_blocks:,} copy), "
                f"patch {human(s.patch_bytes)}, {time.monotonic() - t:.1f} s")


@main.command(epilog=EXIT_CODES)
@click.argument("patch", metavar="PATCH")
@click.argument("dest", metavar="DEST")
@click.option("--verify", is_flag=True, help="Re-hash the result and compare it with the target.")
@click.option("-k", "--key-file", metavar="KEY",
              help="Require and check the patch's MAC with the key derived from this file.")
@click.option("--no-auth", is_flag=True,
              help="Apply an authenticated patch without checking its MAC (not recommended).")
@_quiet
def apply(patch: str, dest: str, verify: bool, key_file: str | None, no_auth: bool,
          quiet: bool) -> None:
    """Apply PATCH ('-': stdin) to DEST in place, sparsely; safe to repeat or resume.

    \b
    Example: sparsepatch apply vm.patch /var/lib/libvirt/images/vm.img --verify
    """
    t = time.monotonic()
    s = _run(api.apply, patch, dest, verify, key_file=key_file, unauthenticated_ok=no_auth,
             warn=lambda m: click.echo(f"sparsepatch: warning: {m}", err=True))
    _say(quiet, f"apply: {s.blocks_written:,} blocks written, {s.blocks_punched:,} punched, "
                f"{s.blocks_copied:,} copied, {s.blocks_skipped:,} already current, "
                f"{human(s.bytes_written)} written{', resumed' if s.resumed else ''}"
                f"{', verified' if verify else ''}, {time.monotonic() - t:.1f} s")


@main.command(epilog=EXIT_CODES)
@click.argument("args", nargs=-1, metavar="PATCH | --against SIG_OR_PATCH FILE")
@click.option("--against", metavar="SIG_OR_PATCH",
              help="Check FILE against a signature (block by block) or a patch's target.")
@click.option("-k", "--key-file", metavar="KEY", help="Also check the patch's MAC with this key.")
@_quiet
def verify(args: tuple[str, ...], against: str | None, key_file: str | None, quiet: bool) -> None:
    """Check a patch end to end without a destination, or a file against a signature
    or a patch's target. Exit 0 when good; otherwise the first difference.

    \b
    Examples:
      sparsepatch verify vm.patch
      sparsepatch verify --against vm.sig /var/lib/libvirt/images/vm.img
      sparsepatch verify --against vm.patch /var/lib/libvirt/images/vm.img
    """
    if len(args) != 1:
        raise click.UsageError("expected PATCH, or --against SIG_OR_PATCH FILE")
    s = _run(api.verify, args[0], against, key_file)
    if s is None:
        _say(quiet, f"verify: {args[0]} matches {against}")
    else:
        auth = "MAC checked" if s.authenticated else "no MAC checked"
        _say(quiet, f"verify: {args[0]} is intact: {s.records:,} records, "
                    f"{human(s.data_bytes)} of data, every block hash checked, {auth}")


@main.command(epilog=EXIT_CODES)
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(file: str, as_json: bool) -> None:
    """Show what a signature or patch holds (and check it whole)."""
    d = _run(api.info, file)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b:,}" for a, b in v.items())
        elif isinstance(v, int) and not isinstance(v, bool) and k != "version":
            v = f"{v:,}" + (f" ({human(v)})" if k.endswith(("size", "bytes")) else "")
        click.echo(f"{k.replace('_', ' ')}: {v}")


if __name__ == "__main__":
    main()
