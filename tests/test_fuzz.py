"""A sample of the mutation fuzzer in fuzz_main.py, driven by Hypothesis (which shrinks a
failing case to its simplest mutations): the signature decoder, the patch decoder and apply
(from a file and from stdin) must refuse damaged input with a SparsePatchError, in time, and
leave the destination as the base, the target, or (from stdin) whole blocks of either.
`make fuzz` runs the full fuzzer."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fuzz_main as fm
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from sparsepatch.errors import FormatError

EXAMPLES_PER_TARGET = 75  # 300 in all


class Draw:
    """fuzz_main's Chooser over Hypothesis draws."""

    def __init__(self, data: st.DataObject):
        self.data = data

    def choice(self, seq: Any) -> Any:
        return self.data.draw(st.sampled_from(seq))

    def randrange(self, stop: int) -> int:
        return self.data.draw(st.integers(0, stop - 1))

    def randint(self, a: int, b: int) -> int:
        return self.data.draw(st.integers(a, b))

    def randbytes(self, n: int) -> bytes:
        return self.data.draw(st.binary(min_size=n, max_size=n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> fm.Corpus:
    return fm.build_corpus(tmp_path_factory.mktemp("fuzz-corpus"))


@pytest.mark.parametrize("target", fm.TARGETS)
@settings(max_examples=EXAMPLES_PER_TARGET, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_damaged_input_is_refused_cleanly(corpus: fm.Corpus, target: str, data: st.DataObject) -> None:
    items = corpus.for_target(target)
    item = items[data.draw(st.integers(0, len(items) - 1), label="input")]
    ops = fm.random_ops(Draw(data), item)
    note(f"{target} on {item.name}, ops {ops}")
    outcome, failure = fm.run_case(corpus, target, item, ops)
    assert failure is None, f"{outcome}: {failure}"


# ---------------------------------------------------------------------------- the harness


def test_undamaged_inputs_are_accepted_and_give_the_target(corpus: fm.Corpus) -> None:
    for target in fm.TARGETS:
        for item in corpus.for_target(target):
            assert fm.run_case(corpus, target, item, []) == ("accepted", None), (target, item.name)
            if target.startswith("apply"):
                assert item.pair is not None
                assert (corpus.folder / "work" / "dest.img").read_bytes() == item.pair.target


def test_every_kind_of_mutation_changes_the_input(corpus: fm.Corpus) -> None:
    seen = set()
    # mixed.patch has every record kind but STAGE; moves.patch has moved sources to change.
    for name in ("mixed.patch", "moves.patch"):
        item = next(i for i in corpus.of("patch") if i.name == name)
        for seed in range(400):
            for op in fm.random_ops(random.Random(seed), item):
                if op[0] in seen or op[0] == "fixcrc":
                    continue
                if fm.mutate(item, [op], corpus.of("patch")) != item.data:
                    seen.add(op[0])
    assert seen == set(fm.BYTE_OPS) | set(fm.RECORD_OPS)


def test_a_crash_is_reported(corpus: fm.Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    item = corpus.of("signature")[0]

    def crash(read: Any, name: str) -> None:
        raise IndexError("boom")

    monkeypatch.setattr(fm, "read_signature", crash)
    outcome, failure = fm.run_case(corpus, "signature", item, [])
    assert outcome == "CRASH IndexError" and failure is not None and "boom" in failure

    def refuse(read: Any, name: str) -> None:
        raise FormatError("refused")

    monkeypatch.setattr(fm, "read_signature", refuse)
    assert fm.run_case(corpus, "signature", item, []) == ("refused FormatError", None)


def test_a_hang_is_reported(corpus: fm.Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "read_signature", lambda read, name: time.sleep(60))
    outcome, failure = fm.run_case(corpus, "signature", corpus.of("signature")[0], [], timeout=0.5)
    assert outcome == "TIMEOUT" and failure is not None


@pytest.mark.parametrize("stream", [False, True])
def test_a_damaged_destination_is_reported(corpus: fm.Corpus, monkeypatch: pytest.MonkeyPatch,
                                           stream: bool) -> None:
    def half_apply(patch: str, dest: str, **kw: Any) -> None:
        with open(dest, "r+b") as f:
            f.write(b"torn")  # the first block: neither base nor target
        raise FormatError("refused after writing")

    monkeypatch.setattr(fm.api, "apply", half_apply)
    item = next(i for i in corpus.of("patch") if i.name == "mixed.patch")
    outcome, failure = fm.run_case(corpus, "apply-stdin" if stream else "apply-file", item, [])
    assert outcome == "BAD DESTINATION" and failure is not None


def test_the_command_line_counts_outcomes() -> None:
    r = subprocess.run([sys.executable, str(Path(fm.__file__)), "--cases", "40", "--seed", "7"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\S+) +(\d+): ", r.stdout, re.M)}
    assert counts == {t: 10 for t in fm.TARGETS}, r.stdout
    assert "0 failures" in r.stdout
