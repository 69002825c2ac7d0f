"""Turn one benchmark run into bench-results/serve.json, serve.md and a console summary.

The headline compares the service and the naive baseline at the HIGHEST concurrency tested,
where batching matters; every level stays in the JSON for anyone who wants the curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HEADLINE_FIELDS = ("throughput_ips", "p50_ms", "p99_ms", "errors")


def pick(level: dict[str, Any]) -> dict[str, Any]:
    return {key: level[key] for key in HEADLINE_FIELDS}


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def build(
    *,
    device: str,
    settings: dict[str, Any],
    levels: dict[str, list[dict[str, Any]]],
    model_only: dict[str, Any],
    decode: dict[str, Any],
    peak_rss_mb: dict[str, float],
    cpu_configs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The serve.json document: headline keys first, then full detail."""
    top = max(level["concurrency"] for level in levels["ours_predict"])
    ours = next(level for level in levels["ours_predict"] if level["concurrency"] == top)
    naive = next(level for level in levels["naive_predict"] if level["concurrency"] == top)
    return {
        "device": device,
        "concurrency": top,
        "ours": pick(ours),
        "naive": pick(naive),
        "model_only": {"throughput_ips": model_only["throughput_ips"]},
        "ratios": {
            "ours_over_naive": ratio(ours["throughput_ips"], naive["throughput_ips"]),
            "ours_over_model_only": ratio(ours["throughput_ips"], model_only["throughput_ips"]),
        },
        "settings": settings,
        "levels": levels,
        "model_only_detail": model_only,
        "decode": decode,
        "peak_rss_mb": peak_rss_mb,
        "cpu_configs": cpu_configs or [],
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(doc: dict[str, Any]) -> str:
    """A short table for humans: every load level, then the model-only and decode ceilings."""
    lines = [
        f"# Serving benchmark ({doc['device']})",
        "",
        "| server | endpoint | concurrency | images/s | p50 ms | p95 ms | p99 ms | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, levels in doc["levels"].items():
        server = name.split("_", 1)[0]
        for level in levels:
            lines.append(
                f"| {server} | {level['endpoint']} | {level['concurrency']} | {fmt(level['throughput_ips'], 2)} "
                f"| {fmt(level['p50_ms'], 0)} | {fmt(level['p95_ms'], 0)} | {fmt(level['p99_ms'], 0)} "
                f"| {level['errors']} |"
            )
    ratios, decode, detail = doc["ratios"], doc["decode"], doc["model_only_detail"]
    batches = ", ".join(
        f"b={size}: {fmt(item['throughput_ips'], 2)}" for size, item in detail["per_batch_size"].items()
    )
    lines += [
        "",
        f"- model only ({detail['precision']}): {fmt(doc['model_only']['throughput_ips'], 2)} images/s best "
        f"({batches})",
        f"- decode+preprocess: {fmt(decode['preprocess_1_thread_ips'])} images/s on 1 thread, "
        f"{fmt(decode['preprocess_n_threads_ips'])} on {decode['threads']}; "
        f"naive decode {fmt(decode['naive_1_thread_ips'])} on 1",
        f"- at concurrency {doc['concurrency']}: ours/naive = {fmt(ratios['ours_over_naive'], 2)}, "
        f"ours/model_only = {fmt(ratios['ours_over_model_only'], 2)}",
        "- peak RSS (MiB): " + ", ".join(f"{name} {fmt(value, 0)}" for name, value in doc["peak_rss_mb"].items()),
    ]
    if detail.get("peak_gpu_memory_mb") is not None:
        lines.append(f"- peak GPU memory at the largest batch: {fmt(detail['peak_gpu_memory_mb'], 0)} MiB")
    if doc.get("cpu_configs"):
        lines += [
            "",
            "## CPU configurations (naive and ours driven back to back at each level)",
            "",
            "| backend | precision | guard | input px | concurrency | ours img/s | naive img/s | model only | "
            "decode | ceiling | ours/naive | ours/model only | ours/ceiling | errors ours/naive |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for entry in doc["cpu_configs"]:
            keys = ("ours", "naive", "model_only", "decode", "ceiling")
            ours, naive, model, decode, ceiling = (entry[key]["throughput_ips"] for key in keys)
            lines.append(
                f"| {entry['backend']} | {entry['precision']} | {entry['input_guard']} | {entry['input_size']} "
                f"| {entry['concurrency']} | {fmt(ours, 2)} | {fmt(naive, 2)} | {fmt(model, 2)} "
                f"| {fmt(decode, 1)} | {fmt(ceiling, 2)} "
                f"| {fmt(ratio(ours, naive), 2)} | {fmt(ratio(ours, model), 2)} | {fmt(ratio(ours, ceiling), 2)} "
                f"| {entry['ours']['errors']}/{entry['naive']['errors']} |"
            )
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], out_dir: Path) -> str:
    """Write both files and return the markdown (which the caller prints)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    (out_dir / "serve.md").write_text(text)
    return text
