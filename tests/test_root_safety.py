"""apply run as root next to other local users: what such a user can plant or hold must not
make root write where it should not, trust a journal it did not write, hang, or change an
image that is in use.

The other user is `nobody`, acting from a forked child that dropped root; the folder
beside the destination belongs to it, as a user's image folder would."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import default_journal, error_line, make_sparse, pattern, run_cli

from sparsepatch import api, journal
from sparsepatch.errors import IOFailure
from sparsepatch.format import JournalSlot, encode_journal_slot

BS = 4096
N = 64
SIZE = N * BS
FLOCK = struct.Struct("@hhqqi")  # struct flock for F_OFD_* and F_SETLK
HELD = "another sparsepatch apply holds this destination"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "acting as root and as another user needs root"
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "there is no user nobody"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


def _why_no_loop() -> str | None:
    if shutil.which("losetup") is None:
        return "losetup (util-linux) is not installed"
    if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
        return "this kernel or container has no loop devices"
    return None


needs_loop = pytest.mark.skipif(_why_no_loop() is not None, reason=_why_no_loop() or "")


def nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


def _become_nobody() -> None:
    u = nobody()
    os.setgroups([])
    os.setgid(u.pw_gid)
    os.setuid(u.pw_uid)


def as_nobody(action: Callable[[], object]) -> None:
    """Run action as nobody, in a forked child; fail the test if it raises."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _become_nobody()
            action()
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported through the exit status
            os.write(2, f"as nobody: {e!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the action as nobody failed (see stderr)"


def plant_symlink(target: Path, at: Path) -> Callable[[], object]:
    return lambda: os.symlink(target, at)


def plant_file(at: Path, data: bytes) -> Callable[[], object]:
    return lambda: at.write_bytes(data)


def plant_fifo(at: Path) -> Callable[[], object]:
    return lambda: os.mkfifo(at)


@dataclass
class World:
    shared: Path  # root's, readable by all: the patch and the target
    folder: Path  # nobody's: the destination lives here
    dest: Path  # root's, 0644, in nobody's folder
    victim: Path  # root's 0600 file somewhere nobody cannot even read
    patch: Path
    base: bytes
    target: bytes

    @property
    def journal(self) -> Path:
        return self.folder / f".{self.dest.name}.sparsepatch-journal"

    def identities(self) -> tuple[bytes, bytes]:
        i = api.info(str(self.patch))
        return bytes.fromhex(i["base_identity"]), bytes.fromhex(i["target_identity"])


@pytest.fixture
def world(tmp: Path) -> Iterator[World]:
    """pytest's tmp is root's alone (0700), so the folders nobody works in are elsewhere."""
    shared = Path(tempfile.mkdtemp(prefix="sparsepatch-root-"))
    try:
        shared.chmod(0o755)
        folder = shared / "user"
        folder.mkdir()
        os.chown(folder, nobody().pw_uid, nobody().pw_gid)
        base_map: list[tuple[int, bytes | int]] = [(i * BS, pattern(BS, 300 + i)) for i in range(40)]
        dest = make_sparse(folder / "dest.img", SIZE, base_map)
        dest.chmod(0o644)
        target_map = [m for m in base_map if m[0] // BS not in (3, 9)] + [(3 * BS, pattern(BS, 3)),
                                                                          (50 * BS, pattern(BS, 50))]
        target = make_sparse(shared / "target.img", SIZE, target_map)
        run_cli("signature", str(dest), "-o", str(shared / "dest.sig"), "-b", "4K", "-q")
        run_cli("diff", str(shared / "dest.sig"), str(target), "-o", str(shared / "p"), "-q")
        victim = tmp / "secret"
        victim.write_bytes(b"root's secret, do not overwrite " * 16)
        victim.chmod(0o600)
        yield World(shared, folder, dest, victim, shared / "p", dest.read_bytes(), target.read_bytes())
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def forged_journal(w: World, start: int = 0, end: int = 1 << 40) -> bytes:
    """A valid journal naming this patch (whose identities anyone can read from it) and a
    window over everything: trusted, it would accept any block as torn."""
    base, target = w.identities()
    return encode_journal_slot(JournalSlot(1, base, target, start, end)) + bytes(128)


def unrelated(w: World) -> bytes:
    """Make the destination a file the patch was not made for (same size); return it."""
    other = pattern(SIZE, 4242)
    w.dest.write_bytes(other)
    return other


# ---------------------------------------------------------------------------- journal beside the file


def test_a_symlink_planted_as_the_journal_is_refused(world: World) -> None:
    before = world.victim.read_bytes()
    as_nobody(plant_symlink(world.victim, world.journal))
    line = error_line(run_cli("apply", str(world.patch), str(world.dest), check=False), 3)
    assert str(world.journal) in line and "symbolic link" in line, line
    assert world.victim.read_bytes() == before
    assert world.dest.read_bytes() == world.base
    world.journal.unlink()
    run_cli("apply", str(world.patch), str(world.dest))
    assert world.dest.read_bytes() == world.target


def test_a_symlink_planted_while_apply_runs_is_not_followed(world: World) -> None:
    """The journal is created at apply's first write: a name that appears between the start
    and that write must not be written through."""
    before = world.victim.read_bytes()
    patch = world.patch.read_bytes()
    p = subprocess.Popen([sys.executable, "-m", "sparsepatch", "apply", "-", str(world.dest)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdin is not None
        p.stdin.write(patch[:108])  # the header: apply opens, locks and waits for records
        p.stdin.flush()
        deadline = time.monotonic() + 30
        while not lock_held(world.dest) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock_held(world.dest), "apply never took its lock"
        as_nobody(plant_symlink(world.victim, world.journal))
        _, err = p.communicate(patch[108:], timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    r = subprocess.CompletedProcess(p.args, p.returncode, b"", err)
    line = error_line(r, 3)
    assert str(world.journal) in line and "appeared while apply was running" in line, line
    assert world.victim.read_bytes() == before
    assert world.dest.read_bytes() == world.base


def test_a_journal_another_user_wrote_is_not_trusted(world: World) -> None:
    """nobody may write a journal beside a file it does not own, but apply must not take
    its word that the file's blocks are torn: that would switch off the wrong-base check."""
    other = unrelated(world)
    as_nobody(plant_file(world.journal, forged_journal(world)))
    line = error_line(run_cli("apply", str(world.patch), str(world.dest), check=False), 3)
    assert str(world.journal) in line and f"owned by uid {nobody().pw_uid}" in line, line
    assert world.dest.read_bytes() == other


def test_a_hard_link_as_the_journal_is_refused(world: World) -> None:
    elsewhere = world.shared / "mine"
    elsewhere.write_bytes(b"x" * 512)
    os.link(elsewhere, world.journal)
    line = error_line(run_cli("apply", str(world.patch), str(world.dest), check=False), 3)
    assert "2 hard links" in line, line
    assert elsewhere.read_bytes() == b"x" * 512
    assert world.dest.read_bytes() == world.base


def test_a_fifo_as_the_journal_is_refused_without_hanging(world: World) -> None:
    as_nobody(plant_fifo(world.journal))
    r = run_cli("apply", str(world.patch), str(world.dest), check=False, timeout=30)
    line = error_line(r, 3)
    assert "not a regular file" in line, line
    assert world.dest.read_bytes() == world.base


def test_a_journal_of_the_destinations_owner_is_resumed(world: World) -> None:
    """The owner could write the file anyway: its journal (left by its own interrupted
    apply) is trusted, and root finishes the job."""
    os.chown(world.dest, nobody().pw_uid, nobody().pw_gid)
    torn = bytearray(world.base)
    torn[3 * BS : 3 * BS + BS // 2] = world.target[3 * BS : 3 * BS + BS // 2]  # neither base nor target
    world.dest.write_bytes(bytes(torn))
    as_nobody(plant_file(world.journal, forged_journal(world, 3, 4)))
    r = run_cli("apply", str(world.patch), str(world.dest))
    assert b"resumed" in r.stderr
    assert world.dest.read_bytes() == world.target
    assert not world.journal.exists()


def test_the_journal_is_created_private_and_removed(world: World) -> None:
    """Seen from the middle of an apply: a 0600 regular file owned by root."""
    seen: list[os.stat_result] = []
    real = journal.Journal.write

    def spy(self: journal.Journal, *a: object) -> None:
        real(self, *a)  # type: ignore[arg-type]
        seen.append(os.stat(self.path, follow_symlinks=False))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(journal.Journal, "write", spy)
        api.apply(str(world.patch), str(world.dest))
    assert seen and all(stat.S_ISREG(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o600
                        and s.st_uid == 0 for s in seen)
    assert not world.journal.exists()
    assert world.dest.read_bytes() == world.target


def test_journal_option_gets_the_same_checks(world: World) -> None:
    chosen = world.folder / "my.journal"
    as_nobody(plant_symlink(world.victim, chosen))
    before = world.victim.read_bytes()
    line = error_line(run_cli("apply", str(world.patch), str(world.dest), "--journal", str(chosen),
                              check=False), 3)
    assert "symbolic link" in line, line
    assert world.victim.read_bytes() == before
    chosen.unlink()
    run_cli("apply", str(world.patch), str(world.dest), "--journal", str(chosen))
    assert world.dest.read_bytes() == world.target
    assert not chosen.exists()


# ---------------------------------------------------------------------------- block device journals


@contextlib.contextmanager
def loop(backing: Path) -> Iterator[str]:
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    journal_ = default_journal(dev)
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal_)


def old_device_journal(dev: str) -> Path:
    """Where earlier versions kept a device's journal: a predictable name in /var/tmp."""
    rdev = os.stat(dev).st_rdev
    return Path(f"/var/tmp/sparsepatch-blockdev-{os.major(rdev)}-{os.minor(rdev)}.journal")


@contextlib.contextmanager
def planted(path: Path, plant: Callable[[Path], Callable[[], object]]) -> Iterator[None]:
    """Something nobody puts at path (in a world-writable place), removed after."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    as_nobody(plant(path))
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def device_world(w: World) -> tuple[Path, Path]:
    """A backing image holding the base and a patch made from the device's signature."""
    backing = w.shared / "disk.img"
    backing.write_bytes(w.base)
    return backing, w.patch


@needs_loop
def test_a_symlink_in_var_tmp_does_not_redirect_a_device_journal(world: World) -> None:
    backing, patch = device_world(world)
    before = world.victim.read_bytes()
    with loop(backing) as dev, planted(old_device_journal(dev), lambda at: plant_symlink(world.victim, at)):
        run_cli("apply", str(patch), dev)
        assert os.path.islink(old_device_journal(dev))
    assert world.victim.read_bytes() == before
    assert backing.read_bytes() == world.target


@needs_loop
def test_a_fifo_in_var_tmp_does_not_hang_a_device_apply(world: World) -> None:
    backing, patch = device_world(world)
    with loop(backing) as dev, planted(old_device_journal(dev), plant_fifo):
        run_cli("apply", str(patch), dev, timeout=30)
    assert backing.read_bytes() == world.target


@needs_loop
def test_a_forged_device_journal_does_not_switch_off_the_base_check(world: World) -> None:
    backing, patch = device_world(world)
    other = pattern(SIZE, 99)
    backing.write_bytes(other)
    forged = forged_journal(world)
    with loop(backing) as dev, planted(old_device_journal(dev), lambda at: plant_file(at, forged)):
        error_line(run_cli("apply", str(patch), dev, check=False), 5)
    assert backing.read_bytes() == other


@needs_loop
def test_device_journal_lives_in_a_private_directory(world: World) -> None:
    backing, patch = device_world(world)
    with loop(backing) as dev:
        path = Path(default_journal(dev))
        assert path.parent == Path("/var/lib/sparsepatch")
        assert str(os.major(os.stat(dev).st_rdev)) in path.name and str(SIZE) in path.name
        # A journal left for the same device number at another size (a loop device since
        # attached to another image) is not this device's.
        rdev = os.stat(dev).st_rdev
        stale = path.parent / journal.device_journal_name(rdev, SIZE * 2)
        backing.write_bytes(pattern(SIZE, 98))
        stale.write_bytes(forged_journal(world))
        try:
            error_line(run_cli("apply", str(patch), dev, check=False), 5)
        finally:
            stale.unlink()
        backing.write_bytes(world.base)
        run_cli("apply", str(patch), dev)
    st = os.stat("/var/lib/sparsepatch", follow_symlinks=False)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o077 == 0
    assert backing.read_bytes() == world.target


@needs_loop
@pytest.mark.parametrize("state", ["world-writable", "other owner", "symlink"])
def test_an_unsafe_state_directory_is_refused(world: World, tmp: Path, state: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    backing, patch = device_world(world)
    where = tmp / "state"
    if state == "symlink":
        (tmp / "real").mkdir(mode=0o700)
        where.symlink_to(tmp / "real")
    else:
        where.mkdir(mode=0o700)
        if state == "world-writable":
            where.chmod(0o1777)
        else:
            os.chown(where, nobody().pw_uid, nobody().pw_gid)
    monkeypatch.setattr(journal, "ROOT_STATE_DIR", str(where))
    with loop(backing) as dev:
        with pytest.raises(IOFailure, match=str(where)):
            api.apply(str(patch), dev)
    assert backing.read_bytes() == world.base


@needs_loop
def test_journal_option_for_a_device_refuses_a_file_another_user_owns(world: World) -> None:
    backing, patch = device_world(world)
    chosen = world.folder / "dev.journal"
    as_nobody(plant_file(chosen, forged_journal(world)))
    other = pattern(SIZE, 97)
    backing.write_bytes(other)
    with loop(backing) as dev:
        line = error_line(run_cli("apply", str(patch), dev, "--journal", str(chosen), check=False), 3)
    assert "owned by uid" in line, line
    assert backing.read_bytes() == other


# ---------------------------------------------------------------------------- images in use


@needs_loop
def test_an_image_backing_a_loop_device_is_refused(world: World) -> None:
    with loop(world.dest) as dev:
        line = error_line(run_cli("apply", str(world.patch), str(world.dest), check=False), 7)
        assert line == (f"sparsepatch: error: {world.dest}: in use: backing file of {dev}; "
                        "--allow-in-use applies anyway")
        # Found by inode, not by name: a rename after the attach does not hide it.
        moved = world.folder / "moved.img"
        world.dest.rename(moved)
        line = error_line(run_cli("apply", str(world.patch), str(moved), check=False), 7)
        assert dev in line, line
        assert moved.read_bytes() == world.base
        run_cli("apply", str(world.patch), str(moved), "--allow-in-use")
        assert moved.read_bytes() == world.target


@contextlib.contextmanager
def lock_holder(path: Path, how: str, user: str = "root") -> Iterator[int]:
    """A forked process holding a lock on path until the block ends; yields its pid.
    ofd-read: qemu's kind (OFD read locks on single bytes, from a read-only descriptor);
    posix-write: lockf; flock: flock(LOCK_EX)."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            if user == "nobody":
                _become_nobody()
            fd = os.open(path, os.O_RDWR if how == "posix-write" else os.O_RDONLY)
            if how == "ofd-read":
                for byte in (100, 201):
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_RDLCK, 0, byte, 1, 0) + bytes(8))
            elif how == "posix-write":
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported through the pipe closing early
            os.write(2, f"lock holder: {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            pytest.fail("the lock holder failed (see stderr)")
        yield pid
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("how", ["ofd-read", "posix-write"])
def test_an_image_another_program_locks_is_refused(world: World, how: str) -> None:
    user = "nobody" if how == "ofd-read" else "root"  # a reader's lock counts too: qemu -snapshot, qemu-img
    with lock_holder(world.dest, how, user) as pid:
        line = error_line(run_cli("apply", str(world.patch), str(world.dest), check=False), 7)
        assert "in use: a lock held by another process" in line and "--allow-in-use" in line, line
        if how == "posix-write":
            assert f"pid {pid}" in line, line
        else:
            assert "read lock on bytes 100-100" in line, line
        assert HELD not in line  # neither lock can pass for another apply's
        assert world.dest.read_bytes() == world.base
        run_cli("apply", str(world.patch), str(world.dest), "--allow-in-use")
    assert world.dest.read_bytes() == world.target


def any_lock(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, FLOCK.pack(fcntl.F_WRLCK, 0, 0, 0, 0) + bytes(8))
    finally:
        os.close(fd)
    return FLOCK.unpack_from(out)[0] != fcntl.F_UNLCK


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io (Debian qemu-utils) is not installed")
@pytest.mark.parametrize("mode", ["read-write", "read-only"])
def test_an_image_qemu_has_open_is_refused(world: World, mode: str) -> None:
    args = ["qemu-io", "-f", "raw", *(["-r"] if mode == "read-only" else []), "-c", "sleep 60000",
            str(world.dest)]
    q = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not any_lock(world.dest) and q.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not any_lock(world.dest):
            pytest.skip(f"qemu-io took no lock on the image: {q.communicate()[1]!r}")
        line = error_line(run_cli("apply", str(world.patch), str(world.dest), check=False), 7)
        assert "in use: a lock held by another process" in line, line
        assert world.dest.read_bytes() == world.base
    finally:
        q.kill()
        q.communicate()
    run_cli("apply", str(world.patch), str(world.dest))
    assert world.dest.read_bytes() == world.target


def lock_held(path: Path, start: int = 0) -> bool:
    """Whether a write lock from start to the end is held on path (F_OFD_GETLK only asks)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, FLOCK.pack(fcntl.F_RDLCK, 0, start, 0, 0) + bytes(8))
    finally:
        os.close(fd)
    kind, _, at, length, _ = FLOCK.unpack_from(out)
    return kind == fcntl.F_WRLCK and at == start and length == 0


def test_allow_in_use_still_keeps_two_applies_apart(world: World) -> None:
    patch = world.patch.read_bytes()
    with lock_holder(world.dest, "ofd-read", "nobody"):
        p = subprocess.Popen([sys.executable, "-m", "sparsepatch", "apply", "-", str(world.dest),
                              "--allow-in-use"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            assert p.stdin is not None
            p.stdin.write(patch[:108])
            p.stdin.flush()
            deadline = time.monotonic() + 30
            while not lock_held(world.dest, 1 << 62) and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            for extra in ([], ["--allow-in-use"]):
                line = error_line(run_cli("apply", str(world.patch), str(world.dest), *extra, check=False), 7)
                assert line == f"sparsepatch: error: {world.dest}: {HELD}", line
            _, err = p.communicate(patch[108:], timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert p.returncode == 0, err
    assert world.dest.read_bytes() == world.target


# ---------------------------------------------------------------------------- the lock


def test_a_reader_cannot_block_apply_with_flock(world: World) -> None:
    """nobody can read the image (0644), and any reader can flock it: that must not count."""
    with lock_holder(world.dest, "flock", "nobody"):
        run_cli("apply", str(world.patch), str(world.dest))
    assert world.dest.read_bytes() == world.target
