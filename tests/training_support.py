"""Synthetic Kermany-style datasets and a simulated crash for the training tests (no test functions here)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.trainer
from app.core.artifacts import load_model
from tests.conftest import encode, synthetic_xray
from training.cli import main

IMAGE_SIDE = 48
INPUT_SIZE = 32


def pneumonia_xray(seed: int) -> Image.Image:
    """The synthetic X-ray with a bright opacity over one lung, so the classes differ visibly."""
    pixels = np.asarray(synthetic_xray(IMAGE_SIDE, IMAGE_SIDE, seed), dtype=np.float64)
    rng = np.random.default_rng(seed + 10_000)
    cy, cx = rng.uniform(0.3, 0.7) * IMAGE_SIDE, rng.choice([0.3, 0.7]) * IMAGE_SIDE
    yy, xx = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE]
    pixels += 90 * np.exp(-(((yy - cy) / 8.0) ** 2 + ((xx - cx) / 8.0) ** 2))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")


def normal_names(patients: range, per_patient: int) -> list[str]:
    """Alternate the two NORMAL naming schemes (IM-XXXX-YYYY and NORMAL2-IM-XXXX-YYYY)."""
    prefix = ("IM", "NORMAL2-IM")
    return [f"{prefix[p % 2]}-{p:04d}-{k + 1:04d}.jpeg" for p in patients for k in range(per_patient)]


def pneumonia_names(patients: range, per_patient: int) -> list[str]:
    kind = ("bacteria", "virus")
    return [f"person{p}_{kind[p % 2]}_{p * 10 + k}.jpeg" for p in patients for k in range(per_patient)]


def write_split(root: Path, normal: list[str], pneumonia: list[str], seed: int = 0) -> Path:
    """Write JPEGs to ``root/NORMAL`` and ``root/PNEUMONIA``; returns ``root``."""
    for index, name in enumerate(normal):
        path = root / "NORMAL" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(synthetic_xray(IMAGE_SIDE, IMAGE_SIDE, seed * 1000 + index), "JPEG", quality=90))
    for index, name in enumerate(pneumonia):
        path = root / "PNEUMONIA" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(pneumonia_xray(seed * 1000 + 500 + index), "JPEG", quality=90))
    return root


def make_dataset(root: Path, *, normal_patients: int = 8, pneumonia_patients: int = 8, per_patient: int = 2) -> Path:
    """``root/train/{NORMAL,PNEUMONIA}`` with several images per patient (no val split)."""
    write_split(
        root / "train",
        normal_names(range(1, normal_patients + 1), per_patient),
        pneumonia_names(range(1, pneumonia_patients + 1), per_patient),
    )
    return root


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A fast CLI invocation: tiny compact VGG16 at 32 px, no bootstrap."""
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--input-size",
        str(INPUT_SIZE),
        "--init",
        "scratch",
        "--arch",
        "vgg16",
        "--head",
        "compact",
        "--batch-size",
        "16",
        "--val-fraction",
        "0.3",
        "--bootstrap",
        "20",
        "--workers",
        "2",
        "--patience",
        "0",
        "--lr",
        "1e-3",
        *extra,
    ]


class InterruptedRunError(Exception):
    """What :func:`crash_in_epoch` raises in place of a real crash."""


def crash_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Make the trainer die at the start of its ``epoch``-th epoch (1-based) of this process, as a kill would."""
    original = training.trainer.train_one_epoch
    calls: list[object] = []

    def crashing(*args: object, **kwargs: object) -> object:
        calls.append(kwargs["description"])
        if len(calls) == epoch:
            raise InterruptedRunError
        return original(*args, **kwargs)

    monkeypatch.setattr(training.trainer, "train_one_epoch", crashing)


def crash_then_resume(monkeypatch: pytest.MonkeyPatch, argv: list[str], out: Path) -> None:
    """Run ``argv`` (training into ``out``) until it dies at the start of epoch 2, then finish it with --resume."""
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(InterruptedRunError):
        main(argv)
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0


def history(run: Path) -> list[dict[str, object]]:
    """The run's metrics.jsonl, one dict per finished epoch."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    """A crashed-and-resumed run replayed the uninterrupted one: same epochs, losses, AUCs and exported weights."""
    ours, theirs = history(resumed), history(uninterrupted)
    assert [row["epoch"] for row in ours] == [row["epoch"] for row in theirs]
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-4)
        assert mine["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-4)
        assert mine["val_auc"] == pytest.approx(reference["val_auc"], abs=1e-6)
    resumed_weights = load_model(resumed).network.state_dict()
    for key, value in load_model(uninterrupted).network.state_dict().items():
        torch.testing.assert_close(resumed_weights[key], value, atol=1e-4, rtol=1e-4)


def last_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's one ``error:`` line, after whatever log lines the run printed before it."""
    return capsys.readouterr().err.strip().splitlines()[-1]


def refused_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI on ``argv``, which must exit 2 with exactly one ``error:`` line and no traceback; returns it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def tampered_copy(model_dir: Path, to: Path) -> Path:
    """A copy of an exported model (model.json + model.safetensors) with one bit of its weights flipped."""
    to.mkdir(parents=True)
    for name in ("model.json", "model.safetensors"):
        (to / name).write_bytes((model_dir / name).read_bytes())
    weights = bytearray((to / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (to / "model.safetensors").write_bytes(bytes(weights))
    return to


@contextmanager
def lock_held_elsewhere(run_dir: Path) -> Iterator[int]:
    """Another process holds ``run_dir``'s run lock, as a live run does; yields its pid, then SIGKILLs it."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from training.distributed import DistInfo; "
            "from training.run_lock import run_lock\n"
            "with run_lock(Path(sys.argv[1]), DistInfo()):\n"
            "    print('held', flush=True); time.sleep(120)",
            str(run_dir),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)  # however it ends, the kernel drops the lock with the process
        holder.wait(timeout=30)
