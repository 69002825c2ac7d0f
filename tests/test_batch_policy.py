"""The CPU batch-size policy: chosen from measured per-image times (injected here, never timed in a test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.core import batch_policy
from app.core.batch_policy import BatchPolicy, choose_batch_size, ladder, measure, plan
from tests.conftest import export_tiny_model
from tests.live_server import live_server, metric_samples, serving_settings


def test_ladder_doubles_up_to_and_including_the_maximum() -> None:
    assert ladder(1) == [1]
    assert ladder(6) == [1, 2, 4, 6]
    assert ladder(32) == [1, 2, 4, 8, 16, 32]


def test_batch_one_is_chosen_when_it_is_fastest_per_image() -> None:
    # The measurement on this CPU: batch 8 halves throughput.
    assert choose_batch_size({1: 1 / 3.47, 2: 1 / 2.9, 4: 1 / 2.2, 8: 1 / 1.76}) == 1


def test_the_largest_batch_within_the_tolerance_of_the_best_is_kept() -> None:
    assert choose_batch_size({1: 0.200, 2: 0.205, 4: 0.260}) == 2  # 2 is 2.5 % slower: same throughput
    assert choose_batch_size({1: 0.200, 2: 0.215}) == 1  # 7.5 % slower per image: it loses
    assert choose_batch_size({1: 0.010, 2: 0.006, 4: 0.004, 8: 0.0041, 16: 0.0050}) == 8  # batching helps
    assert choose_batch_size({1: 0.2, 2: 0.25}, tolerance=0.3) == 2


def test_choosing_from_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no batch size"):
        choose_batch_size({})


class FakeClock:
    """Advances only when the measured work 'runs', so the measurement logic is tested without timing."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_measure_keeps_the_fastest_run_and_stops_within_budget() -> None:
    clock = FakeClock()
    cost = {1: [0.5, 0.3, 0.2], 2: [0.5, 0.6, 0.8], 4: [2.0, 2.0]}  # seconds per call, by call
    calls: list[int] = []

    def run(size: int) -> None:
        calls.append(size)
        clock.now += cost[size][calls.count(size) - 1]

    result = measure(run, max_batch_size=8, budget_s=3.0, clock=clock)
    # First pass: batch 1 0.3 s per image (faster of two), batch 2 0.25 (1.9 s spent). Batch 4 would
    # need about 2 x 0.25 x 4 = 2 s more: over the 3 s budget, skipped. One more round fits (0.3 + 0.5
    # estimated): batch 1 gets faster (0.2), batch 2 does not (0.4 per image); then 2.9 s are spent
    # and the next round (0.2 + 0.5) would cross the budget.
    assert result == {1: pytest.approx(0.2), 2: pytest.approx(0.25)}
    assert calls == [1, 1, 2, 2, 1, 2]


def test_measure_stops_repeating_when_the_clock_does_not_move() -> None:
    calls: list[int] = []
    assert measure(calls.append, max_batch_size=2, budget_s=1.0, clock=lambda: 0.0) == {1: 0.0, 2: 0.0}
    assert len(calls) == 4 + 2 * batch_policy.SETTLED_ROUNDS  # bounded even with free passes


def test_measure_ends_early_once_the_choice_has_settled() -> None:
    """A fast model: batch 4 wins from the first pass on, so 5 confirming rounds end the probe, not the budget."""
    clock = FakeClock()
    per_image = {1: 0.010, 2: 0.006, 4: 0.004}
    calls: list[int] = []

    def run(size: int) -> None:
        calls.append(size)
        clock.now += per_image[size] * size

    assert measure(run, max_batch_size=4, budget_s=3.0, clock=clock) == pytest.approx(per_image)
    assert len(calls) == 2 * 3 + 3 * batch_policy.SETTLED_ROUNDS
    assert clock.now < 0.3  # of a 3 s budget


def test_measure_keeps_going_while_the_choice_moves() -> None:
    """Batch 2 looks best only after batch 1's first runs were preempted: the count restarts when the choice moves."""
    clock = FakeClock()
    batch_one = iter([0.050, 0.050, 0.050, 0.050, 0.050, 0.050, 0.010])  # preempted until its 5th extra round
    calls: list[int] = []

    def run(size: int) -> None:
        calls.append(size)
        clock.now += next(batch_one, 0.010) if size == 1 else 0.020 * size

    assert measure(run, max_batch_size=2, budget_s=10.0, clock=clock) == pytest.approx({1: 0.010, 2: 0.020})
    # Choice 2 for 4 extra rounds, then 1 at the 5th (a change), then 5 unchanged rounds: 10 extra rounds.
    assert calls.count(1) == 2 + 10


def test_measure_always_measures_batch_one_even_over_budget() -> None:
    clock = FakeClock()

    def run(size: int) -> None:
        clock.now += 10.0 * size

    assert measure(run, max_batch_size=32, budget_s=0.1, clock=clock) == {1: 10.0}


class ProbeEngine:
    """Just enough of an engine for ``plan``: a device, an input size and a forward pass that does nothing."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.input_size = 8
        self.calls: list[int] = []

    def infer(self, pixels: torch.Tensor) -> list[None]:
        self.calls.append(len(pixels))
        return []


def test_plan_on_the_cpu_takes_batch_one_from_injected_timings_and_never_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    timings = {1: 0.29, 2: 0.35, 4: 0.45, 8: 0.57}  # seconds per image: batching loses (the CPU)
    monkeypatch.setattr(batch_policy, "measure", lambda run, max_batch_size, budget_s: timings)
    policy = plan(ProbeEngine("cpu"), max_batch_size=8, max_wait_s=None, probe_s=3.0)  # type: ignore[arg-type]
    assert policy == BatchPolicy(1, 0.0, "measured", timings)


def test_plan_on_a_gpu_keeps_the_configured_batch_and_waits_a_little() -> None:
    engine = ProbeEngine("cuda")
    policy = plan(engine, max_batch_size=128, max_wait_s=None, probe_s=3.0)  # type: ignore[arg-type]
    assert policy == BatchPolicy(128, 0.005, "configured")
    assert engine.calls == []  # nothing timed on a GPU
    assert plan(engine, 64, 0.002, 3.0).max_wait_s == 0.002  # type: ignore[arg-type]


def test_plan_with_the_probe_off_uses_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_policy, "measure", lambda *args, **kwargs: pytest.fail("the probe is off"))
    assert plan(ProbeEngine("cpu"), 8, None, 0.0) == BatchPolicy(8, 0.0, "configured")  # type: ignore[arg-type]


def test_a_live_cpu_server_reports_the_measured_batch_size_everywhere(tmp_path: Path) -> None:
    """/health, /model and the metric agree on the size the startup probe chose (whatever it measured)."""
    weights = export_tiny_model(tmp_path / "weights")
    settings = serving_settings(weights, max_batch_size=4, batch_probe_s=0.5)
    with live_server(settings) as server, server.client() as client:
        card = client.get("/model").json()["batching"]
        health = client.get("/health").json()
        metric = metric_samples(client.get("/metrics").text, "cxr_batch_size_limit")
    assert card["source"] == "measured" and card["max_wait_ms"] == 0.0
    assert set(card["ms_per_image"]) <= {"1", "2", "4"} and "1" in card["ms_per_image"]
    assert str(card["batch_size"]) in card["ms_per_image"]
    assert health["batch_size"] == card["batch_size"] == metric[""]
