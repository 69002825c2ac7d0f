"""The dynamic batcher with a fake engine: grouping, isolation of cancelled work, failures, draining."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Sequence

import pytest
import torch

from app.api.batching import DynamicBatcher, InferenceFailedError, QueueFullError, ShuttingDownError
from app.api.telemetry import Metrics
from app.core.engine import ImageResult


class FakeEngine:
    """Scores an image as its pixel value / 255, so each result can be traced back to its input."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.explain: list[list[bool]] = []
        self.threads: list[str] = []
        self.fail = False
        self.short = False  # return one result fewer than asked for
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(items))

    def infer(self, pixels: torch.Tensor, explain: Sequence[bool]) -> list[ImageResult]:
        self.entered.set()
        assert self.hold.wait(10)
        self.batch_sizes.append(len(pixels))
        self.explain.append(list(explain))
        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("device lost")
        results = [ImageResult(float(image[0, 0, 0]) / 255) for image in pixels]
        return results[:-1] if self.short else results


def image(value: int) -> torch.Tensor:
    return torch.full((1, 4, 4), value, dtype=torch.uint8)


async def probability(pending: Awaitable[ImageResult]) -> float:
    return (await pending).probability


def make_batcher(
    engine: FakeEngine, max_batch_size: int = 4, max_wait_s: float = 0.05, queue_size: int = 64
) -> DynamicBatcher:
    batcher = DynamicBatcher(
        engine,
        max_batch_size=max_batch_size,
        max_wait_s=max_wait_s,  # type: ignore[arg-type]
        queue_size=queue_size,
        metrics=Metrics(max_batch_size),
    )
    batcher.start()
    return batcher


def test_concurrent_submissions_are_grouped_up_to_the_maximum() -> None:
    async def scenario() -> tuple[list[float], list[int]]:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=4, max_wait_s=1.0)
        results = await asyncio.gather(*(probability(batcher.submit(image(v))) for v in range(10)))
        await batcher.close()
        return results, engine.batch_sizes

    results, sizes = asyncio.run(scenario())
    assert results == pytest.approx([v / 255 for v in range(10)])
    assert sizes == [4, 4, 2]  # full batches leave at once; the last leaves after max_wait


def test_cancelled_request_is_left_out_without_breaking_its_batch() -> None:
    async def scenario() -> tuple[list[float], list[int], bool]:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=3, max_wait_s=1.0)
        tasks = [asyncio.create_task(probability(batcher.submit(image(v)))) for v in (10, 20, 30)]
        await asyncio.sleep(0)  # let all three enqueue
        tasks[1].cancel()
        done = await asyncio.gather(tasks[0], tasks[2])
        cancelled = tasks[1].cancelled()
        await batcher.close()
        return done, engine.batch_sizes, cancelled

    done, sizes, cancelled = asyncio.run(scenario())
    assert done == pytest.approx([10 / 255, 30 / 255])
    assert sizes == [2] and cancelled


def test_without_a_wait_the_queue_is_taken_as_it_stands() -> None:
    """max_wait 0 (the CPU policy): what queued up during a forward pass goes together, nothing waits for more."""

    async def scenario() -> tuple[list[int], float]:
        engine = FakeEngine()
        engine.hold.clear()
        batcher = make_batcher(engine, max_batch_size=4, max_wait_s=0)
        first = asyncio.create_task(batcher.submit(image(1)))
        await asyncio.to_thread(engine.entered.wait, 5)  # the first image is in its forward pass, alone
        queued = [asyncio.create_task(batcher.submit(image(v))) for v in (2, 3)]
        await asyncio.sleep(0.05)
        engine.hold.set()
        await asyncio.gather(first, *queued)
        started = time.perf_counter()
        await batcher.submit(image(4))  # nothing else is queued: it leaves at once, alone
        elapsed = time.perf_counter() - started
        await batcher.close()
        return engine.batch_sizes, elapsed

    sizes, elapsed = asyncio.run(scenario())
    assert sizes == [1, 2, 1]
    assert elapsed < 1.0


def test_forward_pass_never_blocks_the_event_loop() -> None:
    async def scenario() -> float:
        engine = FakeEngine()
        engine.hold.clear()
        batcher = make_batcher(engine, max_wait_s=0)
        pending = asyncio.create_task(probability(batcher.submit(image(51))))
        for _ in range(20):  # the loop keeps turning while the forward pass is held
            await asyncio.sleep(0.001)
        assert not pending.done()
        engine.hold.set()
        result = await pending
        await batcher.close()
        return result

    assert asyncio.run(scenario()) == pytest.approx(0.2)


def test_failed_forward_fails_its_batch_and_reports_until_recovery() -> None:
    async def scenario() -> None:
        engine = FakeEngine()
        engine.fail = True
        batcher = make_batcher(engine, max_wait_s=0)
        with pytest.raises(InferenceFailedError):
            await probability(batcher.submit(image(1)))
        assert batcher.last_error == "inference failed: RuntimeError: device lost"
        engine.fail = False
        assert await probability(batcher.submit(image(255))) == pytest.approx(1.0)
        assert batcher.last_error is None
        await batcher.close()

    asyncio.run(scenario())


def test_full_queue_rejects_immediately() -> None:
    async def scenario() -> None:
        engine = FakeEngine()
        engine.hold.clear()
        batcher = make_batcher(engine, max_batch_size=1, max_wait_s=0, queue_size=1)
        first = asyncio.create_task(probability(batcher.submit(image(1))))
        assert await asyncio.to_thread(engine.entered.wait, 10)  # the first job is in the forward pass
        second = asyncio.create_task(probability(batcher.submit(image(2))))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match=r"^1 images are already waiting; retry shortly$"):
            await probability(batcher.submit(image(3)))
        engine.hold.set()
        assert await asyncio.gather(first, second) == pytest.approx([1 / 255, 2 / 255])
        await batcher.close()

    asyncio.run(scenario())


def test_close_drains_queued_work_then_refuses() -> None:
    async def scenario() -> None:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=2, max_wait_s=0)
        pending = [asyncio.create_task(probability(batcher.submit(image(v)))) for v in (3, 6, 9)]
        await asyncio.sleep(0)
        await batcher.close()
        assert [task.result() for task in pending] == pytest.approx([3 / 255, 6 / 255, 9 / 255])
        with pytest.raises(ShuttingDownError):
            await probability(batcher.submit(image(1)))

    asyncio.run(scenario())


def test_explain_flags_reach_the_engine_with_their_images() -> None:
    async def scenario() -> list[list[bool]]:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=3, max_wait_s=1.0)
        await asyncio.gather(
            batcher.submit(image(1)), batcher.submit(image(2), explain=True), batcher.submit(image(3), False)
        )
        await batcher.close()
        return engine.explain

    assert asyncio.run(scenario()) == [[False, True, False]]


@pytest.mark.parametrize("max_wait_s", [2.0, 0.5])  # sub-second waits too: the GPU default is 5 ms
def test_a_late_request_joins_the_waiting_batch_until_max_wait(max_wait_s: float) -> None:
    async def scenario() -> list[int]:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=4, max_wait_s=max_wait_s)
        first = asyncio.create_task(probability(batcher.submit(image(1))))
        await asyncio.sleep(0.05)  # well inside max_wait: the first image must still be waiting
        assert not first.done()
        second = await probability(batcher.submit(image(2)))
        assert second == pytest.approx(2 / 255) and await first == pytest.approx(1 / 255)
        await batcher.close()
        return engine.batch_sizes

    assert asyncio.run(scenario()) == [2]


def test_every_forward_pass_runs_on_the_one_named_inference_thread() -> None:
    async def scenario() -> tuple[list[str], set[str]]:
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=2, max_wait_s=0)
        names = {task.get_name() for task in asyncio.all_tasks()}
        for value in range(3):
            await asyncio.gather(batcher.submit(image(value)), batcher.submit(image(value + 1)))
        await batcher.close()
        return engine.threads, names

    threads, task_names = asyncio.run(scenario())
    assert len(threads) == 3 and set(threads) == {"cxr-inference_0"}
    assert "cxr-batcher" in task_names


def test_a_wrong_result_count_fails_the_batch_and_the_batcher_lives_on() -> None:
    async def scenario() -> None:
        engine = FakeEngine()
        engine.short = True
        batcher = make_batcher(engine, max_batch_size=2, max_wait_s=1.0)
        outcomes = await asyncio.gather(batcher.submit(image(1)), batcher.submit(image(2)), return_exceptions=True)
        assert [type(outcome) for outcome in outcomes] == [InferenceFailedError, InferenceFailedError]
        assert batcher.last_error == "inference failed: RuntimeError: the engine returned 1 results for 2 images"
        engine.short = False
        assert await probability(batcher.submit(image(51))) == pytest.approx(0.2)
        await batcher.close()

    asyncio.run(scenario())


def test_failures_are_logged_with_the_batch_size_and_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        engine = FakeEngine()
        engine.fail = True
        batcher = make_batcher(engine, max_wait_s=0)
        with pytest.raises(InferenceFailedError):
            await batcher.submit(image(1))
        await batcher.close()

    with caplog.at_level(logging.ERROR, logger="app.api.batching"):
        asyncio.run(scenario())
    [record] = [r for r in caplog.records if r.name == "app.api.batching"]
    assert record.getMessage() == "inference failed for a batch of 1 images"
    assert record.exc_info is not None and str(record.exc_info[1]) == "device lost"


def test_metrics_follow_the_queue_the_batches_and_their_time() -> None:
    async def scenario() -> tuple[float, float, float, float, float]:
        engine = FakeEngine()
        engine.hold.clear()
        metrics = Metrics(1)
        batcher = DynamicBatcher(engine, max_batch_size=1, max_wait_s=0, queue_size=8, metrics=metrics)  # type: ignore[arg-type]
        batcher.start()
        started = time.perf_counter()
        pending = [asyncio.create_task(probability(batcher.submit(image(v)))) for v in range(4)]
        assert await asyncio.to_thread(engine.entered.wait, 10)  # the first image is in the forward pass
        waiting = metrics.registry.get_sample_value("cxr_queue_depth")
        await asyncio.sleep(0.05)
        engine.hold.set()
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - started
        await batcher.close()
        value = metrics.registry.get_sample_value
        return (
            waiting,
            value("cxr_queue_depth"),
            value("cxr_batch_size_count"),
            value("cxr_inference_duration_seconds_sum"),
            elapsed,
        )

    waiting, drained, batches, inference_sum, elapsed = asyncio.run(scenario())
    assert (waiting, drained, batches) == (3.0, 0.0, 4.0)
    assert 0.05 <= inference_sum <= elapsed  # the held first pass took at least the 50 ms sleep


def test_a_fresh_batcher_reports_no_error_and_closes_without_having_started() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(FakeEngine(), max_batch_size=2, max_wait_s=0, queue_size=2, metrics=Metrics(2))  # type: ignore[arg-type]
        assert batcher.last_error is None
        await batcher.close()
        with pytest.raises(ShuttingDownError):
            await batcher.submit(image(1))

    asyncio.run(scenario())
