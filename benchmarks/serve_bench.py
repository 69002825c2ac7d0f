"""``make bench``: the real service vs a naive baseline vs the bare model, on one upload set.

Steps, in order so they never compete for the CPU/GPU: build uploads, export a random-init
model (numbers must not depend on training), decode throughput, model-only throughput, then
each server as a subprocess driven by the closed-loop load generator at every concurrency.
Results: bench-results/serve.json and serve.md (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from app.core.artifacts import export_model, read_metadata
from app.core.input_guard import fit_guard
from app.core.network import ModelSpec, build_model
from app.core.preprocessing import preprocess
from benchmarks import cpu_sweep, decode_bench, model_only, results_table
from benchmarks.loadgen import run_level
from benchmarks.server_proc import REPO_ROOT, free_port, serve
from benchmarks.uploads import DEFAULT_REAL_DIR, Upload, real_uploads, synthetic_uploads

CPU_CONCURRENCY = (1, 4, 16)
SHIPPED_WEIGHTS = REPO_ROOT / "weights"
GUARD_HEADROOM = 1.5
GPU_CONCURRENCY = (1, 16, 64, 256)


def shipped_input_size() -> int:
    """The shipped model's input size, from its metadata: the sweep follows the model rather than a constant."""
    return read_metadata(SHIPPED_WEIGHTS).spec.input_size


def export_random_model(out_dir: Path, input_size: int, uploads: Sequence[Upload] = ()) -> Path:
    """VGG16 with the compact head at random init: same compute as the shipped model, input guard included.

    The guard is fitted on the benchmark's own uploads, so the service computes it for every image,
    as in production, and refuses none of them: its threshold is the largest of their scores times
    ``GUARD_HEADROOM``. Without the headroom the top-scoring upload sits exactly on the threshold, and
    the ~1e-6 its CPU fp32 score moves with the batch it lands in refused it now and then (an error in
    the results that was the harness's, not the service's).
    """
    torch.manual_seed(0)
    network = build_model(ModelSpec(architecture="vgg16", head="compact", input_size=input_size))
    golden = torch.randint(0, 256, (2, 1, input_size, input_size), dtype=torch.uint8)
    samples = [preprocess(upload.data, input_size) for upload in uploads]
    samples = samples or [torch.randint(0, 256, (1, input_size, input_size), dtype=torch.uint8) for _ in range(8)]
    pixels = torch.stack(samples)
    spec, stats = fit_guard(
        network, pixels, pixels, input_size=input_size, max_false_refusal=0.0, source="bench uploads"
    )
    spec = spec.model_copy(
        update={
            "threshold": spec.threshold * GUARD_HEADROOM,
            "threshold_method": f"largest score of the bench uploads x {GUARD_HEADROOM:g}",
        }
    )
    export_model(network, out_dir, version="bench-random", golden_inputs=golden, guard=(spec, stats))
    return out_dir


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--concurrency", type=int, nargs="+", help="levels (default 1 4 16 on CPU, 1 16 64 256 on GPU)")
    parser.add_argument(
        "--requests", type=int, help="images per level, at least 2x concurrency (default 48 CPU, 4096 GPU)"
    )
    parser.add_argument(
        "--max-seconds", type=float, help="per level: no new request after this (default 60, 30 with --quick)"
    )
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument(
        "--weights", type=Path, help="benchmark these exported weights (e.g. weights/) instead of a random model"
    )
    parser.add_argument(
        "--precision", default="auto", help="engine precision, service and model-only (auto/fp32/fp16/bf16)"
    )
    parser.add_argument("--max-batch-size", type=int, help="CXR_MAX_BATCH_SIZE (default 8 CPU, 128 GPU)")
    parser.add_argument("--max-wait-ms", type=float, help="CXR_MAX_WAIT_MS (service default when omitted)")
    parser.add_argument("--decode-workers", type=int, help="CXR_DECODE_WORKERS (service default when omitted)")
    parser.add_argument("--batch-files", type=int, default=8, help="images per /predict/batch request")
    parser.add_argument("--synthetic", type=int, default=12, help="synthetic uploads added to the real ones")
    parser.add_argument("--real-dir", type=Path, default=DEFAULT_REAL_DIR)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results")
    parser.add_argument(
        "--configs",
        type=cpu_sweep.parse_config,
        nargs="*",
        help="CPU configurations for cpu_configs, BACKEND:PRECISION (default on a CPU: torch:fp32, torch:bf16 where "
        "the CPU has it, openvino:fp32, openvino:int8 where it has int8 dot products; none on a GPU; give the flag "
        "alone for none; one this CPU cannot run is refused)",
    )
    parser.add_argument(
        "--config-sizes",
        type=int,
        nargs="+",
        help="input sizes of the cpu_configs sweep (default 224 and the shipped model's, read from weights/model.json)",
    )
    parser.add_argument(
        "--config-seconds", type=float, help="cpu_configs: seconds per server per level (default 8, 3 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 levels, few requests, short timings")
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if args.concurrency is None:
        args.concurrency = [1, 4] if args.quick else list(GPU_CONCURRENCY if on_gpu else CPU_CONCURRENCY)
    if args.requests is None:
        args.requests = 8 if args.quick else (4096 if on_gpu else 48)
    if args.max_seconds is None:
        args.max_seconds = 30.0 if args.quick else 60.0
    if args.max_batch_size is None:
        args.max_batch_size = 128 if on_gpu else 8
    # A default this CPU cannot run is left out, and the run says so; one asked for is refused.
    asked = args.configs is not None
    configs = args.configs if asked else ([] if on_gpu else cpu_sweep.default_configs())
    args.configs = []
    for config in configs:
        why = cpu_sweep.unsupported(config)
        if why is None:
            args.configs.append(config)
        elif asked:
            parser.error(f"--configs {config[0]}:{config[1]}: this CPU cannot run it ({why})")
        else:
            print(f"cpu_configs: leaving out {config[0]}:{config[1]}: this CPU cannot run it ({why})", flush=True)
    if args.config_sizes is None:
        args.config_sizes = [args.input_size] if args.quick else sorted({224, shipped_input_size()}, reverse=True)
    if args.config_seconds is None:
        args.config_seconds = 3.0 if args.quick else 8.0
    if args.quick:
        args.synthetic = min(args.synthetic, 4)
    return args


def service_env(args: argparse.Namespace, weights: Path, port: int) -> dict[str, str]:
    """The service's settings for this run; unset options keep the service's own defaults."""
    env = {
        "CXR_HOST": "127.0.0.1",
        "CXR_PORT": str(port),
        "CXR_WEIGHTS": str(weights),
        "CXR_DEVICE": args.device,
        "CXR_PRECISION": args.precision,
        "CXR_MAX_BATCH_SIZE": str(args.max_batch_size),
        # Room for a full batch-endpoint request of the largest uploads (2.5 MB each).
        "CXR_MAX_UPLOAD_BYTES": str(64 * 2**20),
        # The naive server never times out; with the 30 s production deadline a saturated CPU
        # turns queueing into 504s and wasted forwards, so throughput would not be comparable.
        "CXR_REQUEST_TIMEOUT_S": "300",
    }
    if args.max_wait_ms is not None:
        env["CXR_MAX_WAIT_MS"] = str(args.max_wait_ms)
    if args.decode_workers is not None:
        env["CXR_DECODE_WORKERS"] = str(args.decode_workers)
    return env


def sweep_env(
    args: argparse.Namespace, weights: Path, port: int, config: cpu_sweep.Config, cache: Path
) -> dict[str, str]:
    """One cpu_configs service: the run's settings with this backend and precision (and its input guard mode)."""
    backend, precision = config
    return {
        **service_env(args, weights, port),
        "CXR_BACKEND": backend,
        "CXR_PRECISION": precision,
        "CXR_CACHE_DIR": str(cache),
        "CXR_INPUT_GUARD": cpu_sweep.guard_mode(config),
    }


async def drive(
    base_url: str, endpoint: str, uploads: Sequence[Upload], args: argparse.Namespace, per_request: int
) -> list[dict[str, Any]]:
    """Warm up, then one load level per concurrency; images in flight ~= the concurrency level."""
    await run_level(base_url, endpoint, uploads, concurrency=2, requests=2, images_per_request=per_request)
    results = []
    for level in args.concurrency:
        clients = max(1, level // per_request)
        count = max(args.requests, 2 * level) // per_request
        result = await run_level(
            base_url,
            endpoint,
            uploads,
            concurrency=clients,
            requests=max(count, clients),
            images_per_request=per_request,
            max_seconds=args.max_seconds,
        )
        result.concurrency = level
        print(
            f"  {endpoint} c={level}: {result.throughput_ips:.2f} img/s p50 {results_table.fmt(result.p50_ms, 0)} ms "
            f"p99 {results_table.fmt(result.p99_ms, 0)} ms errors {result.errors} client_cpu {result.client_cpu:.2f}",
            flush=True,
        )
        results.append(result.as_dict())
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    uploads = real_uploads(args.real_dir) + synthetic_uploads(args.synthetic)
    print(
        f"{len(uploads)} uploads ({sum(len(u.data) for u in uploads) / 2**20:.1f} MiB), device {args.device}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        weights = args.weights or export_random_model(Path(tmp) / "weights", args.input_size, uploads)
        threads = args.decode_workers or min(8, os.cpu_count() or 1)
        decode = decode_bench.run(uploads, args.input_size, threads)
        print(f"decode: {decode}", flush=True)
        batch_sizes = sorted({1, args.max_batch_size})
        seconds = 1.0 if args.quick else 4.0
        model = model_only.measure_engine(weights, args.device, args.precision, batch_sizes, seconds)
        print(f"model only: {model['throughput_ips']:.2f} img/s {model['per_batch_size']}", flush=True)

        levels: dict[str, list[dict[str, Any]]] = {}
        peak_rss: dict[str, float] = {}
        port = free_port()
        with serve(["-m", "app"], service_env(args, weights, port), args.out / "ours-server.log", port) as server:
            print("ours:", flush=True)
            levels["ours_predict"] = asyncio.run(drive(server.base_url, "/predict", uploads, args, 1))
            levels["ours_batch"] = asyncio.run(
                drive(server.base_url, "/predict/batch", uploads, args, args.batch_files)
            )
            peak_rss["ours"] = server.peak_rss_mb()
        port = free_port()
        naive_args = [
            "-m",
            "benchmarks.naive_server",
            "--weights",
            str(weights),
            "--port",
            str(port),
            "--device",
            args.device,
        ]
        with serve(naive_args, {}, args.out / "naive-server.log", port) as server:
            print("naive:", flush=True)
            levels["naive_predict"] = asyncio.run(drive(server.base_url, "/predict", uploads, args, 1))
            peak_rss["naive"] = server.peak_rss_mb()

        cpu_configs = cpu_sweep.run(
            args,
            uploads,
            Path(tmp),
            lambda out, size: export_random_model(out, size, uploads),
            lambda weights, port, config: sweep_env(args, weights, port, config, Path(tmp) / "converted"),
            lambda size: decode_bench.preprocess_ips(uploads, size, threads),
        )

    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings["configs"] = [f"{backend}:{precision}" for backend, precision in args.configs]
    settings["uploads"] = len(uploads)
    doc = results_table.build(
        device=args.device,
        settings=settings,
        levels=levels,
        model_only=model,
        decode=decode,
        peak_rss_mb=peak_rss,
        cpu_configs=cpu_configs,
    )
    print(results_table.write(doc, args.out))
    return doc


if __name__ == "__main__":
    main()
