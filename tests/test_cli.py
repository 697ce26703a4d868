"""The command line as an administrator meets it: help, version, progress, JSON stats,
quiet runs, split patches, terminals and shell completion."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import KiB, MiB, make_sparse, pattern, run_cli

import sparsepatch
from sparsepatch import cli
from sparsepatch.format import read_signature

BS = 64 * KiB
CLI = Path(sys.executable).parent / "sparsepatch"  # the console script pip installs
COMMANDS = ["signature", "diff", "apply", "merge", "verify", "info"]
EXIT_MEANINGS = ["0 success", "1 other error", "2 usage", "3 I/O", "4 corrupt", "5 wrong base",
                 "6 source changed", "7 destination locked", "8 verify found a difference"]


def words(b: bytes) -> str:
    """Text with every run of whitespace (line wrapping) made one space."""
    return " ".join(b.decode().split())


@pytest.fixture
def pair(tmp: Path) -> tuple[Path, Path]:
    """A destination and a source that differs from it in data, zeros and size of data."""
    dest = make_sparse(tmp / "dest.img", 8 * MiB, [(0, 4 * BS), (2 * MiB, 3 * BS), (6 * MiB, BS)])
    source = make_sparse(tmp / "source.img", 8 * MiB, [
        (0, pattern(4 * BS, 0)), (2 * MiB + BS, 5 * BS), (7 * MiB, BS + 999),
    ])
    return dest, source


# ---------------------------------------------------------------------------- version and help


def test_version() -> None:
    r = console("--version")
    assert r.stdout.decode().strip() == f"sparsepatch, version {sparsepatch.__version__}"
    assert sparsepatch.__version__ == importlib.metadata.version("sparsepatch")


def console(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the console script, as an administrator types it."""
    if not CLI.exists():
        pytest.skip(f"no console script at {CLI}: install the package (pip install -e .)")
    return subprocess.run([str(CLI), *args], capture_output=True, check=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples_and_exit_codes(command: str) -> None:
    r = console(command, "--help")
    text = words(r.stdout)
    assert text.startswith(f"Usage: sparsepatch {command} ")
    for meaning in EXIT_MEANINGS:
        assert meaning in text, f"{command} --help does not explain exit code {meaning!r}"
    lines = r.stdout.decode().splitlines()
    heads = [i for i, line in enumerate(lines) if re.match(r"\s*Examples?:", line)]
    assert heads, f"{command} --help has no Examples section"
    examples = [line.split(":", 1)[1] if re.match(r"\s*Examples?:", line) else line
                for line in lines[heads[0]:]]
    examples = [e.strip() for e in examples[: next((k for k, e in enumerate(examples[1:], 1)
                                                    if not e.strip()), len(examples))]]
    found = 0
    for example in examples:
        for argv in _invocations(example):
            found += 1
            _parses(argv)
    assert found, f"{command} --help shows no example command line"


def _invocations(line: str) -> list[list[str]]:
    """The sparsepatch command lines in a shell example (pipelines and redirections cut)."""
    out = []
    segment: list[str] = []
    for tok in [*shlex.split(line), "|"]:
        if tok in ("|", ">", "<"):
            if "sparsepatch" in segment:
                out.append(segment[segment.index("sparsepatch") + 1 :])
            segment = [] if tok == "|" else ["<redirect>"]
        elif segment != ["<redirect>"]:
            segment.append(tok)
    return out


def _parses(argv: list[str]) -> None:
    """An example's options and arguments are accepted by the parser (nothing is run)."""
    command = cli.main.commands.get(argv[0])
    if command is None:
        pytest.fail(f"example `sparsepatch {shlex.join(argv)}` names no command")
    try:
        command.make_context(argv[0], list(argv[1:]), parent=cli.main.make_context("sparsepatch", [argv[0]]))
    except click.ClickException as e:
        pytest.fail(f"example `sparsepatch {shlex.join(argv)}` does not parse: {e.format_message()}")


def test_main_help_lists_commands_and_exit_codes() -> None:
    text = words(console("--help").stdout)
    assert text.startswith("Usage: sparsepatch [OPTIONS] COMMAND")
    for command in COMMANDS:
        assert f" {command} " in text
    for meaning in EXIT_MEANINGS:
        assert meaning in text


# ---------------------------------------------------------------------------- progress


def test_progress_lines_report_done_total_and_rate(capsys: pytest.CaptureFixture[str]) -> None:
    p = cli.Progress("apply", 4 * MiB, "lines")
    p.every = 0
    p(MiB)
    p(MiB)
    p.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("apply: 1.0 MiB of 4.0 MiB (25%), ")
    assert lines[1].startswith("apply: 2.0 MiB of 4.0 MiB (50%), ")
    for line in lines:
        assert re.search(r", [\d.]+ [KMGT]?i?B/s, \d+:\d\d:\d\d left$", line), line


def test_progress_without_total_and_as_bar(capsys: pytest.CaptureFixture[str]) -> None:
    p = cli.Progress("signature", None, "lines")
    p.every = 0
    p(3000)
    assert re.fullmatch(r"signature: 2\.9 KiB, [\d.]+ [KMGT]?i?B/s\n", capsys.readouterr().err)

    bar = cli.Progress("diff", 100 * KiB, "bar")
    bar.every = 0
    bar(50 * KiB)
    err = capsys.readouterr().err
    # One line redrawn in place (click drops the erase-line escape where stderr is no terminal).
    assert err.startswith("\r[" + "#" * 12 + "." * 12 + "] diff: 50.0 KiB of 100.0 KiB (50%), ")
    assert "\n" not in err
    bar.close()
    assert capsys.readouterr().err in ("\r", "\r\x1b[K")  # and cleared at the end


def test_progress_is_off_for_logs_and_quiet_runs() -> None:
    # stderr is not a terminal under pytest: auto means none
    assert cli._progress("apply", lambda: 10, "auto", False) is None
    assert cli._progress("apply", lambda: 10, "lines", True) is None
    made = cli._progress("apply", lambda: 10, "lines", False)
    assert made is not None and made.total == 10


# ---------------------------------------------------------------------------- JSON stats


def test_json_stats_of_every_command(tmp: Path, pair: tuple[Path, Path]) -> None:
    dest, source = pair
    sig, patch = tmp / "dest.sig", tmp / "p"

    r = run_cli("signature", str(dest), "-o", str(sig), "--json", "-b", "64K")
    s = json.loads(r.stdout)
    assert r.stderr.startswith(b"signature: ")  # the summary still goes to stderr
    decoded = read_signature(io.BytesIO(sig.read_bytes()).read)
    assert s["command"] == "signature"
    assert s["file_size"] == 8 * MiB and s["block_size"] == BS and s["blocks"] == 128
    assert s["data_blocks"] == len(decoded.data_index) == 8
    assert s["hole_blocks"] == 120
    assert s["signature_bytes"] == sig.stat().st_size
    assert s["identity"] == decoded.identity.hex()
    assert isinstance(s["seconds"], float) and isinstance(s["bytes_read"], int)

    r = run_cli("diff", str(sig), str(source), "-o", str(patch), "--json")
    d = json.loads(r.stdout)
    info = json.loads(run_cli("info", str(patch), "--json").stdout)
    assert d["command"] == "diff"
    assert d["patch_bytes"] == patch.stat().st_size == info["patch_bytes"]
    assert d["base_identity"] == s["identity"] == info["base_identity"]
    assert d["target_identity"] == info["target_identity"]
    assert (d["data_blocks"], d["zero_blocks"], d["copy_blocks"]) == tuple(info["blocks"].values())
    assert d["base_size"] == d["target_size"] == 8 * MiB and d["full"] is False
    assert d["records"] == sum(info["records"].values())

    r = run_cli("verify", str(patch), "--json")
    v = json.loads(r.stdout)
    assert v["command"] == "verify"
    assert v["records"] == d["records"] and v["data_bytes"] == d["data_bytes"]
    assert v["authenticated"] is False

    r = run_cli("apply", str(patch), str(dest), "--json")
    a = json.loads(r.stdout)
    assert a["command"] == "apply"
    assert a["blocks_written"] == d["data_blocks"]
    assert a["blocks_punched"] == d["zero_blocks"]
    assert a["blocks_copied"] == d["copy_blocks"]
    assert a["target_size"] == 8 * MiB and a["resumed"] is False
    assert dest.read_bytes() == source.read_bytes()

    r = run_cli("verify", "--against", str(sig), str(source), "--json", check=False)
    assert r.returncode == 8  # the signature describes the old destination
    assert r.stdout == b""
    r = run_cli("verify", "--against", str(patch), str(dest), "--json")
    assert json.loads(r.stdout)["match"] is True


@pytest.mark.parametrize("argv", [
    ["signature", "{dest}", "--json"],
    ["signature", "{dest}", "-o", "-", "--json"],
    ["diff", "{sig}", "{source}", "--json"],
    ["diff", "--full", "{source}", "--json"],
])
def test_json_where_stdout_carries_data_is_a_usage_error(tmp: Path, pair: tuple[Path, Path],
                                                         argv: list[str]) -> None:
    dest, source = pair
    run_cli("signature", str(dest), "-o", str(tmp / "dest.sig"), "-q")
    names = {"dest": str(dest), "source": str(source), "sig": str(tmp / "dest.sig")}
    r = run_cli(*[a.format(**names) for a in argv], check=False)
    assert r.returncode == 2
    assert r.stdout == b""
    assert b"--stats" in r.stderr


def test_json_and_stats_together_is_a_usage_error(tmp: Path, pair: tuple[Path, Path]) -> None:
    dest, _ = pair
    r = run_cli("signature", str(dest), "-o", str(tmp / "s"), "--json", "--stats", str(tmp / "st"),
                check=False)
    assert r.returncode == 2
    assert not (tmp / "s").exists() and not (tmp / "st").exists()


def test_stats_file(tmp: Path, pair: tuple[Path, Path]) -> None:
    dest, source = pair
    # signature to stdout (a pipe) with its stats in a file: stdout holds only the signature
    r = run_cli("signature", str(dest), "--stats", str(tmp / "sig.json"))
    sig = read_signature(io.BytesIO(r.stdout).read)
    s = json.loads((tmp / "sig.json").read_text())
    assert s["command"] == "signature" and s["identity"] == sig.identity.hex()
    assert s["signature_bytes"] == len(r.stdout)
    (tmp / "dest.sig").write_bytes(r.stdout)

    r = run_cli("diff", str(tmp / "dest.sig"), str(source), "--stats", str(tmp / "diff.json"))
    d = json.loads((tmp / "diff.json").read_text())
    assert d["command"] == "diff" and d["patch_bytes"] == len(r.stdout)

    (tmp / "p").write_bytes(r.stdout)
    r = run_cli("apply", "-", str(dest), "--stats", str(tmp / "apply.json"), input=r.stdout)
    assert r.stdout == b""
    a = json.loads((tmp / "apply.json").read_text())
    assert a["command"] == "apply" and a["blocks_written"] == d["data_blocks"]
    assert dest.read_bytes() == source.read_bytes()

    run_cli("verify", "--against", str(tmp / "p"), str(dest), "--stats", str(tmp / "verify.json"))
    v = json.loads((tmp / "verify.json").read_text())
    assert v["command"] == "verify" and v["match"] is True


def test_stats_file_that_cannot_be_written(tmp: Path, pair: tuple[Path, Path]) -> None:
    dest, _ = pair
    r = run_cli("signature", str(dest), "-o", str(tmp / "s"), "--stats", str(tmp / "no" / "dir.json"),
                check=False)
    assert r.returncode == 3
    assert r.stderr.decode().splitlines()[-1].startswith("sparsepatch: error: ")


# ---------------------------------------------------------------------------- quiet


def test_quiet_prints_nothing_on_success(tmp: Path, pair: tuple[Path, Path]) -> None:
    dest, source = pair
    sig, patch = str(tmp / "s"), str(tmp / "p")
    runs = [
        ["signature", str(dest), "-o", sig],
        ["diff", sig, str(source), "-o", patch],
        ["diff", "--full", str(source), "-o", str(tmp / "full")],
        ["verify", patch],
        ["apply", patch, str(dest), "--verify"],
        ["verify", "--against", patch, str(dest)],
        ["apply", str(tmp / "full"), str(tmp / "new.img")],
    ]
    for argv in runs:
        for progress in ("bar", "lines"):
            r = run_cli(*argv, "-q", "--progress", progress)
            assert (r.stdout, r.stderr) == (b"", b""), argv
    assert dest.read_bytes() == source.read_bytes() == (tmp / "new.img").read_bytes()


# ---------------------------------------------------------------------------- split patches


def split_source(tmp: Path, name: str, data: int) -> Path:
    return make_sparse(tmp / name, 16 * MiB, [(0, 4 * BS), (4 * MiB, data), (12 * MiB, 3 * BS)])


@pytest.fixture
def split_setup(tmp: Path) -> tuple[Path, Path, Path]:
    base = make_sparse(tmp / "base.img", 16 * MiB, [(0, 4 * BS), (12 * MiB, BS)])
    source = split_source(tmp, "source.img", 400 * KiB)
    run_cli("signature", str(base), "-o", str(tmp / "base.sig"), "-q")
    return base, source, tmp / "base.sig"


def pieces(stem: Path) -> list[Path]:
    return sorted(stem.parent.glob(stem.name + ".*"))


def fresh(base: Path, tmp: Path, name: str) -> Path:
    dest = tmp / name
    shutil.copyfile(base, dest)
    return dest


def test_split_pieces_apply_three_ways(tmp: Path, split_setup: tuple[Path, Path, Path]) -> None:
    base, source, sig = split_setup
    stem = tmp / "out" / "p"
    stem.parent.mkdir()
    run_cli("diff", str(sig), str(source), "-o", str(stem), "--split", "64K", "-q")
    run_cli("diff", str(sig), str(source), "-o", str(tmp / "whole"), "-q")
    got = pieces(stem)
    assert [p.name for p in got] == [f"p.{k:03d}" for k in range(len(got))]
    assert len(got) >= 6
    assert all(p.stat().st_size <= 64 * KiB for p in got)
    assert all(p.stat().st_size == 64 * KiB for p in got[:-1])
    assert b"".join(p.read_bytes() for p in got) == (tmp / "whole").read_bytes()
    assert not list(stem.parent.glob(".*")), "a temporary piece was left behind"

    d1 = fresh(base, tmp, "d1")
    run_cli("apply", str(got[0]), str(d1), "-q")
    d2 = fresh(base, tmp, "d2")
    run_cli("apply", *map(str, got), str(d2), "-q")
    d3 = fresh(base, tmp, "d3")
    r = subprocess.run(f"cat {shlex.quote(str(stem))}.* | {shlex.quote(sys.executable)} -m sparsepatch "
                       f"apply - {shlex.quote(str(d3))} -q", shell=True, capture_output=True)
    assert r.returncode == 0, r.stderr
    for d in (d1, d2, d3):
        assert d.read_bytes() == source.read_bytes()
    run_cli("verify", "--against", str(got[0]), str(d1))  # a patch's target, from its first piece


def test_resplit_with_a_smaller_patch_removes_stale_pieces(
        tmp: Path, split_setup: tuple[Path, Path, Path]) -> None:
    base, source, sig = split_setup
    stem = tmp / "p"
    run_cli("diff", str(sig), str(source), "-o", str(stem), "--split", "64K", "-q")
    many = len(pieces(stem))
    smaller = split_source(tmp, "smaller.img", 70 * KiB)
    run_cli("diff", str(sig), str(smaller), "-o", str(stem), "--split", "64K", "-q")
    got = pieces(stem)
    assert 1 < len(got) < many
    assert [p.name for p in got] == [f"p.{k:03d}" for k in range(len(got))]
    dest = fresh(base, tmp, "d")
    run_cli("apply", str(got[0]), str(dest), "-q")
    assert dest.read_bytes() == smaller.read_bytes()


def test_missing_or_misordered_pieces_are_refused(tmp: Path, split_setup: tuple[Path, Path, Path]) -> None:
    base, source, sig = split_setup
    stem = tmp / "p"
    run_cli("diff", str(sig), str(source), "-o", str(stem), "--split", "64K", "-q")
    got = [str(p) for p in pieces(stem)]
    dest = fresh(base, tmp, "d")
    before = dest.read_bytes()
    for argv in ([got[1], got[0], *got[2:]],        # out of order
                 [got[0], *got[2:]],                # one missing in the middle
                 got[:-1]):                         # the last one missing
        r = run_cli("apply", *argv, str(dest), check=False)
        assert r.returncode == 4, (argv, r.stderr)
        assert r.stderr.startswith(b"sparsepatch: error: ")
        assert dest.read_bytes() == before
    os.unlink(got[3])  # lost on the way: PATCH.000 then finds only the pieces before it
    r = run_cli("apply", got[0], str(dest), check=False)
    assert r.returncode == 4
    assert dest.read_bytes() == before


def test_split_needs_an_output_file(split_setup: tuple[Path, Path, Path]) -> None:
    _, source, sig = split_setup
    r = run_cli("diff", str(sig), str(source), "--split", "64K", check=False)
    assert r.returncode == 2 and r.stdout == b""
    r = run_cli("diff", str(sig), str(source), "-o", "x", "--split", "1K", check=False)
    assert r.returncode == 2


# ---------------------------------------------------------------------------- terminals


def run_on_tty(*args: str) -> tuple[int, bytes, bytes]:
    """Run the command line with a pseudo-terminal as stdout (as when typed without a
    redirection); returns (exit code, what reached the terminal, stderr)."""
    master, slave = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-m", "sparsepatch", *args], stdout=slave,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=60)
        os.close(slave)
        slave = -1
        shown = b""
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed and drained
                break
            if not chunk:
                break
            shown += chunk
        return r.returncode, shown, r.stderr
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_binary_output_to_a_terminal_is_refused(tmp: Path, pair: tuple[Path, Path]) -> None:
    dest, source = pair
    run_cli("signature", str(dest), "-o", str(tmp / "s"), "-q")
    for argv in (["signature", str(dest)], ["signature", str(dest), "-o", "-"],
                 ["diff", str(tmp / "s"), str(source)], ["diff", "--full", str(source)]):
        code, shown, err = run_on_tty(*argv)
        assert code == 2, argv
        assert shown == b""
        assert b"refusing to write binary output to a terminal" in err
    # With -o the terminal only gets the summary and --json stats.
    code, shown, err = run_on_tty("signature", str(dest), "-o", str(tmp / "s2"), "--json")
    assert code == 0
    assert json.loads(shown.decode())["command"] == "signature"
    assert (tmp / "s2").read_bytes() == (tmp / "s").read_bytes()


# ---------------------------------------------------------------------------- shell completion


def _needs_console_script() -> None:
    if not CLI.exists():
        pytest.skip(f"no console script at {CLI}: install the package (pip install -e .)")


def test_bash_completion_script() -> None:
    _needs_console_script()
    env = {**os.environ, "_SPARSEPATCH_COMPLETE": "bash_source"}
    r = subprocess.run([str(CLI)], env=env, capture_output=True, check=True)
    script = r.stdout.decode()
    assert re.search(r"^_sparsepatch_completion\(\) \{", script, re.M)
    assert "complete -o nosort -F _sparsepatch_completion sparsepatch" in script


@pytest.mark.parametrize(("words_", "cword", "expected"), [
    (["sparsepatch", "ap"], 1, ["apply"]),
    (["sparsepatch", ""], 1, ["apply", "diff", "info", "merge", "signature", "verify"]),
    (["sparsepatch", "apply", "--j"], 2, ["--journal", "--json"]),
    (["sparsepatch", "signature", "--progress", ""], 3, ["auto", "bar", "lines", "none"]),
])
def test_bash_completion_completes(words_: list[str], cword: int, expected: list[str]) -> None:
    _needs_console_script()
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    script = (
        'eval "$(_SPARSEPATCH_COMPLETE=bash_source sparsepatch)"\n'
        f"COMP_WORDS=({shlex.join(words_)})\n"
        f"COMP_CWORD={cword}\n"
        "_sparsepatch_completion sparsepatch\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{CLI.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, check=True)
    assert sorted(r.stdout.decode().split()) == expected
