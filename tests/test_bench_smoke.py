"""Smoke tests for the serving benchmark: its statistics and one tiny end-to-end load run."""

from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.loadgen import percentile, run_level, scored_images, summarize
from benchmarks.server_proc import free_port, serve
from benchmarks.uploads import TARGET_BYTES, Upload, synthetic_uploads
from tests.conftest import AVX2_EPYC, CASCADE_LAKE, encode, export_tiny_model, synthetic_xray

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("q", [0, 25, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 100.0]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="must be in"):
        percentile([1.0], 101)


def test_summarize_counts_images_errors_and_client_share() -> None:
    result = summarize(
        "/predict", 4, 4, [0.1, 0.2, 0.3], images=3, errors=["HTTP 503: x"], duration_s=2.0, client_cpu_s=0.5
    )
    assert (result.requests, result.errors, result.images) == (4, 1, 3)
    assert result.throughput_ips == pytest.approx(1.5)
    assert result.p50_ms == pytest.approx(200.0)
    assert result.client_cpu == pytest.approx(0.25)
    assert summarize("/predict", 1, 1, [], images=0, errors=["boom"], duration_s=1.0).p99_ms is None


def test_batch_response_file_errors_are_not_counted_as_scored() -> None:
    body = {"results": [{"probability": 0.3}, {"filename": "x", "error": {"code": "corrupt_image"}}]}
    scored, failed = scored_images(body, 2)
    assert scored == 1 and len(failed) == 1 and "corrupt_image" in failed[0]
    assert scored_images({"probability": 0.3}, 1) == (1, [])


def test_synthetic_upload_is_a_realistic_size() -> None:
    (upload,) = synthetic_uploads(1, seed=7)
    assert 1_000_000 <= upload.width * upload.height <= 3_000_000
    low, high = TARGET_BYTES
    assert low * 0.8 <= len(upload.data) <= high * 1.2
    assert upload.data.startswith(b"\xff\xd8\xff")


@pytest.mark.timeout(120)
def test_two_requests_against_the_real_service(tmp_path: Path) -> None:
    """Start ``python -m app`` on a 32 px model and drive both endpoints with the load generator."""
    weights = export_tiny_model(tmp_path / "weights")
    uploads = [Upload(f"u{seed}.jpeg", encode(synthetic_xray(120, 100, seed), "JPEG"), 120, 100) for seed in range(2)]
    port = free_port()
    env = {"CXR_HOST": "127.0.0.1", "CXR_PORT": str(port), "CXR_WEIGHTS": str(weights), "CXR_DEVICE": "cpu"}
    with serve(["-m", "app"], env, tmp_path / "server.log", port, startup_timeout_s=90) as server:
        single = asyncio.run(run_level(server.base_url, "/predict", uploads, concurrency=2, requests=2))
        batch = asyncio.run(
            run_level(server.base_url, "/predict/batch", uploads, concurrency=1, requests=1, images_per_request=2)
        )
        bad = asyncio.run(run_level(server.base_url, "/nope", uploads, concurrency=1, requests=1))
        rss = server.peak_rss_mb()
    assert (single.errors, single.images, single.requests) == (0, 2, 2), single.error_samples
    assert (batch.errors, batch.images) == (0, 2), batch.error_samples
    assert bad.errors == 1 and bad.images == 0
    assert single.p50_ms is not None and single.p50_ms > 0
    assert rss > 50  # a Python process with torch loaded


def test_explain_bench_prints_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import explain_bench

    explain_bench.main(["--input-size", "32", "--batch-size", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    for name in ("none", "one", "all"):
        assert f"explain {name}" in out
    assert "ratio to none: 1.000" in out and "map step alone" in out


def test_bench_model_guard_leaves_headroom_over_every_upload(tmp_path: Path) -> None:
    """Regression: the bench model's guard threshold was the top upload's own score, so CPU fp32 jitter
    between batch sizes refused that upload now and then (422 not_chest_xray in a quiet `make bench`)."""
    from app.core.artifacts import load_model
    from app.core.input_guard import guard_scores, guard_vectors
    from app.core.preprocessing import preprocess
    from benchmarks import serve_bench

    uploads = [Upload(f"u{seed}.jpeg", encode(synthetic_xray(120, 100, seed), "JPEG"), 120, 100) for seed in range(4)]
    model = load_model(serve_bench.export_random_model(tmp_path / "w", 32, uploads))
    guard = model.metadata.guard
    assert guard is not None and model.guard is not None
    pixels = torch.stack([preprocess(upload.data, 32) for upload in uploads])
    blocks = (guard.mean_blocks, guard.std_blocks)
    for batch_size in (1, len(uploads)):
        scores = guard_scores(guard_vectors(model.network, pixels, blocks, batch_size), model.guard)
        assert float(scores.max()) < 0.9 * guard.threshold


def test_full_sweep_sizes_follow_the_shipped_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config-sizes a full run measures 224 px and the shipped model's own size, read from its metadata."""
    from benchmarks import serve_bench

    metadata = json.loads((serve_bench.SHIPPED_WEIGHTS / "model.json").read_text())
    for size, expected in ((96, [224, 96]), (224, [224])):
        folder = tmp_path / str(size)
        folder.mkdir()
        metadata["spec"]["input_size"] = size
        (folder / "model.json").write_text(json.dumps(metadata))
        monkeypatch.setattr(serve_bench, "SHIPPED_WEIGHTS", folder)
        assert serve_bench.parse_args([]).config_sizes == expected


def test_cpu_sweep_leaves_out_and_refuses_what_this_cpu_cannot_run(
    simulate_cpu,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import serve_bench

    simulate_cpu(AVX2_EPYC)
    configs = serve_bench.parse_args(["--quick"]).configs
    assert ("openvino", "fp32") in configs and ("openvino", "int8") not in configs
    assert "leaving out openvino:int8: this CPU cannot run it (it has no int8 dot-product" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        serve_bench.parse_args(["--quick", "--configs", "torch:fp32", "openvino:int8"])
    assert exit_.value.code == 2 and "--configs openvino:int8: this CPU cannot run it" in capsys.readouterr().err
    simulate_cpu(CASCADE_LAKE)
    assert ("openvino", "int8") in serve_bench.parse_args(["--quick"]).configs


@pytest.mark.parametrize(
    "args", [["--precision", "int8"], ["--backend", "torch", "--precision", "fp32", "--calibrate", "300"]]
)
def test_accuracy_gate_refuses_to_measure_int8_on_a_cpu_that_cannot_serve_it(
    args: list[str],
    simulate_cpu,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Before any image is read: ranges and guard noise measured on saturating kernels would be wrong."""
    from benchmarks import accuracy_gate

    simulate_cpu(AVX2_EPYC)
    with pytest.raises(SystemExit) as exit_:
        accuracy_gate.main(["--weights", str(tmp_path / "absent"), "--data", str(tmp_path / "absent"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "OpenVINO int8 cannot be measured on this CPU (it has no int8 dot-product" in err


@pytest.mark.timeout(400)
def test_cpu_sweep_drives_each_configuration_against_the_naive_server(tmp_path: Path) -> None:
    """The ``cpu_configs`` part of ``make bench --quick`` on a 32 px model: torch fp32 and OpenVINO's fastest.

    OpenVINO int8 where this CPU has int8 dot products, else OpenVINO fp32: the service runs in its
    own process, on the real CPU, and refuses int8 on one without them.
    """
    from app.core.openvino_backend import cpu_capabilities
    from benchmarks import cpu_sweep, decode_bench, results_table, serve_bench

    fast = "int8" if "INT8" in cpu_capabilities() else "fp32"
    guard = "off" if fast == "int8" else "flag"
    uploads = [Upload(f"u{seed}.jpeg", encode(synthetic_xray(120, 100, seed), "JPEG"), 120, 100) for seed in range(3)]
    out = tmp_path / "out"
    args = serve_bench.parse_args(
        [
            *("--quick", "--input-size", "32", "--concurrency", "2", "--requests", "4", "--config-seconds", "2"),
            *("--out", str(out), "--configs", "torch:fp32", f"openvino:{fast}"),
        ]
    )
    assert args.config_sizes == [32]
    entries = cpu_sweep.run(
        args,
        uploads,
        tmp_path,
        lambda folder, size: serve_bench.export_random_model(folder, size, uploads),
        lambda weights, port, config: serve_bench.sweep_env(args, weights, port, config, tmp_path / "converted"),
        lambda size: decode_bench.preprocess_ips(uploads, size, 2),
    )
    assert [(e["backend"], e["precision"], e["input_guard"], e["input_size"], e["concurrency"]) for e in entries] == [
        ("torch", "fp32", "flag", 32, 2),
        ("openvino", fast, guard, 32, 2),
    ]
    for entry in entries:
        assert entry["ours"]["errors"] == 0 and entry["naive"]["errors"] == 0, entry
        assert min(entry[key]["throughput_ips"] for key in ("ours", "naive", "model_only", "decode")) > 0
        # The ceiling is the harmonic combination of the two rates: below each, and exact.
        model, decode = entry["model_only"]["throughput_ips"], entry["decode"]["throughput_ips"]
        assert entry["ceiling"]["throughput_ips"] == pytest.approx(model * decode / (model + decode))
    # The service really served that precision in OpenVINO (its startup log says so), not a fallback.
    assert f"CPU inference in OpenVINO {fast}" in (out / f"ours-openvino-{fast}-32.log").read_text()
    table = results_table.markdown(
        results_table.build(
            device="cpu",
            settings={},
            levels={
                "ours_predict": [{"concurrency": 2, **entries[0]["ours"], "endpoint": "/predict", "p95_ms": None}],
                "naive_predict": [{"concurrency": 2, **entries[0]["naive"], "endpoint": "/predict", "p95_ms": None}],
            },
            model_only={"throughput_ips": 1.0, "per_batch_size": {}, "precision": "fp32"},
            decode={
                "preprocess_1_thread_ips": 1.0,
                "preprocess_n_threads_ips": 1.0,
                "threads": 2,
                "naive_1_thread_ips": 1,
            },
            peak_rss_mb={},
            cpu_configs=entries,
        )
    )
    assert f"| openvino | {fast} | {guard} | 32 | 2 |" in table


@pytest.mark.timeout(180)
def test_gpu_service_check_dry_run_takes_a_folder_by_content(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The GPU check's CPU dry run: a UID-named DICOM-style file without suffix and a film in a subfolder are
    compared, a note is skipped and reported, and a film the guard fails still gets its probability compared."""
    from benchmarks import gpu_service_check

    weights = export_tiny_model(tmp_path / "weights")
    images = tmp_path / "images"
    (images / "NORMAL").mkdir(parents=True)
    (images / "1.2.840.113619.2.55").write_bytes(encode(synthetic_xray(120, 100, 1), "JPEG"))
    (images / "NORMAL" / "1.2.840.113619.2.55").write_bytes(encode(synthetic_xray(120, 100, 2), "PNG"))
    (images / "README.txt").write_text("films from ward 3\n")
    (images / "white.png").write_bytes(encode(Image.new("L", (120, 100), 255), "PNG"))
    out = tmp_path / "check.json"
    argv = ["--weights", str(weights), "--images", str(images), "--device", "cpu", "--precision", "fp32"]
    rc = gpu_service_check.main([*argv, "--out", str(out), "--work", str(tmp_path / "work")])
    report = json.loads(out.read_text())
    assert rc == 0, report["failures"]
    assert report["skipped"] == {"0002-README.txt": "unsupported_media_type"}
    compared = [name for name in report["images"] if not name.startswith("golden-")]
    assert compared == ["0000-1.2.840.113619.2.55", "0001-1.2.840.113619.2.55", "0003-white.png"]
    white = report["images"]["0003-white.png"]["body"]
    assert white["input_guard"]["passed"] is False and white["warning"]
    assert "skipped 1 files that are no image: 0002-README.txt (unsupported_media_type)" in capsys.readouterr().out


@pytest.mark.parametrize("module", sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem != "__init__"))
def test_every_benchmark_imports(module: str) -> None:
    """A benchmark that no longer imports is evidence that can no longer be reproduced (guard_measure was)."""
    importlib.import_module(f"benchmarks.{module}")


def test_each_planted_bug_still_finds_the_line_it_edits() -> None:
    """benchmarks/planted_bugs.py edits exact lines; when the code moves, its bug must move with it."""
    from benchmarks.planted_bugs import BUGS

    for name, path, old, _new, tests in BUGS:
        assert (REPO / path).read_text().count(old) == 1, name
        assert all((REPO / test).is_file() for test in tests), name


def test_guard_measure_reports_every_candidate_on_every_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The evidence behind the guard's design runs end to end (as committed it never ran: two helpers it
    imported did not exist)."""
    from benchmarks import guard_measure
    from tests.training_support import make_dataset

    data = make_dataset(tmp_path / "data", normal_patients=10, pneumonia_patients=10)
    weights = export_tiny_model(tmp_path / "weights")
    ood = tmp_path / "ood"
    (ood / "blank").mkdir(parents=True)
    (ood / "control_cxr").mkdir()
    for index in range(3):
        Image.new("L", (64, 64), 255 - index).save(ood / "blank" / f"white{index}.png")
        synthetic_xray(96, 80, seed=40 + index).save(ood / "control_cxr" / f"cxr{index}.png")
    Image.new("L", (8, 8), 255).save(ood / "blank" / "thumbnail.png")  # refused by the decoder, counted apart
    out = tmp_path / "rates.json"
    argv = ["--weights", str(weights), "--data", str(data), "--ood", str(ood), "--cache", str(tmp_path / "cache")]
    assert guard_measure.main([*argv, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rates = json.loads(out.read_text())
    assert "maha_block_means_stds+detail_floor" in rates and "contrast_only" in rates
    for name, row in rates.items():
        assert {"threshold", "val", "blank", "control_cxr", "ood_all"} <= row.keys(), name
        assert row["ood_all"] == row["blank"], name  # control_ folders are not out-of-distribution
    assert rates["contrast_only"]["blank"] == 1.0 and rates["contrast_only"]["control_cxr"] == 0.0
    assert "| blank (3, 1 refused by the decoder) |" in table


def test_detail_check_prints_a_row_per_degradation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import detail_check
    from tests.conftest import add_detail_floor

    weights = export_tiny_model(tmp_path / "weights")
    assert detail_check.main([str(weights), str(tmp_path)]) == 2  # no floor: nothing to check
    add_detail_floor(weights, 1.3)
    (tmp_path / "films" / "NORMAL").mkdir(parents=True)
    for index in range(3):
        synthetic_xray(160, 150, seed=60 + index).save(tmp_path / "films" / "NORMAL" / f"n{index}.png")
    assert detail_check.main([str(weights), str(tmp_path / "films")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "/3 (" in line]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(detail_check.DEGRADATIONS)
    assert rows[0].split(" | ")[2] == "0/3 (0.0%)"  # sharp films are not under the floor
    for row in rows:  # the guard refuses at least what is under its floor
        under, refused = (int(cell.split("/")[0]) for cell in row.split(" | ")[2:4])
        assert refused >= under, row
