"""sparsepatch merge, through the command line, on real patches made by diff: applying the
merged patch gives what applying the chain gives, byte for byte and as sparse; it is no
larger than the patches together and smaller when later patches rewrite what earlier ones
wrote; broken and reversed chains are refused with one line and leave no output."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KiB, MiB, allocated_blocks, error_line, make_sparse, pattern, run_cli, sparse_copy

BS = 16 * KiB  # the default block size
PAGE = 4 * KiB


def write(data: bytearray, off: int, piece: bytes | int) -> None:
    if isinstance(piece, int):
        piece = bytes(piece)
    data[off : off + len(piece)] = piece


def states() -> list[bytearray]:
    """A base and three targets: rewrites of the same blocks, a swap, a shift by one page, a
    punch, a grow and a shrink."""
    a = bytearray(4 * MiB)
    for k, off in enumerate(range(0, 4 * MiB, 512 * KiB)):
        write(a, off, pattern(384 * KiB, 100 + k))  # data with a hole after each piece
    s1 = bytearray(a)
    write(s1, 0, pattern(256 * KiB, 1))  # rewritten by every patch
    write(s1, 1 * MiB, a[2 * MiB : 2 * MiB + 256 * KiB])  # a swap
    write(s1, 2 * MiB, a[1 * MiB : 1 * MiB + 256 * KiB])
    write(s1, 3 * MiB, 256 * KiB)  # a punch
    s2 = bytearray(s1)
    write(s2, 0, pattern(256 * KiB, 2))
    write(s2, 1536 * KiB + PAGE, s1[1536 * KiB : 1536 * KiB + 128 * KiB])  # a shift by a page
    s2 += bytes(MiB)  # a grow, with data at the end
    write(s2, 4 * MiB + 256 * KiB, pattern(200 * KiB, 3))
    s3 = bytearray(s2)
    write(s3, 0, pattern(128 * KiB, 4))
    write(s3, 2 * MiB + 64 * KiB, pattern(64 * KiB, 5))  # over moved content
    del s3[4 * MiB + 300 * KiB + 1000 :]  # a shrink, inside a block
    return [a, s1, s2, s3]


def make_chain(tmp: Path, images: list[bytearray], *extra: str, block_size: int = BS) -> list[Path]:
    """The patches from each image to the next, made by signature and diff."""
    patches = []
    for k in range(len(images) - 1):
        old = sparse_copy(images[k], tmp / f"s{k}.img")
        new = sparse_copy(images[k + 1], tmp / f"s{k + 1}.img")
        sig, patch = tmp / f"s{k}.sig", tmp / f"p{k + 1}.patch"
        run_cli("signature", str(old), "-o", str(sig), "-b", str(block_size))
        run_cli("diff", str(sig), str(new), "-o", str(patch), *extra)
        patches.append(patch)
    return patches


def applied(tmp: Path, base: bytes | bytearray, patches: list[Path], name: str, *extra: str) -> Path:
    dest = sparse_copy(base, tmp / name)
    for p in patches:
        run_cli("apply", str(p), str(dest), *extra)
    return dest


def merge(*args: str) -> dict[str, object]:
    out: dict[str, object] = json.loads(run_cli("merge", *args, "--json", "-q").stdout)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("merge")
    images = states()
    patches = make_chain(tmp, images)
    chained = applied(tmp, images[0], patches, "chained.img")
    return {"tmp": tmp, "images": images, "patches": patches, "chained": chained}


def test_merged_patch_applies_like_the_chain(world: dict[str, object]) -> None:
    tmp, images, patches, chained = (world["tmp"], world["images"], world["patches"],
                                     world["chained"])
    assert isinstance(tmp, Path) and isinstance(patches, list) and isinstance(images, list)
    assert isinstance(chained, Path)
    merged = tmp / "merged.patch"
    stats = merge(*map(str, patches), "-o", str(merged))
    assert stats["moved_pages"] and stats["stage_pages"]  # the swap and shift stay moves
    dest = applied(tmp, images[0], [merged], "merged.img", "--verify")
    assert dest.read_bytes() == chained.read_bytes() == images[-1]
    assert allocated_blocks(dest, BS) == allocated_blocks(chained, BS)
    total = sum(p.stat().st_size for p in patches)
    assert merged.stat().st_size < total  # the first blocks were rewritten by every patch
    run_cli("verify", str(merged))
    info = json.loads(run_cli("info", str(merged), "--json").stdout)
    first = json.loads(run_cli("info", str(patches[0]), "--json").stdout)
    last = json.loads(run_cli("info", str(patches[-1]), "--json").stdout)
    assert (info["base_identity"], info["target_identity"]) == (first["base_identity"],
                                                                 last["target_identity"])
    assert (info["base_size"], info["target_size"]) == (4 * MiB, len(images[-1]))
    # Applying it again changes nothing: the destination is the target.
    run_cli("apply", str(merged), str(dest))
    assert dest.read_bytes() == images[-1]


def test_4k_blocks_one_page_each(tmp_path: Path) -> None:
    images = states()
    patches = make_chain(tmp_path, images, block_size=4096)
    merged = tmp_path / "m.patch"
    stats = merge(*map(str, patches), "-o", str(merged))
    assert stats["moved_pages"]
    dest = applied(tmp_path, images[0], [merged], "dest.img", "--verify")
    chained = applied(tmp_path, images[0], patches, "chained.img")
    assert dest.read_bytes() == chained.read_bytes() == images[-1]
    assert allocated_blocks(dest, 4096) == allocated_blocks(chained, 4096)
    assert merged.stat().st_size < sum(p.stat().st_size for p in patches)


def test_merged_size_is_at_most_the_sum(world: dict[str, object], tmp_path: Path) -> None:
    patches = world["patches"]
    assert isinstance(patches, list)
    for pair in (patches[:2], patches[1:]):
        out = tmp_path / "m.patch"
        merge(*map(str, pair), "-o", str(out))
        assert out.stat().st_size <= sum(p.stat().st_size for p in pair)


def test_a_chain_ending_with_an_undo_leads_back(world: dict[str, object], tmp_path: Path) -> None:
    images, patches = world["images"], world["patches"]
    assert isinstance(images, list) and isinstance(patches, list)
    dest = sparse_copy(images[0], tmp_path / "dest.img")
    undo = tmp_path / "p2.undo"
    run_cli("apply", str(patches[0]), str(dest))
    run_cli("apply", str(patches[1]), str(dest), "--undo", str(undo))
    merged = tmp_path / "m.patch"
    merge(str(patches[0]), str(patches[1]), str(undo), "-o", str(merged))
    out = applied(tmp_path, images[0], [merged], "out.img", "--verify")
    assert out.read_bytes() == images[1]
    assert allocated_blocks(out, BS) == allocated_blocks(
        applied(tmp_path, images[0], patches[:1], "ref.img"), BS)
    # The undo of the last patch cancels it: the merged patch is about the first alone.
    assert merged.stat().st_size <= patches[0].stat().st_size + 4 * KiB


@pytest.mark.parametrize("order", ["broken", "reversed"])
def test_a_broken_or_reversed_chain_is_refused(world: dict[str, object], tmp_path: Path,
                                               order: str) -> None:
    patches = world["patches"]
    assert isinstance(patches, list)
    a, b = (patches[0], patches[2]) if order == "broken" else (patches[1], patches[0])
    out = tmp_path / "m.patch"
    line = error_line(run_cli("merge", str(a), str(b), "-o", str(out), check=False), 5)
    ida = json.loads(run_cli("info", str(a), "--json").stdout)["target_identity"]
    idb = json.loads(run_cli("info", str(b), "--json").stdout)["base_identity"]
    assert f"{b} does not follow {a}" in line, line
    assert ida[:16] in line and idb[:16] in line, line
    assert list(tmp_path.iterdir()) == []  # no output, no temporary left


def test_authenticated_chain_gives_an_authenticated_merge(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    images = states()[:3]
    patches = make_chain(tmp_path, images, "-k", str(key))
    merged = tmp_path / "m.patch"
    merge("-k", str(key), *map(str, patches), "-o", str(merged))
    assert json.loads(run_cli("info", str(merged), "--json").stdout)["authenticated"]
    run_cli("verify", "-k", str(key), str(merged))
    dest = applied(tmp_path, images[0], [merged], "dest.img", "-k", str(key))
    assert dest.read_bytes() == images[-1]
    other = tmp_path / "other"
    other.write_bytes(b"o" * 32)
    line = error_line(run_cli("apply", "-k", str(other), str(merged), str(dest), check=False), 4)
    assert "MAC mismatch" in line, line
    # Without the key, the inputs are not taken on trust.
    error_line(run_cli("merge", *map(str, patches), "-o", str(tmp_path / "x.patch"),
                       check=False), 4)
    assert not (tmp_path / "x.patch").exists()


def test_split_inputs_and_a_merged_patch_on_stdout_applied_from_a_stream(
        world: dict[str, object], tmp_path: Path) -> None:
    images, patches = world["images"], world["patches"]
    assert isinstance(images, list) and isinstance(patches, list)
    split = tmp_path / "p1s.patch"
    run_cli("diff", str(world["tmp"] / "s0.sig"), str(world["tmp"] / "s1.img"),  # type: ignore[operator]
            "-o", str(split), "--split", "64K")
    pieces = sorted(tmp_path.glob("p1s.patch.*"))
    assert len(pieces) > 1
    merged = run_cli("merge", str(pieces[0]), *map(str, patches[1:]), "-q").stdout
    dest = sparse_copy(images[0], tmp_path / "dest.img")
    subprocess.run([sys.executable, "-m", "sparsepatch", "apply", "-", str(dest)], input=merged,
                   check=True, capture_output=True)
    assert dest.read_bytes() == images[-1]
    # --split for the output, as diff writes it.
    out = tmp_path / "m.patch"
    merge(*map(str, patches), "-o", str(out), "--split", "64K")
    pieces = sorted(tmp_path.glob("m.patch.*"))
    assert len(pieces) > 1
    assert b"".join(p.read_bytes() for p in pieces) == merged


def copy_states(second: str) -> list[bytearray]:
    """A base, a target that copies whole blocks (diff writes COPY records), and a second
    target that leaves the copied blocks' source alone ("keep"), shifts it by a page
    ("shift": its pages move, and the patch gives their hashes) or rewrites it ("rewrite")."""
    a = bytearray(2 * MiB)
    write(a, 0, pattern(MiB, 7))
    s1 = bytearray(a)
    write(s1, MiB + 256 * KiB, a[128 * KiB : 256 * KiB])  # blocks 8..15 copied to 80..87
    write(s1, 512 * KiB, pattern(64 * KiB, 8))
    s2 = bytearray(s1)
    write(s2, 1536 * KiB, pattern(64 * KiB, 9))
    if second == "shift":
        write(s2, 128 * KiB + PAGE, s1[128 * KiB : 256 * KiB])
    elif second == "rewrite":
        write(s2, 128 * KiB, pattern(128 * KiB, 11))
    return [a, s1, s2]


@pytest.mark.parametrize("second", ["keep", "shift"])
def test_copy_records_merge(tmp_path: Path, second: str) -> None:
    images = copy_states(second)
    patches = make_chain(tmp_path, images)
    assert json.loads(run_cli("info", str(patches[0]), "--json").stdout)["blocks"]["copy"] == 8
    merged = tmp_path / "m.patch"
    stats = merge(*map(str, patches), "-o", str(merged))
    # Kept: still a COPY. Its source shifted later: its pages are moved from the base.
    assert stats["copy_blocks"] == (8 if second == "keep" else 0)
    dest = applied(tmp_path, images[0], [merged], "dest.img", "--verify")
    chained = applied(tmp_path, images[0], patches, "chained.img")
    assert dest.read_bytes() == chained.read_bytes() == images[-1]
    assert allocated_blocks(dest, BS) == allocated_blocks(chained, BS)


def test_a_copy_whose_source_is_rewritten_is_refused_with_what_to_do(tmp_path: Path) -> None:
    patches = make_chain(tmp_path, copy_states("rewrite"))
    out = tmp_path / "m.patch"
    line = error_line(run_cli("merge", *map(str, patches), "-o", str(out), check=False), 2)
    assert "apply the patches in turn" in line, line
    assert not out.exists()


def test_a_shrink_then_a_grow_over_blocks_a_patch_rewrote(tmp_path: Path) -> None:
    a = bytearray(MiB)
    write(a, 0, pattern(MiB, 20))
    s1 = bytearray(a)
    write(s1, 768 * KiB, pattern(256 * KiB, 21))  # every block that the shrink cuts off
    s2 = s1[: 768 * KiB]
    s3 = bytearray(s2) + bytes(256 * KiB)
    write(s3, 800 * KiB, pattern(64 * KiB, 22))
    images = [a, s1, s2, s3]
    patches = make_chain(tmp_path, images)
    merged = tmp_path / "m.patch"
    merge(*map(str, patches), "-o", str(merged))
    dest = applied(tmp_path, images[0], [merged], "dest.img", "--verify")
    chained = applied(tmp_path, images[0], patches, "chained.img")
    assert dest.read_bytes() == chained.read_bytes() == images[-1]
    assert allocated_blocks(dest, BS) == allocated_blocks(chained, BS)


def test_a_grow_over_blocks_no_patch_described_is_refused(tmp_path: Path) -> None:
    a = bytearray(MiB)
    write(a, 0, pattern(MiB, 23))
    s1 = a[: 512 * KiB]  # cuts off blocks whose content no patch gives
    s2 = bytearray(s1) + bytes(512 * KiB)
    patches = make_chain(tmp_path, [a, s1, s2])
    out = tmp_path / "m.patch"
    line = error_line(run_cli("merge", *map(str, patches), "-o", str(out), check=False), 2)
    assert "cut off by a shrink" in line and "apply the patches in turn" in line, line
    assert not out.exists()


def test_one_patch_from_standard_input(world: dict[str, object], tmp_path: Path) -> None:
    images, patches = world["images"], world["patches"]
    assert isinstance(images, list) and isinstance(patches, list)
    out = tmp_path / "m.patch"
    run_cli("merge", str(patches[0]), "-", str(patches[2]), "-o", str(out),
            input=patches[1].read_bytes())
    dest = applied(tmp_path, images[0], [out], "dest.img")
    assert dest.read_bytes() == images[-1]
    line = error_line(run_cli("merge", "-", "-", "-o", str(out), check=False), 2)
    assert "only one of the patches can be standard input" in line, line


def test_a_chain_from_a_full_patch_merges_into_a_full_patch(world: dict[str, object],
                                                             tmp_path: Path) -> None:
    images, patches, tmp = world["images"], world["patches"], world["tmp"]
    assert isinstance(images, list) and isinstance(patches, list) and isinstance(tmp, Path)
    first = tmp_path / "first.patch"
    run_cli("diff", "--full", str(tmp / "s0.img"), "-o", str(first))
    merged = tmp_path / "m.patch"
    merge(str(first), *map(str, patches), "-o", str(merged))
    assert json.loads(run_cli("info", str(merged), "--json").stdout)["full"]
    dest = tmp_path / "new.img"
    run_cli("apply", str(merged), str(dest), "--verify")
    assert dest.read_bytes() == images[-1]
    assert allocated_blocks(dest, BS) == allocated_blocks(world["chained"], BS)  # type: ignore[arg-type]


def test_other_block_sizes_and_a_later_full_patch_are_usage_errors(world: dict[str, object],
                                                                  tmp_path: Path) -> None:
    patches, tmp = world["patches"], world["tmp"]
    assert isinstance(patches, list) and isinstance(tmp, Path)
    small = make_chain(tmp_path, states()[:2], block_size=4096)[0]
    line = error_line(run_cli("merge", str(patches[0]), str(small), "-o", str(tmp_path / "m"),
                              check=False), 2)
    assert "share a block size" in line, line
    full = tmp_path / "full.patch"
    run_cli("diff", "--full", str(tmp / "s1.img"), "-o", str(full))
    line = error_line(run_cli("merge", str(patches[0]), str(full), "-o", str(tmp_path / "m"),
                              check=False), 2)
    assert f"{full} is a full patch" in line, line
    assert not (tmp_path / "m").exists()


def _random_step(rng: random.Random, data: bytearray, bs: int) -> bytearray:
    """data after 1..4 random changes: new data, content moved (by pages or not), zeros, a
    grow, a shrink, a whole block copied."""
    d = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, n = rng.choice(["rewrite", "move", "punch", "grow", "shrink", "copy"]), len(d)
        if op == "rewrite" and n:
            off = rng.randrange(n)
            write(d, off, pattern(min(rng.randint(1, 64 * KiB), n - off), rng.randrange(1000)))
        elif op == "move" and n > 64 * KiB:
            ln = rng.choice([PAGE, 16 * KiB, 40 * KiB])
            src, dst = rng.randrange(n - ln), rng.randrange(n - ln)
            if rng.random() < 0.5:
                src, dst = src // PAGE * PAGE, dst // PAGE * PAGE
            write(d, dst, bytes(d[src : src + ln]))
        elif op == "punch" and n:
            off = rng.randrange(n)
            write(d, off, min(rng.randint(1, 64 * KiB), n - off))
        elif op == "grow":
            d += bytes(rng.randint(1, 100 * KiB))
            off = rng.randrange(n, len(d))
            write(d, off, pattern(min(rng.randint(1, 40 * KiB), len(d) - off), rng.randrange(1000)))
        elif op == "shrink" and n > 64 * KiB:
            del d[rng.randrange(n // 2, n) :]
        elif op == "copy" and n > 4 * bs:
            s, t = rng.randrange(n // bs - 1), rng.randrange(n // bs - 1)
            write(d, t * bs, bytes(d[s * bs : (s + 1) * bs]))
    return d


@pytest.mark.parametrize("bs", [4096, BS])
def test_random_chains_merge_or_are_refused_with_what_to_do(tmp_path: Path, bs: int) -> None:
    """Random three-patch chains (in-process, so that many are fast): the merged patch
    applies like the chain, byte for byte and block for block allocated, or merge refuses
    one of the two states spec 5.6 names."""
    from sparsepatch import api
    from sparsepatch.errors import UsageError

    def image(data: bytes | bytearray, path: Path) -> Path:
        return make_sparse(path, len(data), [(o, bytes(data[o : o + bs]))
                                             for o in range(0, len(data), bs) if any(data[o : o + bs])])

    merged = 0
    for seed in range(24):
        rng = random.Random(seed)
        tmp = tmp_path / str(seed)
        tmp.mkdir()
        a = bytearray(rng.randint(64, 512) * KiB)
        for _ in range(rng.randint(1, 5)):
            off = rng.randrange(len(a))
            write(a, off, pattern(min(rng.randint(1, 128 * KiB), len(a) - off), rng.randrange(1000)))
        images = [a]
        for _ in range(3):
            images.append(_random_step(rng, images[-1], bs))
        patches = []
        for k in range(3):
            old, new = image(images[k], tmp / f"s{k}.img"), image(images[k + 1], tmp / f"s{k + 1}.img")
            api.signature(str(old), str(tmp / f"s{k}.sig"), block_size=bs)
            api.diff(str(tmp / f"s{k}.sig"), str(new), str(tmp / f"p{k}.patch"))
            patches.append(str(tmp / f"p{k}.patch"))
        try:
            api.merge(patches, str(tmp / "m.patch"))
        except UsageError as e:
            assert "apply the patches in turn" in str(e), (seed, str(e))
            continue
        merged += 1
        chained, one = image(a, tmp / "chained.img"), image(a, tmp / "one.img")
        for p in patches:
            api.apply(p, str(chained))
        api.apply(str(tmp / "m.patch"), str(one))
        assert one.read_bytes() == chained.read_bytes() == images[-1], seed
        assert allocated_blocks(one, bs) == allocated_blocks(chained, bs), seed
    assert merged >= 12  # most chains merge; the rest cut off blocks and grow them back
