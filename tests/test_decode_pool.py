"""Issue 10, findings 1 and 5: decoders run in worker processes where a crash, a hang or a bomb costs one image."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from app.core.decode_pool import (
    MAX_DECODE_LIMIT,
    MAX_DECODE_TIMEOUT_S,
    DecodePool,
    DecoderCrashedError,
    DecodeTimeoutError,
)
from app.core.image_headers import read_header
from app.core.jpeg_header import MAX_FILL, MAX_SEGMENTS, JpegFrame, read_jpeg_frame
from app.core.preprocessing import CorruptImageError, ImageTooLargeError, preprocess
from tests.conftest import encode, synthetic_xray
from tests.hostile_inputs import gradient16, lossless_without_huffman_table, one_colour_rgba_png

SIZE = 32
SMALL = encode(synthetic_xray(), "JPEG", quality=90)
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    with DecodePool(2, SIZE, large_decode_bytes=8_000_000) as running:
        yield running


def worker_pids(pool: DecodePool) -> set[int]:
    with pool._lock:
        return {worker.process.pid for worker in pool._all if worker.process.pid is not None}


def running_pid(pids: set[int], timeout_s: float = 10.0) -> int:
    """The worker that is on the CPU (state R in /proc), i.e. the one decoding right now."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "R":
                    return pid
        time.sleep(0.005)
    raise AssertionError("no worker started decoding")


def slow_png(side: int = 2600) -> bytes:
    """A 16-bit grey PNG that takes a worker a noticeable time to decode (0.3 s at 2600 px, 1.4 s at 5000)."""
    return encode(Image.fromarray(gradient16(side, side)), "PNG", compress_level=1)


def test_pool_gives_the_in_process_pixels(pool: DecodePool) -> None:
    decoded = pool.decode(SMALL)
    assert torch.equal(decoded.pixels, preprocess(SMALL, SIZE))
    assert (decoded.source.format, decoded.source.width, decoded.source.height) == ("JPEG", 96, 80)


def test_issue_crash_input_is_a_422_and_the_pool_keeps_decoding(pool: DecodePool) -> None:
    """Finding 1: the ljpeg fallback segfaulted the process on this 8 KB file."""
    with pytest.raises(CorruptImageError):
        pool.decode(lossless_without_huffman_table())
    assert torch.equal(pool.decode(SMALL).pixels, preprocess(SMALL, SIZE))


def test_a_worker_that_dies_costs_only_its_own_image(pool: DecodePool) -> None:
    """A segfault mid-decode: that image is corrupt_image, a decode running beside it is unaffected."""
    before = worker_pids(pool)
    crashes = pool.crashes
    outcome: dict[str, object] = {}

    def victim() -> None:
        try:
            pool.decode(slow_png())
        except CorruptImageError as exc:
            outcome["victim"] = exc

    thread = threading.Thread(target=victim)
    thread.start()
    os.kill(running_pid(before), signal.SIGSEGV)
    side = [pool.decode(SMALL) for _ in range(5)]  # the other worker, and the replacement, keep serving
    thread.join(30)
    assert isinstance(outcome.get("victim"), DecoderCrashedError)
    assert outcome["victim"].code == "corrupt_image" and "SIGSEGV" in str(outcome["victim"])
    assert all(torch.equal(item.pixels, side[0].pixels) for item in side)
    assert pool.crashes == crashes + 1
    after = worker_pids(pool)
    assert len(after) == pool.size and after != before


def test_a_hung_decoder_is_killed_and_replaced() -> None:
    """A decoder that never answers (here: every worker stopped with SIGSTOP) costs its image 0.5 s, then 422."""
    replaced: list[str] = []
    with DecodePool(1, SIZE, timeout_s=0.5, on_replace=replaced.append) as short:
        stopped = worker_pids(short)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(DecodeTimeoutError):
            short.decode(SMALL)
        assert 0.5 <= time.monotonic() - started < 10
        for pid in stopped & worker_pids(short):  # the one that was not asked stays in the pool
            os.kill(pid, signal.SIGCONT)
        assert replaced == ["timeout"]
        assert short.decode(SMALL).pixels.shape == (1, SIZE, SIZE)
        assert len(worker_pids(short)) == short.size and not stopped <= worker_pids(short)


def test_a_bomb_fails_in_its_worker_under_the_memory_cap() -> None:
    """RLIMIT_AS: a decode that needs more memory than a worker may use is image_too_large, the host unharmed."""
    with DecodePool(2, SIZE, memory_limit=48 * 1024 * 1024) as capped:
        with pytest.raises(ImageTooLargeError, match="more memory"):
            capped.decode(one_colour_rgba_png(5000, 5000))  # 100 MB of RGBA within the decode budget
        assert capped.decode(SMALL).pixels.shape == (1, SIZE, SIZE)


def test_large_decodes_retire_their_worker(pool: DecodePool) -> None:
    """Memory is given back after a large decode: its worker exits and a fresh one takes its place."""
    before = worker_pids(pool)
    pool.decode(one_colour_rgba_png(2000, 2000))  # 16 MB decode, over the 8 MB large threshold
    after = worker_pids(pool)
    assert len(after) == pool.size and len(after - before) == 1
    pool.decode(SMALL)
    assert worker_pids(pool) == after  # small decodes keep their worker


def test_large_decodes_take_turns_while_small_ones_go_on() -> None:
    """Finding 5: with one large lane, two bombs decode one after the other and a small image never waits."""
    with DecodePool(1, SIZE, large_decode_bytes=8_000_000, large_slots=1) as lanes:
        assert lanes.size == 2  # one worker for ordinary images, one for large ones
        bomb = one_colour_rgba_png(4000, 4000)
        started = time.perf_counter()
        lanes.decode(bomb)
        one_bomb_s = time.perf_counter() - started
        threads = [threading.Thread(target=lanes.decode, args=(bomb,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(one_bomb_s / 4)
        small_started = time.perf_counter()
        lanes.decode(SMALL)
        small_s = time.perf_counter() - small_started
        for thread in threads:
            thread.join(60)
    assert small_s < one_bomb_s, (small_s, one_bomb_s)


def test_a_decode_cancelled_before_it_starts_gives_its_lane_back() -> None:
    """A /predict/batch refused as overloaded cancels its siblings' decodes. One cancelled after it took its
    lane but before a thread took its job never ran, so the lane stayed taken: with one ordinary lane (a CPU
    host) every later upload waited until its deadline, 504 for ever, while /health said ok."""

    async def scenario(lanes: DecodePool) -> list[torch.Size]:
        hold = threading.Event()
        busy = [lanes._threads.submit(hold.wait) for _ in range(lanes.size)]  # every decode thread taken
        queued = asyncio.create_task(lanes.decode_async(SMALL))
        await asyncio.sleep(0.2)  # it holds the one ordinary lane; its job waits for a thread
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        hold.set()
        for waiter in busy:
            waiter.result(timeout=10)
        return [(await asyncio.wait_for(lanes.decode_async(SMALL), 30)).pixels.shape for _ in range(3)]

    with DecodePool(1, SIZE, large_slots=1) as lanes:
        assert asyncio.run(scenario(lanes)) == [torch.Size([1, SIZE, SIZE])] * 3
        assert lanes._lanes_async[False]._value == 1  # given back exactly once


def test_a_worker_that_died_while_idle_is_replaced_and_the_image_decoded() -> None:
    """A worker killed between jobs (OOM killer, kill -9) made the next valid image a 422 corrupt_image,
    "the image crashed its decoder (SIGKILL)", counted as a crash: its death is not that image's doing."""
    replaced: list[str] = []
    with DecodePool(1, SIZE, large_slots=1, on_replace=replaced.append) as pool:
        assert pool.decode(SMALL).pixels.shape == (1, SIZE, SIZE)
        idle = [worker.process for worker in pool._all]
        for process in idle:
            os.kill(process.pid, signal.SIGKILL)
            process.join(timeout=10)
        decoded = [pool.decode(SMALL) for _ in range(3)]
        assert all(torch.equal(item.pixels, preprocess(SMALL, SIZE)) for item in decoded)
        assert replaced == ["died_idle"] * len(idle) and pool.crashes == 0
        assert len(worker_pids(pool)) == pool.size and not {p.pid for p in idle} & worker_pids(pool)


def test_the_largest_accepted_limits_still_decode() -> None:
    """The settings' upper bounds are safe: a decode timeout of a day still fits Connection.poll, 2**40 fits the
    job header, and a memory cap past setrlimit's signed 64-bit range means no cap, not workers that cannot start."""
    with DecodePool(
        1,
        SIZE,
        large_slots=1,
        max_pixels=MAX_DECODE_LIMIT,
        max_decode_bytes=MAX_DECODE_LIMIT,
        timeout_s=MAX_DECODE_TIMEOUT_S,
        memory_limit=2**64,
    ) as widest:
        assert torch.equal(widest.decode(SMALL).pixels, preprocess(SMALL, SIZE))


@pytest.mark.parametrize(
    "limits", [{"timeout_s": float("inf")}, {"timeout_s": float("nan")}, {"max_pixels": 2**64}, {"max_decode_bytes": 0}]
)
def test_limits_that_would_fail_every_decode_are_refused_up_front(limits: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be in"):
        DecodePool(1, SIZE, **limits)  # type: ignore[arg-type]


def header_read_s(pool: DecodePool, data: bytes, repeats: int = 5) -> float:
    """The best of a few header reads (``is_large``, as ``decode_async`` does it on the event loop)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        assert not pool.is_large(data)
        times.append(time.perf_counter() - started)
    return min(times)


@pytest.mark.parametrize(
    "unit",
    [b"\xff", b"\xff\xfe\x00\x02", b"\xff\xd0", b"\xff" * 1000 + b"\xfe\x00\x02"],
    ids=["fill-bytes", "empty-comments", "restart-markers", "fill-then-comment"],
)
def test_a_hostile_header_is_read_in_bounded_time(pool: DecodePool, unit: bytes) -> None:
    """b"\\xff\\xd8" + 20 MiB of 0xFF was walked byte by byte on the event loop: three such uploads held /livez
    for 2.7-4.2 s. The header read now stops at bounds no real file reaches, so 20 MiB costs what 1 MiB does."""
    small, large = (b"\xff\xd8" + unit * (size // len(unit)) for size in (MiB, 20 * MiB))
    assert read_header(large) is None
    ratio = header_read_s(pool, large) / header_read_s(pool, small)
    assert ratio < 4, ratio  # a walk that grows with the input: 20


def test_the_header_walk_reads_any_real_padding_and_stops_past_its_bounds() -> None:
    """Up to MAX_SEGMENTS markers and MAX_FILL fill bytes before the frame are read as before; past them a
    header is unreadable (corrupt_image), a limit no encoder comes near (an ICC profile takes 255 segments)."""
    comment, frame = b"\xff\xfe\x00\x02", b"\xff\xc0\x00\x0b\x08\x00\x50\x00\x60\x01\x01\x11\x00"
    fill = MAX_FILL // (MAX_SEGMENTS - 1)
    padded = b"\xff\xd8" + (b"\xff" * fill + comment) * (MAX_SEGMENTS - 1) + frame
    assert read_jpeg_frame(padded) == JpegFrame(8, 80, 96, 1, lossless=False, progressive=False)
    assert read_jpeg_frame(b"\xff\xd8" + comment * MAX_SEGMENTS + frame) is None
    assert read_jpeg_frame(b"\xff\xd8" + b"\xff" * (MAX_FILL + 1) + frame) is None
    assert read_jpeg_frame(b"\xff\xd8" + b"\xff" * MAX_FILL + frame) is not None
