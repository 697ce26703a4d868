"""Outputs as another local user meets them when root runs sparsepatch: a temporary swapped
for a symlink, symlinks, FIFOs and devices planted in /tmp, permission bits wider than the
image's, split pieces on FAT and in their thousands, streams closed, signals."""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import KiB, MiB, error_line, make_sparse, pattern, run_cli

from sparsepatch import inputs, outputs
from sparsepatch.errors import FormatError, SparsePatchError

NOBODY = 65534
SP = f"{shlex.quote(sys.executable)} -m sparsepatch"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


def as_nobody(fn: Callable[[], None]) -> None:
    """Run fn in a child process as the unprivileged user nobody (the attacker)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the step as nobody failed"


@pytest.fixture
def public() -> Iterator[Path]:
    """A folder under /tmp that nobody can reach (pytest's own is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="sparsepatch-test-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sticky(public: Path) -> Path:
    """A folder like /tmp: sticky, everyone may write, owned by root."""
    d = public / "shared"
    d.mkdir()
    d.chmod(0o1777)
    return d


def secret(path: Path, data: bytes = b"root's secret\n") -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def image(path: Path, mode: int = 0o600) -> Path:
    make_sparse(path, 4 * MiB, [(0, 64 * KiB), (2 * MiB, 32 * KiB)])
    path.chmod(mode)
    return path


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- the temporary of -o (item 8)


@needs_root
def test_a_swapped_temporary_never_widens_another_files_mode(public: Path) -> None:
    folder = public / "theirs"
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)  # -o into a folder the attacker can write
    victim = secret(public / "shadow")
    out = folder / "img.sig"
    with pytest.raises(SparsePatchError, match="replaced"):  # noqa: PT012
        with outputs.open_output(str(out)) as write:
            write(b"signature bytes")
            (tmp,) = [p for p in folder.iterdir() if p.name.endswith(".part")]

            def swap() -> None:
                os.unlink(tmp)
                os.symlink(victim, tmp)

            as_nobody(swap)
    assert mode_of(victim) == 0o600
    assert victim.read_bytes() == b"root's secret\n"
    assert not out.is_symlink() and not out.exists()


# ---------------------------------------------- names planted in a folder like /tmp (item 9)


def loop_device(backing: Path) -> Iterator[str]:
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed (util-linux)")
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@needs_root
def test_output_through_a_planted_symlink_to_a_device_is_refused(tmp: Path, sticky: Path) -> None:
    backing = tmp / "disk"
    backing.write_bytes(pattern(MiB, 1))
    img = image(tmp / "img")
    for dev in loop_device(backing):
        as_nobody(lambda dev=dev: os.symlink(dev, sticky / "img.sig"))
        line = error_line(run_cli("signature", str(img), "-o", str(sticky / "img.sig"), check=False), 3)
        assert "symlink" in line and str(sticky / "img.sig") in line
        subprocess.run(["sync"], check=True)
    assert backing.read_bytes() == pattern(MiB, 1)


@needs_root
def test_stats_through_a_planted_symlink_is_refused(tmp: Path, sticky: Path) -> None:
    victim = secret(tmp / "shadow")
    img = image(tmp / "img")
    as_nobody(lambda: os.symlink(victim, sticky / "stats.json"))
    r = run_cli("signature", str(img), "-o", str(tmp / "s"), "-q", "--stats", str(sticky / "stats.json"),
                check=False)
    assert "symlink" in error_line(r, 3)
    assert victim.read_bytes() == b"root's secret\n" and mode_of(victim) == 0o600


@needs_root
def test_output_into_a_planted_fifo_is_refused(tmp: Path, sticky: Path) -> None:
    img = image(tmp / "img")
    fifo = sticky / "img.patch"
    as_nobody(lambda: os.mkfifo(fifo, 0o666))
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the attacker waiting for the patch
    try:
        r = run_cli("diff", "--full", str(img), "-o", str(fifo), check=False, timeout=60)
        assert "FIFO" in error_line(r, 3)
        try:
            got = os.read(reader, 1 << 20)
        except BlockingIOError:
            got = b""
        assert got == b""
    finally:
        os.close(reader)


@needs_root
def test_our_own_fifo_and_symlink_in_a_shared_folder_still_work(tmp: Path, sticky: Path) -> None:
    img = image(tmp / "img")
    fifo = sticky / "mine"
    os.mkfifo(fifo, 0o600)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        run_cli("signature", str(img), "-o", str(fifo), "-q", "-b", "64K", timeout=60)
        assert os.read(reader, 1 << 20).startswith(b"\x89SPSIG")
    finally:
        os.close(reader)
    os.symlink(os.devnull, sticky / "null")
    run_cli("signature", str(img), "-o", str(sticky / "null"), "-q")
    assert (sticky / "null").is_symlink()
    # --stats is written like -o: into a new file renamed into place.
    run_cli("signature", str(img), "-o", str(tmp / "s"), "-q", "--stats", str(sticky / "st.json"))
    assert b'"command": "signature"' in (sticky / "st.json").read_bytes()
    assert not [p for p in sticky.iterdir() if p.name.endswith(".part")]


def test_directory_as_output_is_one_line(tmp: Path) -> None:
    img = image(tmp / "img")
    (tmp / "d").mkdir()
    assert "is a directory" in error_line(run_cli("signature", str(img), "-o", str(tmp / "d"),
                                                  check=False), 3)
    assert "is a directory" in error_line(
        run_cli("signature", str(img), "-o", str(tmp / "s"), "--stats", str(tmp / "d"), "-q",
                check=False), 3)


# -------------------------------------------------------------- permission bits (item 10)


def test_outputs_are_no_more_readable_than_their_inputs(tmp: Path) -> None:
    img = image(tmp / "img", 0o600)
    mask = {"umask": 0o022}
    run_cli("signature", str(img), "-o", str(tmp / "img.sig"), **mask)
    assert mode_of(tmp / "img.sig") == 0o600
    run_cli("diff", "--full", str(img), "-o", str(tmp / "full.patch"), **mask)
    assert mode_of(tmp / "full.patch") == 0o600
    run_cli("diff", "--full", str(img), "-o", str(tmp / "split.patch"), "--split", "16K", **mask)
    assert {mode_of(p) for p in tmp.glob("split.patch.*")} == {0o600}

    # A first copy keeps the image's bits: a full patch file gives its own, stdin 0600.
    run_cli("apply", str(tmp / "full.patch"), str(tmp / "copy1"), **mask)
    assert mode_of(tmp / "copy1") == 0o600
    (tmp / "full.patch").chmod(0o640)
    run_cli("apply", str(tmp / "full.patch"), str(tmp / "copy2"), **mask)
    assert mode_of(tmp / "copy2") == 0o640
    run_cli("apply", "-", str(tmp / "copy3"), input=(tmp / "full.patch").read_bytes(), **mask)
    assert mode_of(tmp / "copy3") == 0o600
    run_cli("apply", str(tmp / "split.patch.000"), str(tmp / "copy4"), **mask)
    assert mode_of(tmp / "copy4") == 0o600

    # A patch: at most the source's and the signature's bits; the umask still applies.
    pub = image(tmp / "pub", 0o644)
    run_cli("signature", str(pub), "-o", str(tmp / "pub.sig"), **mask)
    assert mode_of(tmp / "pub.sig") == 0o644
    run_cli("diff", str(tmp / "pub.sig"), str(img), "-o", str(tmp / "p1"), **mask)
    assert mode_of(tmp / "p1") == 0o600
    img.chmod(0o664)
    (tmp / "pub.sig").chmod(0o640)
    run_cli("diff", str(tmp / "pub.sig"), str(img), "-o", str(tmp / "p2"), **mask)
    assert mode_of(tmp / "p2") == 0o640
    run_cli("diff", str(tmp / "pub.sig"), str(img), "-o", str(tmp / "p3"), umask=0o077)
    assert mode_of(tmp / "p3") == 0o600


def test_stats_are_no_more_readable_than_what_they_describe(tmp: Path) -> None:
    """--stats holds the sizes and identities of the files a command read: of a private
    image, private too (it was 0644 whatever the inputs)."""
    img = image(tmp / "img", 0o600)
    pub = image(tmp / "pub", 0o644)
    mask = {"umask": 0o022}
    run_cli("signature", "-q", str(img), "-o", str(tmp / "img.sig"), "--stats", str(tmp / "s1"), **mask)
    run_cli("signature", "-q", str(pub), "-o", str(tmp / "pub.sig"), "--stats", str(tmp / "s2"), **mask)
    run_cli("diff", "-q", str(tmp / "pub.sig"), str(img), "-o", str(tmp / "p"), "--stats", str(tmp / "s3"),
            **mask)
    run_cli("apply", "-q", str(tmp / "p"), str(pub), "--stats", str(tmp / "s4"), **mask)
    run_cli("verify", "-q", str(tmp / "p"), "--stats", str(tmp / "s5"), **mask)
    assert [mode_of(tmp / f"s{k}") for k in range(1, 6)] == [0o600, 0o644, 0o600, 0o600, 0o600]
    assert b'"command": "apply"' in (tmp / "s4").read_bytes()


# ------------------------------------------------------------------ split pieces (item 13)


def test_piece_names_sort_in_piece_order() -> None:
    names = [outputs.piece_name("p", k) for k in range(100_000)]
    assert names[:2] == ["p.000", "p.001"] and names[899] == "p.899"
    assert names[900] == "p.90000" and names[9899] == "p.98999" and names[9900] == "p.9900000"
    assert sorted(names) == names and len(set(names)) == len(names)


def test_more_than_a_thousand_pieces_apply_every_way_within_a_small_open_files_limit(tmp: Path) -> None:
    src = tmp / "src"
    src.write_bytes(pattern(4 * MiB + 300 * KiB, 5))  # incompressible: over 1000 pieces of 4K
    stem = tmp / "out" / "p"
    stem.parent.mkdir()
    run_cli("diff", "--full", str(src), "-o", str(stem), "--split", "4K", "-q")
    got = sorted(stem.parent.iterdir())
    assert len(got) > 1000
    assert [p.name for p in got] == [Path(outputs.piece_name(str(stem), k)).name for k in range(len(got))]

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    r = subprocess.run([sys.executable, "-m", "sparsepatch", "apply", str(got[0]), str(tmp / "d1"), "-q"],
                       capture_output=True, preexec_fn=few_files)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(f"{SP} apply {shlex.quote(str(stem))}.* {shlex.quote(str(tmp / 'd2'))} -q", shell=True,
                       capture_output=True, preexec_fn=few_files)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(f"cat {shlex.quote(str(stem))}.* | {SP} apply - {shlex.quote(str(tmp / 'd3'))} -q",
                       shell=True, capture_output=True)
    assert r.returncode == 0, r.stderr
    for d in ("d1", "d2", "d3"):
        assert (tmp / d).read_bytes() == src.read_bytes()


def test_pieces_written_before_names_sorted_still_apply(tmp: Path) -> None:
    src = tmp / "src"
    src.write_bytes(pattern(3 * MiB + 800 * KiB, 6))
    stem = tmp / "out" / "p"
    stem.parent.mkdir()
    run_cli("diff", "--full", str(src), "-o", str(stem), "--split", "4K", "-q")
    got = sorted(stem.parent.iterdir())
    assert 900 < len(got) < 1000
    for k in range(900, len(got)):  # the names 0.1 gave these pieces
        os.rename(outputs.piece_name(str(stem), k), f"{stem}.{k:03d}")
    run_cli("apply", f"{stem}.000", str(tmp / "d"), "-q")
    assert (tmp / "d").read_bytes() == src.read_bytes()


def test_a_piece_replaced_between_the_two_reads_is_refused(tmp: Path) -> None:
    a, b = tmp / "a", tmp / "b"
    a.write_bytes(b"x" * 5000)
    b.write_bytes(b"y" * 3000)
    with inputs.open_inputs([str(a), str(b)]) as chain:
        assert len(b"".join(iter(lambda: chain.read(1 << 16), b""))) == 8000
        (tmp / "b2").write_bytes(b"y" * 3000)
        os.replace(tmp / "b2", b)  # same bytes, another file
        chain.rewind()
        with pytest.raises(FormatError, match="changed while apply was reading"):
            while chain.read(1 << 16):
                pass


def test_an_interrupted_resplit_leaves_no_set_that_applies(tmp: Path) -> None:
    src = image(tmp / "src", 0o644)
    stem = tmp / "p"
    run_cli("diff", "--full", str(src), "-o", str(stem), "--split", "16K", "-b", "4K", "-q")
    assert (tmp / "p.003").exists()
    with pytest.raises(KeyboardInterrupt), outputs.open_output(str(stem), split=16 * KiB) as write:
        write(b"\x89SPPATCH" + bytes(40000))
        raise KeyboardInterrupt
    assert not (tmp / "p.000").exists()
    assert not [p for p in tmp.iterdir() if p.name.endswith(".part")]
    error_line(run_cli("apply", str(tmp / "p.000"), str(tmp / "d1"), check=False), 3)
    r = subprocess.run(f"cat {shlex.quote(str(stem))}.* | {SP} apply - {shlex.quote(str(tmp / 'd2'))}",
                       shell=True, capture_output=True)
    assert r.returncode == 4, r.stderr
    assert not (tmp / "d1").exists() and not (tmp / "d2").exists()


def test_split_fat32_is_the_largest_piece_fat_holds() -> None:
    from sparsepatch.cli import SplitSizeType

    assert SplitSizeType().convert("fat32", None, None) == (4 << 30) - 1
    assert SplitSizeType().convert("FAT32", None, None) == 4294967295
    assert SplitSizeType().convert("4095M", None, None) < 4294967295


@contextlib.contextmanager
def fat_folder(tmp: Path) -> Iterator[Path]:
    if shutil.which("mkfs.vfat") is None:
        pytest.skip("mkfs.vfat is not installed (dosfstools)")
    disk = tmp / "fat.img"
    with open(disk, "wb") as f:
        f.truncate(40 * MiB)
    subprocess.run(["mkfs.vfat", "-F", "32", str(disk)], check=True, capture_output=True)
    mnt = tmp / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", "loop", str(disk), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a FAT image: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_pieces_of_4g_are_refused_where_fat_is_found(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "_fs_type", lambda fd: "vfat")
    with pytest.raises(SparsePatchError, match="fat32") as e, outputs.open_output(str(tmp / "p"), 4 << 30):
        pass
    assert e.value.exit_code == 2
    with outputs.open_output(str(tmp / "p"), (4 << 30) - 1) as write:
        write(b"x")
    assert (tmp / "p.000").read_bytes() == b"x"


def test_the_filesystem_type_is_found() -> None:
    fd = os.open("/proc", os.O_RDONLY)
    try:
        assert outputs._fs_type(fd) == "proc"
    finally:
        os.close(fd)


@needs_root
def test_pieces_of_4g_are_refused_on_fat(tmp: Path) -> None:
    img = image(tmp / "img")
    with fat_folder(tmp) as mnt:
        line = error_line(run_cli("diff", "--full", str(img), "-o", str(mnt / "p"), "--split", "4G",
                                  check=False), 2)
        assert "fat32" in line and "FAT" in line
        assert os.listdir(mnt) == []
        run_cli("diff", "--full", str(img), "-o", str(mnt / "p"), "--split", "fat32", "-q")
        run_cli("apply", str(mnt / "p.000"), str(tmp / "copy"), "-q")
        assert (tmp / "copy").read_bytes() == img.read_bytes()


# ------------------------------------------------- tracebacks instead of one line (item 14)


def test_a_directory_where_a_file_belongs_is_one_line(tmp: Path) -> None:
    img = image(tmp / "img", 0o644)
    d = tmp / "dir"
    d.mkdir()
    run_cli("signature", str(img), "-o", str(tmp / "s"))
    run_cli("diff", str(tmp / "s"), str(img), "-o", str(tmp / "p"))
    key = tmp / "key"
    key.write_bytes(os.urandom(32))
    for argv in (["apply", str(d), str(tmp / "dest")],
                 ["diff", str(d), str(img)],
                 ["diff", str(tmp / "s"), str(d)],
                 ["signature", str(d)],
                 ["info", str(d)],
                 ["verify", str(d)],
                 ["verify", "--against", str(d), str(img)],
                 ["verify", "--against", str(tmp / "s"), str(d)],
                 ["diff", "-k", str(d), str(tmp / "s"), str(img)],
                 ["apply", "-k", str(d), str(tmp / "p"), str(tmp / "dest")],
                 ["verify", "-k", str(d), str(tmp / "p")]):
        line = error_line(run_cli(*argv, check=False), 3)
        assert "is a directory" in line and str(d) in line, argv


def test_a_directory_named_like_a_piece_is_one_line(tmp: Path) -> None:
    img = image(tmp / "img", 0o644)
    stem = tmp / "p"
    run_cli("diff", "--full", str(img), "-o", str(stem), "--split", "16K", "-b", "4K", "-q")
    n = len(list(tmp.glob("p.*")))
    os.unlink(f"{stem}.001")
    os.mkdir(f"{stem}.001")  # apply p.000 meets a directory as its second piece: not read
    line = error_line(run_cli("apply", f"{stem}.000", str(tmp / "d"), check=False), 4)
    assert "truncated" in line and f"{stem}.001 was not read as the next piece: it is a directory" in line
    os.rmdir(f"{stem}.001")
    os.mkdir(f"{stem}.{n:03d}")  # a stale piece that cannot be removed
    r = run_cli("diff", "--full", str(img), "-o", str(stem), "--split", "16K", "-b", "4K", check=False)
    assert f"p.{n:03d}" in error_line(r, 3)
    os.mkdir(tmp / "q.000")  # the first piece, removed before anything is written
    r = run_cli("diff", "--full", str(img), "-o", str(tmp / "q"), "--split", "16K", check=False)
    assert "q.000" in error_line(r, 3)


@pytest.mark.parametrize("command", [
    "apply - {d} <&-",
    "signature - -o {d}.sig <&-",
    "diff --full - -o {d}.patch <&-",
    "signature {img} >&-",
    "diff --full {img} >&-",
    "diff --full {img} -o - >&-",
    "info {sig} >&-",
    "signature {img} -o {d}.sig2 --json >&-",
])
def test_closed_stdin_or_stdout_is_one_line(tmp: Path, command: str) -> None:
    img = image(tmp / "img", 0o644)
    run_cli("signature", str(img), "-o", str(tmp / "s"))
    cmd = command.format(d=shlex.quote(str(tmp / "d")), img=shlex.quote(str(img)),
                         sig=shlex.quote(str(tmp / "s")))
    r = subprocess.run(f"{SP} {cmd}", shell=True, capture_output=True)
    line = error_line(r, 3, warnings_ok=True)
    assert "closed" in line, line
    assert not (tmp / "d").exists()
    assert not [p for p in tmp.iterdir() if p.name.endswith(".part")]


# ----------------------------------------------------------------------- signals (item 15)

SLOW = """
import sys, time
from sparsepatch import blocks
from sparsepatch.cli import main
hash_ = blocks.Scanner._hash
def slow(*a):
    time.sleep(0.3)
    return hash_(*a)
blocks.Scanner._hash = slow
sys.argv[0] = "sparsepatch"
main()
"""


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_remove_the_temporary_and_stop_the_worker(tmp: Path, signum: int) -> None:
    from sparsepatch import fork

    if fork.worker_count() < 2:
        pytest.skip("one CPU: no worker is started")
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        pytest.skip("no /proc/PID/task/PID/children to find the worker")
    img = make_sparse(tmp / "img", 64 * MiB, [(0, 40 * MiB)])
    out = tmp / "out" / "img.sig"
    out.parent.mkdir()
    p = subprocess.Popen([sys.executable, "-c", SLOW, "signature", str(img), "-o", str(out), "-q"],
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (children(p.pid) and list(out.parent.iterdir())):
            assert p.poll() is None and time.monotonic() < deadline, "no worker was started"
            time.sleep(0.01)
        (worker,) = children(p.pid)
        p.send_signal(signum)
        _, err = p.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 128 + signum, err
    assert not alive(worker), "the worker outlived the command"
    assert os.listdir(out.parent) == [], "the temporary was left behind"
    assert err.decode().strip().endswith(f"terminated by {signal.Signals(signum).name}")


HANGUP = """
import os, signal, sys
from sparsepatch import api
from sparsepatch.cli import main
signature = api.signature
def hung_up(*a, **k):
    os.kill(os.getpid(), signal.SIGHUP)
    return signature(*a, **k)
api.signature = hung_up
sys.argv[0] = "sparsepatch"
main()
"""


def test_nohup_keeps_sighup_ignored(tmp: Path) -> None:
    img = image(tmp / "img", 0o644)
    r = subprocess.run([sys.executable, "-c", HANGUP, "signature", str(img), "-o", str(tmp / "s"), "-q"],
                       capture_output=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert r.returncode == 0, r.stderr
    assert (tmp / "s").read_bytes().startswith(b"\x89SPSIG")
    r = subprocess.run([sys.executable, "-c", HANGUP, "signature", str(img), "-o", str(tmp / "t"), "-q"],
                       capture_output=True)
    assert r.returncode == 128 + signal.SIGHUP, r.stderr
    assert not (tmp / "t").exists()


# ------------------------------- names another user owns, outside a sticky folder, and FIFOs


@needs_root
def test_stats_onto_another_users_fifo_in_their_folder_replaces_it(tmp: Path, public: Path) -> None:
    """root writes --stats into a folder nobody owns, where nobody made the name a FIFO:
    the FIFO is replaced by the file (never opened: that would wait for a reader)."""
    img = image(tmp / "img")
    folder = public / "theirs"
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)
    as_nobody(lambda: os.mkfifo(folder / "s.json", 0o666))
    run_cli("signature", str(img), "-o", str(tmp / "s"), "-q", "--stats", str(folder / "s.json"),
            timeout=30)
    assert (folder / "s.json").is_file() and os.stat(folder / "s.json").st_uid == 0
    assert b'"command": "signature"' in (folder / "s.json").read_bytes()


@needs_root
def test_a_symlink_of_another_user_inside_the_target_of_ours_is_not_followed(tmp: Path,
                                                                             public: Path) -> None:
    """Our own symlink leads through a folder symlink another user owns to a device: the
    device is not written (the output replaces our name instead)."""
    backing = tmp / "disk"
    backing.write_bytes(pattern(MiB, 1))
    img = image(tmp / "img")
    folder = public / "theirs"
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)
    for dev in loop_device(backing):
        as_nobody(lambda dev=dev: os.symlink(os.path.dirname(dev), folder / "d"))
        os.symlink(folder / "d" / os.path.basename(dev), tmp / "out")
        run_cli("signature", str(img), "-o", str(tmp / "out"), "-q", check=False)
        subprocess.run(["sync"], check=True)
    assert backing.read_bytes() == pattern(MiB, 1)


def test_our_fifo_with_no_reader_is_refused_at_once(tmp: Path) -> None:
    img = image(tmp / "img")
    os.mkfifo(tmp / "fifo", 0o600)
    r = run_cli("signature", str(img), "-o", str(tmp / "fifo"), check=False, timeout=30)
    assert "no reader" in error_line(r, 3)
    assert stat.S_ISFIFO(os.lstat(tmp / "fifo").st_mode)


def test_a_link_like_dev_stdout_as_output_writes_to_the_pipe(tmp: Path) -> None:
    """/dev/stdout leads to a pipe through /proc/self/fd/1, whose text names nothing. A
    link of our own to it is used: a failure must not replace the real /dev/stdout."""
    img = image(tmp / "img")
    os.symlink("/proc/self/fd/1", tmp / "stdout")
    r = run_cli("signature", str(img), "-o", str(tmp / "stdout"), "-q")
    assert r.stdout.startswith(b"\x89SPSIG")
    assert (tmp / "stdout").is_symlink()


@pytest.mark.parametrize("verb", ["signature", "diff-signature"])
def test_output_mode_comes_from_the_files_that_were_read(tmp: Path, verb: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The input path is a symlink to a 0600 secret when it is opened, and to a 0644
    decoy afterwards: the output carries the secret's content, so it stays private."""
    from sparsepatch import api

    secret_img = image(tmp / "secret.img", 0o600)
    decoy = image(tmp / "decoy.img", 0o644)
    link = tmp / "in"
    link.symlink_to(secret_img)

    def swap() -> None:
        link.unlink()
        link.symlink_to(decoy)

    old = os.umask(0o022)
    try:
        if verb == "signature":
            real = inputs.open_source

            @contextlib.contextmanager
            def open_then_swap(path: str) -> Iterator[int]:
                with real(path) as fd:
                    swap()
                    yield fd

            monkeypatch.setattr(inputs, "open_source", open_then_swap)
            api.signature(str(link), str(tmp / "out"))
        else:
            # The signature of a secret is a secret too (its block hashes).
            sig = tmp / "secret.sig"
            api.signature(str(secret_img), str(sig))
            sig.chmod(0o600)
            link.unlink()
            link.symlink_to(sig)
            real_open = inputs.open_input

            @contextlib.contextmanager
            def open_then_swap_sig(path: str) -> Iterator[object]:
                with real_open(path) as f:
                    if path == str(link):
                        link.unlink()
                        decoy_sig = tmp / "decoy.sig"
                        api.signature(str(decoy), str(decoy_sig))
                        decoy_sig.chmod(0o644)
                        link.symlink_to(decoy_sig)
                    yield f

            monkeypatch.setattr(inputs, "open_input", open_then_swap_sig)
            api.diff(str(link), str(decoy), str(tmp / "out"))
    finally:
        os.umask(old)
    assert mode_of(tmp / "out") & 0o077 == 0


# ------------------------------------------------------- the pieces apply PATCH.000 finds


def _split(tmp: Path) -> tuple[Path, bytes]:
    src = make_sparse(tmp / "src.img", 1 * MiB, [(0, 256 * KiB), (512 * KiB, 256 * KiB)])
    run_cli("diff", "-q", "--full", str(src), "-o", str(tmp / "p"), "--split", "300K")
    assert (tmp / "p.001").exists() and not (tmp / "p.002").exists()
    return tmp / "p", src.read_bytes()


def test_a_symlink_after_the_last_piece_is_not_read_as_one(tmp: Path) -> None:
    p, data = _split(tmp)
    junk = tmp / "junk"
    junk.write_bytes(b"junk")
    os.symlink(junk, f"{p}.002")
    run_cli("apply", "-q", f"{p}.000", str(tmp / "dest"))
    assert (tmp / "dest").read_bytes() == data


@needs_root
def test_a_piece_of_another_owner_ends_the_pieces_found(tmp: Path) -> None:
    """Discovery stops at a piece PATCH.000's owner does not own: a patch whose last
    piece belongs to someone else reads as truncated, with nothing written."""
    p, _ = _split(tmp)
    os.chown(f"{p}.001", NOBODY, NOBODY)
    line = error_line(run_cli("apply", f"{p}.000", str(tmp / "dest"), check=False), 4)
    assert "truncated" in line and f"{p}.001 was not read as the next piece: it belongs to uid" in line
    assert not (tmp / "dest").exists()


def test_applying_the_stem_of_a_split_patch_names_its_first_piece(tmp: Path) -> None:
    p, _ = _split(tmp)
    line = error_line(run_cli("apply", str(p), str(tmp / "dest"), check=False), 3)
    assert "no such file" in line and f"give {p}.000" in line


FUSEFAT = shutil.which("fusefat")


@pytest.mark.skipif(not (FUSEFAT and shutil.which("mkfs.vfat") and os.path.exists("/dev/fuse")),
                    reason="needs fusefat and mkfs.vfat (Debian fusefat, dosfstools) and /dev/fuse")
def test_a_full_fusefat_stick_says_no_space(tmp: Path) -> None:
    """fusefat reports a full FAT as EPERM: the user is told about space, not permission."""
    assert FUSEFAT
    fat, mnt = tmp / "fat.img", tmp / "mnt"
    mnt.mkdir()
    with open(fat, "wb") as f:
        f.truncate(2 * MiB)
    subprocess.run(["mkfs.vfat", str(fat)], check=True, capture_output=True)
    r = subprocess.run([FUSEFAT, "-o", "rw+", str(fat), str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"fusefat cannot mount here: {r.stderr.decode()}")
    try:
        src = tmp / "src.img"
        src.write_bytes(os.urandom(4 * MiB))  # incompressible: the patch cannot fit
        r = run_cli("diff", "--full", str(src), "-o", str(mnt / "img.patch"), "--split", "fat32",
                    check=False)
        line = error_line(r, 3)
        assert "no space left" in line and "img.patch.000" in line
        assert not [p for p in mnt.iterdir() if p.name.endswith(".part")]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_fifo_among_the_pieces_named_is_refused_at_once(tmp: Path) -> None:
    """`apply /tmp/p.* DEST` may name a FIFO someone added: refused, never opened."""
    p, _ = _split(tmp)
    os.mkfifo(f"{p}.002")
    r = run_cli("apply", f"{p}.000", f"{p}.001", f"{p}.002", str(tmp / "dest"), check=False,
                timeout=30)
    assert f"{p}.002" in error_line(r, 2)
    r = run_cli("verify", f"{p}.000", "-", check=False, timeout=30)
    assert "must be a regular file" in error_line(r, 2)
    assert not (tmp / "dest").exists()
