"""Every CPU configuration of the service against the naive server, interleaved, at several input sizes.

Part of ``make bench`` on a CPU host (``bench-results/serve.json`` -> ``cpu_configs``). For each
input size one random-init model is exported (int8-calibrated on the benchmark's own uploads, so
int8 is measured without training data) and the naive server is started once; then for each
configuration (backend x precision) the engine is timed alone (model only), the service is
started with that configuration, and at every concurrency level the naive server and the service
are driven back to back, so a change in machine load between levels hits both alike. Each level
stops taking new requests after ``--config-seconds``, which bounds the whole sweep.

int8 runs with the input guard off: ``CXR_BACKEND=openvino CXR_PRECISION=int8`` is refused with
the guard on unless the accuracy gate approved it, and a random benchmark model has no labelled
images to gate on (the shipped model passes it with the guard; what the guard costs in int8 is
measured on that model instead: benchmarks/NOTES.md, "int8 and the input guard"). Every other
configuration computes the guard in ``flag`` mode: the same work as ``reject``, but the random
model's guard is fitted with no margin on the uploads' fp32 scores, so bf16 drift would refuse
some of them and turn them into errors (a first run refused 24 of 34 in torch bf16). Each entry
says which mode ran.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from app.core.artifacts import load_model
from app.core.fastpath_record import FastPathRecord, Int8Ranges, write_record
from app.core.int8_calibration import measure_ranges
from app.core.onnx_export import export_features
from app.core.preprocessing import preprocess
from benchmarks import model_only
from benchmarks.loadgen import run_level
from benchmarks.server_proc import free_port, serve
from benchmarks.uploads import Upload

Config = tuple[str, str]  # (backend, precision)


def default_configs() -> list[Config]:
    """torch fp32, bf16 (where the CPU has bf16), OpenVINO fp32 and int8; the caller drops what is ``unsupported``."""
    configs: list[Config] = [("torch", "fp32")]
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        configs.append(("torch", "bf16"))
    return [*configs, ("openvino", "fp32"), ("openvino", "int8")]


def unsupported(config: Config) -> str | None:
    """Why the service would refuse ``config`` on this CPU (as ``CXR_PRECISION`` would); None when it runs."""
    backend, precision = config
    if backend != "openvino" or precision == "fp32":
        return None
    from app.core.openvino_backend import missing_units  # imports OpenVINO: only when it is benchmarked

    return missing_units(precision)  # type: ignore[arg-type]


def guard_mode(config: Config) -> str:
    """The input guard mode a configuration is benchmarked in (see the module docstring)."""
    return "off" if config[1] == "int8" else "flag"


def parse_config(text: str) -> Config:
    backend, _, precision = text.partition(":")
    if backend not in ("torch", "openvino") or precision not in ("fp32", "bf16", "int8"):
        raise argparse.ArgumentTypeError(f"{text!r}: use BACKEND:PRECISION, e.g. torch:fp32 or openvino:int8")
    return backend, precision


def calibrate_on_uploads(weights: Path, uploads: Sequence[Upload], tmp: Path) -> None:
    """int8 ranges for a benchmark model from the uploads it will be sent (it has no training data)."""
    loaded = load_model(weights)
    size = loaded.metadata.spec.input_size
    graph = tmp / f"calibrate-{size}.onnx"
    export_features(loaded.network, graph, loaded.metadata.guard)
    pixels = torch.stack([preprocess(upload.data, size) for upload in uploads])
    with torch.inference_mode():
        batches = [loaded.network.normalize(pixels[i : i + 8]).numpy() for i in range(0, len(pixels), 8)]
    int8 = Int8Ranges(
        images=len(pixels),
        source=f"the benchmark's {len(pixels)} uploads",
        exporter=torch.__version__,
        ranges=measure_ranges(graph, batches),
    )
    write_record(FastPathRecord(weights_sha256=loaded.metadata.sha256, input_size=size, int8=int8), weights)


def pick(level: dict[str, Any]) -> dict[str, Any]:
    return {key: level[key] for key in ("throughput_ips", "p50_ms", "p99_ms", "errors")}


async def _level(
    url: str, uploads: Sequence[Upload], concurrency: int, requests: int, seconds: float
) -> dict[str, Any]:
    result = await run_level(
        url,
        "/predict",
        uploads,
        concurrency=concurrency,
        requests=max(requests, 2 * concurrency),
        max_seconds=seconds,
    )
    return result.as_dict()


def ceiling(model_ips: float, decode_ips: float) -> float:
    """Images/s when every image costs its decode plus its forward pass on the same cores."""
    return 1.0 / (1.0 / model_ips + 1.0 / decode_ips)


def run(
    args: argparse.Namespace,
    uploads: Sequence[Upload],
    tmp: Path,
    export: Callable[[Path, int], Path],
    service_env: Callable[[Path, int, Config], dict[str, str]],
    decode_ips: Callable[[int], float],
) -> list[dict[str, Any]]:
    """The ``cpu_configs`` entries: one per (configuration, input size, concurrency).

    Each entry also carries the decode throughput of the uploads at that input size (all decode
    threads) and the ``ceiling`` it implies with the model-only rate: ``1 / (1/model + 1/decode)``,
    the images/s of a server that did nothing but decode and infer, one after the other, on the
    same cores. Model-only leaves decoding out, so where decoding costs as much as the forward pass
    (int8, small inputs) no server can come near model-only; ours/ceiling says how much of the
    reachable rate the service's own overhead (HTTP, queues, process hops) takes.
    """
    entries: list[dict[str, Any]] = []
    model_seconds = 1.0 if args.quick else 3.0
    cache = tmp / "model-only-converted"
    for size in args.config_sizes:
        decode = decode_ips(size)
        weights = export(tmp / f"sweep-{size}", size)
        calibrate_on_uploads(weights, uploads, tmp)
        with contextlib.ExitStack() as stack:
            port = free_port()
            naive_args = ["-m", "benchmarks.naive_server", "--weights", str(weights), "--port", str(port)]
            naive = stack.enter_context(serve(naive_args, {}, args.out / f"naive-{size}.log", port))
            for config in args.configs:
                backend, precision = config
                print(f"{backend} {precision} at {size} px:", flush=True)
                guard = guard_mode(config)
                model = model_only.measure_engine(
                    weights,
                    "cpu",
                    precision,
                    sorted({1, args.max_batch_size}),
                    model_seconds,
                    backend=backend,
                    input_guard=guard,  # type: ignore[arg-type]
                    cache_dir=cache,
                )
                port = free_port()
                log = args.out / f"ours-{backend}-{precision}-{size}.log"
                with serve(["-m", "app"], service_env(weights, port, config), log, port) as ours:
                    for level in args.concurrency:
                        theirs = asyncio.run(_level(naive.base_url, uploads, level, args.requests, args.config_seconds))
                        mine = asyncio.run(_level(ours.base_url, uploads, level, args.requests, args.config_seconds))
                        entry = {
                            "backend": backend,
                            "precision": precision,
                            "input_guard": guard,
                            "input_size": size,
                            "concurrency": level,
                            "ours": pick(mine),
                            "naive": pick(theirs),
                            "model_only": {"throughput_ips": model["throughput_ips"]},
                            "decode": {"throughput_ips": decode},
                            "ceiling": {"throughput_ips": ceiling(model["throughput_ips"], decode)},
                        }
                        entries.append(entry)
                        print(
                            f"  c={level}: ours {mine['throughput_ips']:.2f} img/s, "
                            f"naive {theirs['throughput_ips']:.2f}, "
                            f"model only {model['throughput_ips']:.2f}, errors {mine['errors']}/{theirs['errors']}",
                            flush=True,
                        )
    return entries
