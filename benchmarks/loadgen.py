"""Closed-loop async HTTP load generator: ``concurrency`` clients, each sending back to back.

Closed-loop (a fixed number of in-flight requests) matches how a PACS/worklist integration
pushes studies, and makes throughput at a concurrency level directly comparable between
servers. Latency is measured per request from send to full response.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import httpx

from benchmarks.uploads import Upload


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class LevelResult:
    """What one load level measured; ``throughput_ips`` counts images, not requests."""

    endpoint: str
    concurrency: int
    requests: int
    images: int
    errors: int
    duration_s: float
    throughput_ips: float
    p50_ms: float | None  # None when every request failed
    p95_ms: float | None
    p99_ms: float | None
    client_cpu: float
    error_samples: list[str]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def summarize(
    endpoint: str,
    concurrency: int,
    requests: int,
    latencies_s: list[float],
    images: int,
    errors: list[str],
    duration_s: float,
    client_cpu_s: float = 0.0,
) -> LevelResult:
    """Turn raw samples into a :class:`LevelResult` (latencies of HTTP 200 responses only).

    ``errors`` holds failed requests and files a 200 batch response reported as failed.
    ``client_cpu`` is the load generator's CPU seconds per wall second: near 1.0 means the
    client, not the server, limited throughput.
    """
    ms = [value * 1000.0 for value in latencies_s]
    return LevelResult(
        endpoint=endpoint,
        concurrency=concurrency,
        requests=requests,
        images=images,
        errors=len(errors),
        duration_s=duration_s,
        throughput_ips=images / duration_s if duration_s > 0 else 0.0,
        p50_ms=percentile(ms, 50) if ms else None,
        p95_ms=percentile(ms, 95) if ms else None,
        p99_ms=percentile(ms, 99) if ms else None,
        client_cpu=client_cpu_s / duration_s if duration_s > 0 else 0.0,
        error_samples=sorted(set(errors))[:5],
    )


def scored_images(body: object, sent: int) -> tuple[int, list[str]]:
    """Images a 200 response actually scored: ``/predict/batch`` reports per-file errors inside it."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        return sent, []
    failed = [f"file error: {item['error']}"[:200] for item in results if isinstance(item, dict) and "error" in item]
    return len(results) - len(failed), failed


def build_files(
    uploads: Sequence[Upload], start: int, count: int, field: str
) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``files`` for ``count`` uploads starting at ``start`` (cycling the set)."""
    picked = [uploads[(start + offset) % len(uploads)] for offset in range(count)]
    return [(field, (item.name, item.data, "image/jpeg")) for item in picked]


async def run_level(
    base_url: str,
    endpoint: str,
    uploads: Sequence[Upload],
    *,
    concurrency: int,
    requests: int,
    images_per_request: int = 1,
    max_seconds: float = float("inf"),
    timeout_s: float = 300.0,
) -> LevelResult:
    """Send ``requests`` requests with ``concurrency`` in flight; ``.../batch`` endpoints take ``files``.

    No new request starts after ``max_seconds``, so a slow server bounds the level's time
    instead of the run's; requests already in flight finish and count.
    """
    field = "files" if endpoint.rstrip("/").endswith("batch") else "file"
    latencies: list[float] = []
    errors: list[str] = []
    images = 0
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index, images
        while next_index < requests and time.perf_counter() < deadline:
            index = next_index
            next_index += 1
            files = build_files(uploads, index * images_per_request, images_per_request, field)
            started = time.perf_counter()
            try:
                response = await client.post(endpoint, files=files)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:150]}")
                continue
            latencies.append(time.perf_counter() - started)
            scored, failed = scored_images(response.json(), images_per_request)
            images += scored
            errors.extend(failed)

    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        started, cpu_started = time.perf_counter(), time.process_time()
        deadline = started + max_seconds
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        duration, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return summarize(endpoint, concurrency, min(next_index, requests), latencies, images, errors, duration, cpu)
