"""The ssh pipeline from the README, through a real OpenSSH server on 127.0.0.1:

    sparsepatch signature img | ssh src sparsepatch diff - img | sparsepatch apply - img
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import KiB, MiB, allocated, make_sparse, pattern

BS = 64 * KiB
SSHD = "/usr/sbin/sshd"
CLI = Path(sys.executable).parent / "sparsepatch"  # the console script a user runs


@dataclass
class Server:
    port: int
    key: Path

    def ssh(self) -> str:
        """The ssh command line (without the remote command) as a shell string."""
        return shlex.join([
            "ssh", "-F", "/dev/null", "-p", str(self.port), "-i", str(self.key),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
            "127.0.0.1",
        ])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    for tool in (SSHD, "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian packages openssh-server, openssh-client)")
    if not CLI.exists():
        pytest.skip(f"no console script at {CLI}: install the package (pip install -e .)")
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / name)],
                       check=True, capture_output=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    port = _free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "StrictModes no\n"
        "UsePAM no\n"
        "LogLevel ERROR\n"
    )
    log = open(d / "sshd.log", "wb")  # closed in teardown
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                why = (d / "sshd.log").read_text(errors="replace").strip()[-300:]
                pytest.skip(f"sshd did not start on 127.0.0.1:{port}: {why or 'no output'}")
            time.sleep(0.05)
        server = Server(port, d / "client_key")
        r = subprocess.run(f"{server.ssh()} true", shell=True, capture_output=True, timeout=30)
        if r.returncode != 0:
            pytest.skip(f"cannot log in to the test sshd: {r.stderr.decode(errors='replace').strip()}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def pipeline(server: Server, dest: Path, source: Path,
             *apply_args: str) -> subprocess.CompletedProcess[bytes]:
    cli = shlex.quote(str(CLI))
    remote = shlex.quote(f"{cli} diff - {shlex.quote(str(source))}")
    cmd = (f"{cli} signature {shlex.quote(str(dest))} | {server.ssh()} {remote} | "
           f"{cli} apply - {shlex.quote(str(dest))} {shlex.join(apply_args)}")
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, timeout=120)


def test_signature_ssh_diff_apply_pipeline(sshd: Server, tmp: Path) -> None:
    size = 64 * MiB
    dest = make_sparse(tmp / "dest.img", size, [
        (0, 4 * BS), (MiB, 8 * BS), (10 * MiB, 16 * BS), (40 * MiB, 4 * BS),
    ])
    source = make_sparse(tmp / "source.img", size, [
        (0, pattern(4 * BS, 0)),                 # unchanged
        (MiB, 8 * BS + 123),                     # changed, ends inside a block
        (20 * MiB, pattern(16 * BS, 10 * MiB)),  # moved: copies of the destination's blocks
        (40 * MiB + BS, 2 * BS),                 # partly changed; the rest of that run zeroed
        (size - 4096, 4096),                     # new at the very end
    ])
    r = pipeline(sshd, dest, source, "--verify")
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == source.read_bytes()
    assert allocated(dest) <= allocated(source) + 2 * BS
    assert b"apply: " in r.stderr and b"verified" in r.stderr

    # Once more: nothing changes and nothing is written.
    before = os.stat(dest).st_blocks
    r = pipeline(sshd, dest, source)
    assert r.returncode == 0, r.stderr
    assert b" 0 blocks written, 0 punched, 0 copied" in r.stderr
    assert dest.read_bytes() == source.read_bytes()
    assert os.stat(dest).st_blocks == before


def test_remote_failure_leaves_destination_untouched(sshd: Server, tmp: Path) -> None:
    dest = make_sparse(tmp / "dest.img", 8 * MiB, [(0, 4 * BS), (2 * MiB, BS)])
    before = dest.read_bytes()
    r = pipeline(sshd, dest, tmp / "no-such-source.img")
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "sparsepatch: error:" in err and "no-such-source.img" in err  # the remote side's error
    assert dest.read_bytes() == before
    assert not list(tmp.glob(".dest.img.*")), "apply left a journal or temporary file behind"
