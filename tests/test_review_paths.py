"""Another local user (nobody) against a root apply, diff or merge: the ways around the
protected_symlinks rule of paths.open_dir, and the modes of merge's outputs, that a review
found open."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import error_line, run_cli
from test_paths import _update, needs_root, plant


@pytest.fixture
def shared() -> Iterator[Path]:
    """As test_paths': a sticky folder like /tmp (shared/), one only root writes
    (private/), under a folder nobody can reach."""
    d = Path(tempfile.mkdtemp(prefix="sparsepatch-review-", dir="/tmp"))
    d.chmod(0o755)
    (d / "shared").mkdir()
    (d / "shared").chmod(0o1777)
    (d / "private").mkdir()
    (d / "private").chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@needs_root
def test_a_destination_link_whose_folder_is_a_planted_link_is_refused(shared: Path) -> None:
    """Root's own link names its image through /tmp (a folder there, since cleaned away);
    nobody puts a link of theirs at that folder's name. Before: the link's folders were
    looked up by the kernel, and root patched the image the planted link led to."""
    base, _, patch = _update(shared)
    before = base.read_bytes()
    shutil.copy(base, shared / "private" / "vm.img")
    home = shared / "home"
    home.mkdir()
    os.symlink(shared / "shared" / "build" / "vm.img", home / "vm.img")
    os.symlink("build/vm.img", shared / "shared" / "vm.img")  # relative, in the sticky folder
    plant(shared / "shared" / "build", shared / "private")
    for dest in (home / "vm.img", shared / "shared" / "vm.img"):
        r = run_cli("apply", "-q", str(patch), str(dest), check=False)
        assert "refusing to follow the symbolic link 'build' owned by uid" in error_line(r, 3), dest
    assert (shared / "private" / "vm.img").read_bytes() == before
    assert os.listdir(shared / "private") == ["vm.img"]
    # The same link through a folder of root's is followed, as before.
    os.unlink(shared / "shared" / "build")
    os.symlink(shared / "private", shared / "shared" / "build")
    run_cli("apply", "-q", str(patch), str(home / "vm.img"))
    assert (shared / "private" / "vm.img").read_bytes() != before

