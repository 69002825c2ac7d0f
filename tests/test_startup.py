"""``python -m app`` as operators run it: refuses bad models/settings in one line, serves, stops on SIGTERM."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.__main__ import main
from app.api import service as service_module
from app.core.decode_pool import DecodePool, DecoderFailedError
from app.core.openvino_backend import cpu_capabilities
from tests.conftest import export_tiny_model, rewrite_model
from tests.live_server import LiveServer, serving_settings, wait_for

HAS_INT8 = "INT8" in cpu_capabilities()
REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(module_args: list[str], **env: str) -> subprocess.Popen[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CXR_")}
    clean.update({"CXR_HOST": "127.0.0.1", "CXR_PORT": str(free_port()), "CXR_DEVICE": "cpu", **env})
    return subprocess.Popen(
        [sys.executable, "-m", *module_args],
        cwd=REPO,
        env=clean,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def copy_with(tiny_weights: Path, dest: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of the tiny model whose model.json went through ``edit``."""
    shutil.copytree(tiny_weights, dest)
    if edit is not None:
        rewrite_model(dest, edit_meta=edit)
    return dest


def _sha(meta: dict) -> None:
    meta["sha256"] = "0" * 64


def _head(meta: dict) -> None:
    meta["spec"]["head"] = "classic"


def _golden(meta: dict) -> None:
    meta["golden"]["logits"] = [[value + 1.0 for value in row] for row in meta["golden"]["logits"]]


@pytest.fixture(scope="module")
def refusals(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Start the broken deployments at once (each pays the torch import) and collect the outcomes."""
    root = tmp_path_factory.mktemp("broken")
    cases: dict[str, tuple[list[str], dict[str, str]]] = {
        "missing_files": (["app"], {"CXR_WEIGHTS": str(root / "nothing-here")}),
        "sha256": (["app"], {"CXR_WEIGHTS": str(copy_with(tiny_weights, root / "sha", _sha))}),
        "architecture": (["app"], {"CXR_WEIGHTS": str(copy_with(tiny_weights, root / "arch", _head))}),
        "uvicorn_entry": (["uvicorn", "app.main:app"], {"CXR_WEIGHTS": str(copy_with(tiny_weights, root / "u", _sha))}),
        "no_guard": (["app"], {"CXR_WEIGHTS": str(export_tiny_model(root / "bare", guard=False))}),
        # CPU fast path (issue 14): combinations that cannot be honoured are refused before any conversion.
        "int8_on_torch": (["app"], {"CXR_WEIGHTS": str(tiny_weights), "CXR_PRECISION": "int8"}),
        "int8_uncalibrated": (
            ["app"],
            {"CXR_WEIGHTS": str(tiny_weights), "CXR_BACKEND": "openvino", "CXR_PRECISION": "int8"},
        ),
        "fp16_openvino": (
            ["app"],
            {"CXR_WEIGHTS": str(tiny_weights), "CXR_BACKEND": "openvino", "CXR_PRECISION": "fp16"},
        ),
    }
    processes = {name: launch(args, **env) for name, (args, env) in cases.items()}
    outcomes = {}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=STARTUP_TIMEOUT_S)
        outcomes[name] = (process.returncode, stderr)
    return outcomes


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing_files", "model metadata not found"),
        ("sha256", "sha256 mismatch"),
        ("architecture", "do not fit vgg16/classic"),
        ("uvicorn_entry", "sha256 mismatch"),
        ("no_guard", "has no input guard: re-export it with the training package, or set CXR_INPUT_GUARD=off"),
        ("int8_on_torch", "precision int8 needs CXR_BACKEND=openvino (or auto on a CPU host)"),
        # A CPU without int8 dot products refuses int8 first: no calibration would make it right there.
        (
            "int8_uncalibrated",
            "int8 needs measured activation ranges" if HAS_INT8 else "int8 is not supported by this CPU",
        ),
        ("fp16_openvino", "precision fp16 needs a CUDA device; on the CPU use fp32, bf16 or int8"),
    ],
)
def test_bad_model_refuses_to_start(refusals: dict[str, tuple[int, str]], case: str, reason: str) -> None:
    returncode, stderr = refusals[case]
    assert returncode != 0
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if reason in line]
    assert json.loads(line)["message"].startswith("startup failed: ")


def _no_weights(tiny_weights: Path, dest: Path) -> Path:
    copy = copy_with(tiny_weights, dest)
    (copy / "model.safetensors").unlink()
    return copy


@pytest.mark.parametrize(
    ("make_weights", "overrides", "reason"),
    [
        (_no_weights, {}, "model weights not found"),
        (lambda weights, dest: copy_with(weights, dest, _golden), {}, "golden check failed"),
        (lambda weights, dest: weights, {"device": "cuda:0"}, "'cuda:0' was requested but no CUDA GPU is available"),
    ],
    ids=["weights_missing", "golden_mismatch", "cuda_missing"],
)
def test_failed_lifespan_logs_one_line_and_never_serves(
    tiny_weights: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    make_weights: Callable[[Path, Path], Path],
    overrides: dict[str, str],
    reason: str,
) -> None:
    """The same lifespan path as the subprocess cases, in-process so each costs no interpreter start.

    The decoder workers start while the model loads; a model that then fails must not leave them running.
    """
    if overrides.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    # Kept referenced here, so only an explicit close (not garbage collection closing its pipes) ends the workers.
    pools: list[tuple[DecodePool, list[multiprocessing.process.BaseProcess]]] = []

    class RecordedPool(DecodePool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            pools.append((self, [worker.process for worker in self._all]))

    monkeypatch.setattr(service_module, "DecodePool", RecordedPool)
    server = LiveServer(serving_settings(make_weights(tiny_weights, tmp_path / "w"), **overrides))
    with pytest.raises(RuntimeError, match="did not start"):
        server.start()
    assert server.exit_code == 3
    # A bad device is refused before anything starts; a bad weights file after the workers have started.
    assert len(pools) == (0 if "device" in overrides else 1)
    for _, processes in pools:
        for process in processes:
            process.join(timeout=5)
            assert process.exitcode is not None
    assert_one_line_failure(caplog, reason)


def assert_one_line_failure(caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """uvicorn's first error of the failed startup is our one-line reason, not a traceback."""
    failures = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error" and r.levelno == logging.ERROR]
    assert failures[0].startswith("startup failed: ")
    assert reason in failures[0] and "\n" not in failures[0]


def test_decoder_start_failure_logs_one_line(
    tiny_weights: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoder workers that cannot start (e.g. the OS refuses their memory cap) stop the service like a bad model."""

    class UnstartablePool(DecodePool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise DecoderFailedError("a decoder worker did not start: OverflowError: Python int too large")

    monkeypatch.setattr(service_module, "DecodePool", UnstartablePool)
    server = LiveServer(serving_settings(tiny_weights))
    with pytest.raises(RuntimeError, match="did not start"):
        server.start()
    assert server.exit_code == 3
    assert_one_line_failure(caplog, "a decoder worker did not start: OverflowError")


def test_invalid_setting_refuses_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CXR_MAX_BATCH_SIZE", "lots")
    assert main() == 2
    assert capsys.readouterr().err.splitlines() == [
        "cxr-pneumonia: invalid setting CXR_MAX_BATCH_SIZE: Input should be a valid integer, unable to parse string as"
        " an integer"
    ]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CXR_BACKEND", "onnxruntime", "invalid setting CXR_BACKEND: Input should be 'auto', 'torch' or 'openvino'"),
        ("CXR_PRECISION", "int4", "invalid setting CXR_PRECISION: Input should be 'auto', 'fp16', 'bf16', 'fp32' or"),
        ("CXR_BATCH_PROBE_S", "-1", "invalid setting CXR_BATCH_PROBE_S: Input should be greater than or equal to 0"),
    ],
)
def test_invalid_fast_path_setting_refuses_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    assert main() == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"cxr-pneumonia: {message}")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_serves_then_shuts_down_gracefully_on_a_signal(tiny_weights: Path, stop: signal.Signals) -> None:
    """Ctrl-C (SIGINT) ends as SIGTERM does: drained, killed by the signal, and no KeyboardInterrupt traceback."""
    port = free_port()
    process = launch(["app"], CXR_WEIGHTS=str(tiny_weights), CXR_PORT=str(port))
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, "server exited during startup"
                return False

        wait_for(ready, STARTUP_TIMEOUT_S)
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    # uvicorn re-raises the captured signal after its graceful shutdown, so the status names it.
    assert process.returncode == -stop, stderr
    assert "Traceback" not in stderr
    messages = [json.loads(line)["message"] for line in stderr.splitlines()]
    assert "model ready" in messages and "Application shutdown complete." in messages


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        # Each was accepted, and the server reported healthy while answering every image with an error.
        ("CXR_DECODE_TIMEOUT_S", "3000000", "Input should be less than or equal to 86400"),  # poll() overflow
        ("CXR_DECODE_TIMEOUT_S", "inf", "Input should be a finite number"),
        ("CXR_DECODE_TIMEOUT_S", "nan", "Input should be a finite number"),
        ("CXR_MAX_PIXELS", str(2**64), "Input should be less than or equal to 1099511627776"),  # struct.pack
        ("CXR_MAX_DECODE_BYTES", str(4 * 10**18), "Input should be less than or equal to 1099511627776"),  # setrlimit
        # Accepted, then hung or failed at first use: 10^20 decoder processes, a wait without end.
        ("CXR_DECODE_WORKERS", str(10**20), "Input should be less than or equal to 256"),
        ("CXR_LARGE_DECODES", "100000", "Input should be less than or equal to 64"),
        ("CXR_QUEUE_SIZE", str(10**20), "Input should be less than or equal to 65536"),
        ("CXR_REQUEST_TIMEOUT_S", "inf", "Input should be a finite number"),
        ("CXR_BODY_TIMEOUT_S", "1e20", "Input should be less than or equal to 86400"),
        ("CXR_HEADER_TIMEOUT_S", "nan", "Input should be a finite number"),
        ("CXR_KEEP_ALIVE_S", str(10**20), "Input should be less than or equal to 86400"),
    ],
)
def test_a_setting_that_would_fail_every_image_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    assert main() == 2
    assert capsys.readouterr().err.splitlines() == [f"cxr-pneumonia: invalid setting {name}: {message}"]
