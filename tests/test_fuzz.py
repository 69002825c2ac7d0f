"""The decoder fuzz harness in CI: a bounded run per format, and every input that ever broke a decoder.

A longer run is ``make fuzz`` (``python -m tests.fuzz_decoders``); whatever it finds is added to
``FOUND`` below as ``(format, seed, index)`` (the harness regenerates the exact bytes) once fixed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.core.decode_pool import DecodePool
from tests import fuzz_decoders
from tests.hostile_inputs import lossless_without_huffman_table

MUTATIONS_PER_FORMAT = 150
# Findings of earlier fuzz runs, regenerated from the harness: (format, seed, mutant index).
FOUND: list[tuple[str, int, int]] = []


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    with DecodePool(2, fuzz_decoders.INPUT_SIZE, max_decode_bytes=64 * 1024 * 1024, timeout_s=30) as running:
        yield running


def test_every_seed_is_a_valid_image(pool: DecodePool) -> None:
    """Mutating a file the decoders already refuse would test nothing but the refusal."""
    for fmt, data in fuzz_decoders.SEEDS.items():
        assert fuzz_decoders.classify(pool, data) == ("ok", ""), fmt


def test_mutants_are_deterministic() -> None:
    assert fuzz_decoders.mutant("jpeg-baseline", 3, 17) == fuzz_decoders.mutant("jpeg-baseline", 3, 17)
    assert fuzz_decoders.mutant("jpeg-baseline", 3, 17) != fuzz_decoders.mutant("jpeg-baseline", 3, 18)


def test_bounded_fuzz_run_finds_nothing(pool: DecodePool) -> None:
    outcomes, findings = fuzz_decoders.fuzz(pool, sorted(fuzz_decoders.SEEDS), MUTATIONS_PER_FORMAT, seed=1)
    assert findings == []
    for fmt, counts in outcomes.items():
        assert counts.total() == MUTATIONS_PER_FORMAT
        assert counts["corrupt_image"] > 0, fmt  # the mutations do reach the decoders' error paths


def test_a_crash_is_reported_as_a_finding_not_fatal(pool: DecodePool) -> None:
    """The harness's own detector: a decoder that dies is one finding, and the run goes on."""
    workers = [pool._idle.get() for _ in range(pool.size)]
    workers[0].process.kill()  # as a segfault would, before the first mutant reaches it
    workers[0].process.join()
    for worker in workers:
        pool._idle.put(worker)
    outcomes, findings = fuzz_decoders.fuzz(pool, ["jpeg-baseline"], 4, seed=1)
    assert outcomes["jpeg-baseline"].total() == 4
    assert [(finding.kind, finding.index) for finding in findings] == [("crash", 0)]
    assert "SIGKILL" in findings[0].detail


@pytest.mark.parametrize("found", FOUND, ids=lambda found: f"{found[0]}-{found[1]}-{found[2]}")
def test_earlier_findings_stay_fixed(pool: DecodePool, found: tuple[str, int, int]) -> None:
    outcome, detail = fuzz_decoders.classify(pool, fuzz_decoders.mutant(*found))
    assert outcome not in fuzz_decoders.FINDINGS, detail


def test_the_issue_crash_input_is_no_finding(pool: DecodePool) -> None:
    assert fuzz_decoders.classify(pool, lossless_without_huffman_table())[0] == "corrupt_image"
