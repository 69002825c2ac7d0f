"""Service startup with the OpenVINO backend: converting from scratch, then from the conversion cache.

Each start is ``python -m app`` as a subprocess, timed from launch to the first healthy
``/health`` (model load and sha256 check, ONNX export and int8 quantization or the cache read,
OpenVINO compile, golden check, the CPU batch-size probe, decoder workers). The first start of
each precision gets an empty cache folder; the second start reuses it, and its log must say
``cache hit`` (the start would otherwise not be measuring the cache). A torch fp32 start is timed
in the same run as the baseline.

    python -m benchmarks.startup_time --weights weights --precisions fp32 int8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.server_proc import free_port, serve


def start_once(weights: Path, backend: str, precision: str, cache: Path, guard: str, log: Path) -> dict[str, object]:
    """Seconds from launch to healthy, and what /model says about the conversion."""
    port = free_port()
    env = {
        "CXR_HOST": "127.0.0.1",
        "CXR_PORT": str(port),
        "CXR_WEIGHTS": str(weights),
        "CXR_DEVICE": "cpu",
        "CXR_BACKEND": backend,
        "CXR_PRECISION": precision,
        "CXR_CACHE_DIR": str(cache),
        "CXR_INPUT_GUARD": guard,
    }
    started = time.perf_counter()
    with serve(["-m", "app"], env, log, port) as server:
        seconds = time.perf_counter() - started
        card = httpx.get(f"{server.base_url}/model", timeout=30).json()
    return {"seconds": round(seconds, 2), "backend": card["backend"], "batching": card["batching"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "bf16", "int8"])
    parser.add_argument("--input-guard", default="off", choices=["reject", "flag", "off"])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-startup-") as tmp:
        results["torch fp32"] = start_once(
            args.weights, "torch", "fp32", Path(tmp) / "unused", args.input_guard, args.out / "startup-torch.log"
        )
        print(f"torch fp32: {results['torch fp32']['seconds']} s", flush=True)  # type: ignore[index]
        for precision in args.precisions:
            cache = Path(tmp) / f"cache-{precision}"
            for attempt in ("scratch", "cache"):
                log = args.out / f"startup-openvino-{precision}-{attempt}.log"
                result = start_once(args.weights, "openvino", precision, cache, args.input_guard, log)
                status = result["backend"]["conversion"]["cache"]  # type: ignore[index]
                expected = "hit" if attempt == "cache" else "built"
                if status != expected:
                    raise SystemExit(
                        f"openvino {precision} {attempt}: conversion cache says {status!r}, not {expected}"
                    )
                results[f"openvino {precision} {attempt}"] = result
                print(f"openvino {precision} from {attempt}: {result['seconds']} s (cache {status})", flush=True)
    (args.out / "startup.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
