"""The real service on a GPU gives the CPU fp32 answers: golden images and real X-rays, every route.

Starts ``python -m app`` on ``--device`` (a real uvicorn process), computes the reference
probabilities in this process with the CPU fp32 engine, and compares ``/predict``,
``/predict/batch`` and ``/health``. The tolerance is the engine's own golden tolerance for the
service's precision, converted to probability (|dp| <= |dlogit| / 4). Exits 1 on any mismatch,
error or wrong device, so a GPU host run says pass/fail in one line; ``--out`` keeps the details.

``python -m benchmarks.gpu_service_check --weights weights --images DIR --device cuda --out check.json``
(on a host without a GPU, ``--device cpu --precision bf16`` dry-runs the same path).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from app.core.artifacts import load_model
from app.core.engine import GOLDEN_ATOL, EngineError, load_engine, resolve_device, resolve_dtype
from app.core.preprocessing import preprocess_file
from benchmarks.server_proc import free_port, serve
from training.data import files_under


def golden_pngs(weights: Path) -> list[tuple[str, bytes]]:
    """The model file's golden inputs as lossless PNGs: the service sees exactly those pixels."""
    loaded = load_model(weights)
    assert loaded.golden_inputs is not None
    out = []
    for index, pixels in enumerate(loaded.golden_inputs):
        buffer = io.BytesIO()
        Image.fromarray(pixels[0].numpy(), "L").save(buffer, format="PNG")
        out.append((f"golden-{index}.png", buffer.getvalue()))
    return out


def real_images(folder: Path | None, limit: int) -> list[tuple[str, bytes]]:
    """The first ``limit`` files under ``folder``, taken by content as the service takes them (a PACS export
    names DICOM files by UID, without ``.dcm``); names are numbered, as two subfolders may hold the same name."""
    if folder is None:
        return []
    return [(f"{index:04d}-{p.name}", p.read_bytes()) for index, p in enumerate(files_under(folder)[:limit])]


def reference(weights: Path, files: Sequence[tuple[str, bytes]], tmp: Path) -> tuple[dict[str, float], dict[str, str]]:
    """CPU fp32 probabilities, through the same preprocessing the service uses, and the error code of each
    file that is no image (skipped and reported, not compared)."""
    engine = load_engine(weights, device="cpu", precision="fp32")
    probabilities, skipped = {}, {}
    for name, data in files:
        path = tmp / name
        path.write_bytes(data)
        prepared = preprocess_file(path, engine.input_size)
        if prepared.pixels is None:
            skipped[name] = prepared.error.code if prepared.error else "no pixels"
            continue
        probabilities[name] = engine.infer(engine.collate([prepared.pixels]))[0].probability
    return probabilities, skipped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--images", type=Path, help="folder of real X-rays (JPEG/PNG/DICOM), searched recursively")
    parser.add_argument("--limit", type=int, default=24, help="real images at most")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cxr-gpu-check"))
    args = parser.parse_args(argv)

    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(device, args.precision)
    except EngineError as exc:
        print(f"gpu_service_check: error: {exc}", file=sys.stderr)
        return 2
    golden = load_model(args.weights).metadata.golden
    assert golden is not None, "the model has no golden outputs"
    atol = GOLDEN_ATOL[dtype] * max(1.0, max(abs(v) for row in golden.logits for v in row))  # as check_golden scales
    tolerance = atol / 4.0  # sigmoid'(x) <= 1/4: a logit gap of d moves the probability by at most d / 4
    args.work.mkdir(parents=True, exist_ok=True)
    files = golden_pngs(args.weights) + real_images(args.images, args.limit)
    expected, skipped = reference(args.weights, files, args.work)
    files = [(name, data) for name, data in files if name in expected]

    port = free_port()
    env = {
        "CXR_WEIGHTS": str(args.weights),
        "CXR_DEVICE": args.device,
        "CXR_PRECISION": args.precision,
        # Numbers are compared, not verdicts: a real film the guard refuses (a test-split normal film scores
        # 1.52 against the shipped model's 1.44) still gets its probability, with a warning.
        "CXR_INPUT_GUARD": "flag",
        "CXR_PORT": str(port),
        "CXR_HOST": "127.0.0.1",
        "CXR_LOG_LEVEL": "WARNING",
    }
    report: dict[str, Any] = {
        "device": str(device),
        "precision": str(dtype),
        "tolerance": tolerance,
        "skipped": skipped,
        "images": {},
    }
    failures: list[str] = []
    with (
        serve(["-m", "app"], env, args.work / "service.log", port),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client,
    ):
        health = client.get("/health").json()
        report["health"] = health
        if health.get("status") != "ok" or not str(health.get("device", "")).startswith(device.type):
            failures.append(f"/health: {health}")
        for name, data in files:
            body = client.post("/predict", files={"file": (name, data)}).json()
            got = body.get("pneumonia_probability")
            diff = abs(got - expected[name]) if got is not None else None
            report["images"][name] = {"cpu_fp32": expected[name], "service": got, "diff": diff, "body": body}
            if diff is None or diff > tolerance:
                failures.append(f"/predict {name}: {body if got is None else f'|dp|={diff:.3g}'}")
        batch = client.post("/predict/batch", files=[("files", (n, d)) for n, d in files[:32]]).json()
        for (name, _), item in zip(files[:32], batch.get("results", []), strict=False):
            got = item.get("pneumonia_probability")
            if got is None or abs(got - expected[name]) > tolerance:
                failures.append(f"/predict/batch {name}: {item.get('error') or abs(got - expected[name])}")
        report["batch_items"] = len(batch.get("results", []))
        if report["batch_items"] != min(32, len(files)):
            failures.append(f"/predict/batch answered {report['batch_items']} items")
    report["failures"] = failures
    report["max_diff"] = max((i["diff"] or 0.0) for i in report["images"].values())
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    verdict = "PASS" if not failures else "FAIL"
    print(f"{verdict}: {len(files)} images on {device} ({dtype}); max |dp| {report['max_diff']:.3g} <= {tolerance:.3g}")
    if skipped:
        listed = ", ".join(f"{name} ({code})" for name, code in skipped.items())
        print(f"  skipped {len(skipped)} files that are no image: {listed}")
    for failure in failures[:20]:
        print("  " + failure)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
