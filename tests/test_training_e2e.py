"""End to end on a tiny synthetic dataset: train, checkpoint, resume, calibrate, export, evaluate."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import training.trainer
from app.core.artifacts import load_model
from app.core.decision import pneumonia_probability
from app.core.network import ModelSpec, build_model
from tests.training_support import (
    INPUT_SIZE,
    InterruptedRunError,
    assert_same_run,
    crash_in_epoch,
    history,
    last_error,
    make_dataset,
    normal_names,
    pneumonia_names,
    tampered_copy,
    train_args,
    write_split,
)
from training.checkpoint import load_checkpoint
from training.cli import main
from training.loops import predict_logits
from training.report import PLOT_FILES
from training.split import patient_id

CORRUPT_NAME = "person999_bacteria_9990.jpeg"
METRIC_KEYS = {
    "n",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
    "threshold",
    "tp",
    "fp",
    "tn",
    "fn",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_dataset(tmp_path_factory.mktemp("data"))
    (root / "train" / "PNEUMONIA" / CORRUPT_NAME).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


@pytest.fixture(scope="module")
def run_dir(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(dataset, out, "--epochs", "2")) == 0
    return out


def test_run_writes_checkpoints_metrics_and_export(run_dir: Path) -> None:
    assert [row["epoch"] for row in history(run_dir)] == [1, 2]
    for name in (
        "model.safetensors",
        "model.json",
        "config.json",
        "split.json",
        "summary.json",
        "checkpoint/last.safetensors",
        "checkpoint/last.json",
        "checkpoint/best.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["provenance"]["input_size"] == INPUT_SIZE and meta["provenance"]["init"] == "scratch"
    assert len(meta["provenance"]["data_hash"]) == 64
    # One start, by the code the export also records (a git checkout here, or null both).
    [start] = meta["provenance"]["starts"]
    assert start["epochs_done"] == 0 and start["git_commit"] == meta["provenance"]["git_commit"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert meta["temperature"] == summary["temperature"] != 1.0
    # The threshold is the highest one that still catches 95% of validation pneumonia (computed here by hand).
    rows = list(csv.DictReader((run_dir / "val_report" / "predictions.csv").open()))
    positives = sorted((float(r["probability"]) for r in rows if r["label"] == "PNEUMONIA"), reverse=True)
    needed = -(-95 * len(positives) // 100)  # ceil(0.95 * n)
    assert meta["threshold"] == pytest.approx(positives[needed - 1], abs=1e-6)
    assert meta["metrics"]["validation"].keys() >= METRIC_KEYS


def test_split_is_grouped_by_patient(run_dir: Path) -> None:
    split = json.loads((run_dir / "split.json").read_text())
    train = {patient_id(row["path"]) for row in split["train"]}
    val = {patient_id(row["path"]) for row in split["val"]}
    assert train and val and not train & val
    assert {row["label"] for row in split["val"]} == {"NORMAL", "PNEUMONIA"}


def test_unreadable_image_is_skipped_and_reported(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [Path(item["path"]).name for item in summary["unreadable"]] == [CORRUPT_NAME]
    assert summary["provenance"]["unreadable_files"] == 1
    assert CORRUPT_NAME in (run_dir / "train.log").read_text()
    split = json.loads((run_dir / "split.json").read_text())
    assert all(Path(row["path"]).name != CORRUPT_NAME for side in split.values() for row in side)


def test_export_reproduces_training_side_predictions(run_dir: Path) -> None:
    loaded = load_model(run_dir)
    spec = ModelSpec(architecture="vgg16", head="compact", input_size=INPUT_SIZE)
    assert loaded.metadata.spec == spec
    trained = build_model(spec)
    load_checkpoint(run_dir, "best", trained)
    rows = list(csv.DictReader((run_dir / "val_report" / "predictions.csv").open()))
    from app.core.preprocessing import preprocess

    pixels = torch.stack([preprocess(Path(row["path"]).read_bytes(), INPUT_SIZE) for row in rows])
    ours = predict_logits(trained, pixels, batch_size=16, device=torch.device("cpu"))
    served = predict_logits(loaded.network, pixels, batch_size=16, device=torch.device("cpu"))
    torch.testing.assert_close(served, ours, atol=1e-5, rtol=1e-5)
    probs = pneumonia_probability(served, loaded.metadata.temperature).numpy()
    np.testing.assert_allclose(probs, [float(row["probability"]) for row in rows], atol=2e-6)


def test_evaluate_writes_report(run_dir: Path, tmp_path: Path) -> None:
    data = write_split(tmp_path / "holdout", normal_names(range(50, 56), 1), pneumonia_names(range(50, 58), 1), seed=7)
    report = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--weights",
                str(run_dir / "model.safetensors"),
                "--data",
                str(data),
                "--report",
                str(report),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics.keys() >= METRIC_KEYS
    assert metrics["n"] == 14 and metrics["tp"] + metrics["fn"] == 8 and metrics["tn"] + metrics["fp"] == 6
    assert metrics["threshold"] == load_model(run_dir).metadata.threshold
    for key in ("accuracy", "roc_auc", "pr_auc", "brier", "ece"):
        assert 0.0 <= metrics[key] <= 1.0, key
    lo, hi = metrics["ci95"]["roc_auc"]
    assert lo <= metrics["roc_auc"] <= hi
    rows = list(csv.DictReader((report / "predictions.csv").open()))
    assert len(rows) == 14
    correct = sum(row["label"] == row["prediction"] for row in rows)
    assert correct / 14 == pytest.approx(metrics["accuracy"])
    for name in PLOT_FILES:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    guard = load_model(run_dir).metadata.guard
    assert guard is not None and metrics["input_guard"]["n"] == 14
    assert metrics["input_guard"]["threshold"] == guard.threshold
    assert 0 <= metrics["input_guard"]["refused"] <= 14


def test_export_fits_the_input_guard_on_train_and_val(run_dir: Path) -> None:
    loaded = load_model(run_dir)  # verifies the guard's golden scores too
    guard, provenance = loaded.metadata.guard, loaded.metadata.provenance
    assert guard is not None and loaded.guard is not None
    assert guard.calibration["train_images"] == provenance["train_images"]
    assert guard.calibration["val_images"] == provenance["val_images"]
    assert float(guard.calibration["val_refusal_rate"]) <= 0.01 + 1 / provenance["val_images"]


def test_evaluate_reports_guard_refusals_per_ood_folder(run_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    from tests.conftest import encode

    data = write_split(tmp_path / "holdout", normal_names(range(60, 63), 1), pneumonia_names(range(60, 63), 1), seed=9)
    ood = tmp_path / "ood"
    (ood / "blank").mkdir(parents=True)
    (ood / "noise" / "nested").mkdir(parents=True)
    for value in (0, 128, 255):
        (ood / "blank" / f"{value}.png").write_bytes(encode(Image.new("L", (120, 100), value), "PNG"))
    rng = np.random.default_rng(0)
    for index in range(2):
        noise = Image.fromarray(rng.integers(0, 256, (90, 90, 3), dtype=np.uint8), "RGB")
        (ood / "noise" / "nested" / f"{index}.jpg").write_bytes(encode(noise))
    (ood / "noise" / "notes.txt").write_text("not an image")
    report = tmp_path / "report"
    argv = ["evaluate", "--weights", str(run_dir), "--data", str(data), "--report", str(report)]
    assert main([*argv, "--bootstrap", "0", "--ood", str(ood)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["ood"]["blank"] == {**metrics["ood"]["blank"], "n": 3, "refused": 3, "refusal_rate": 1.0}
    assert metrics["ood"]["noise"] == {**metrics["ood"]["noise"], "n": 2, "refused": 2, "unreadable": 1}
    assert main([*argv, "--bootstrap", "0", "--ood", str(tmp_path / "missing")]) == 2


def test_resume_continues_from_the_right_epoch(
    dataset: Path, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash in epoch 2, resume: same history and weights as the uninterrupted run."""
    out = tmp_path / "run"
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(InterruptedRunError):
        main(train_args(dataset, out, "--epochs", "2"))
    assert [row["epoch"] for row in history(out)] == [1]
    monkeypatch.undo()
    assert main(train_args(dataset, out, "--epochs", "2")) == 2  # refuses to overwrite without --resume
    assert main(["train", "--resume", str(out)]) == 0
    assert "resumed after epoch 1" in (out / "train.log").read_text()
    assert [row["epoch"] for row in history(out)] == [1, 2]
    assert_same_run(out, run_dir)
    # Both processes that trained it are on record; the refused overwrite started nothing.
    starts = json.loads((out / "model.json").read_text())["provenance"]["starts"]
    assert [start["epochs_done"] for start in starts] == [0, 1]


def test_resume_of_finished_run_only_reexports(run_dir: Path, tmp_path: Path) -> None:
    before = (run_dir / "checkpoint" / "last.safetensors").read_bytes()
    assert main(["train", "--resume", str(run_dir), "--threshold-method", "youden"]) == 0
    assert (run_dir / "checkpoint" / "last.safetensors").read_bytes() == before
    assert [row["epoch"] for row in history(run_dir)] == [1, 2]
    assert load_model(run_dir).metadata.threshold_method == "youden"


def test_resume_refuses_to_change_the_model(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(run_dir), "--input-size", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--input-size" in err and "\n" not in err


def test_fine_tune_starts_from_every_weight_of_the_parent(
    dataset: Path, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--init model copies the verified parent into the network the first step trains, and says so in model.json,
    also after a crash and a resume (which takes its weights from the checkpoint, not the parent)."""
    original = training.trainer.train_one_epoch
    first: list[dict[str, torch.Tensor]] = []

    def record(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        if not first:
            first.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(training.trainer, "train_one_epoch", record)
    out = tmp_path / "tuned"
    argv = train_args(dataset, out, "--epochs", "2", "--init", "model", "--init-model", str(run_dir))
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(InterruptedRunError):
        main(argv)
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0
    parent = load_model(run_dir)
    for key, value in parent.network.state_dict().items():
        torch.testing.assert_close(first[0][key], value)
    init = load_model(out).metadata.provenance["init_weights"]["model"]
    assert init == {
        "path": str(run_dir),
        "version": parent.metadata.version,
        "sha256": parent.metadata.sha256,
        "val_source": parent.metadata.provenance["val_source"],
        "drawn_split": {"val_fraction": 0.3, "split_seed": 0, "limit_per_class": None},
    }
    assert not torch.equal(load_model(out).network.features[0].weight, parent.network.features[0].weight)


def count_decoding(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record each call of the trainer's data preparation (the minutes of decoding a refusal should not wait for)."""
    calls: list[object] = []
    original = training.trainer.prepare_data

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(training.trainer, "prepare_data", counted)
    return calls


@pytest.mark.parametrize(
    ("options", "message", "decoded"),
    [
        (["--input-size", "64"], "spec differs in input_size", False),
        (["--arch", "vgg16_bn", "--dropout", "0.2"], "spec differs in architecture, dropout", False),
        (["--split-seed", "1"], "its validation images may be ones the parent trained on", True),
        (
            ["--val-fraction", "0.4"],
            "was validated on patient-grouped split of train (val split missing; fraction 0.3, seed 0) "
            "(fraction 0.3, seed 0, all images), this run on a split of train (fraction 0.4, seed 0, all images)",
            True,
        ),
        (["--limit-per-class", "6"], "(fraction 0.3, seed 0, at most 6 per class)", True),
    ],
)
def test_fine_tune_refuses_another_network_or_another_validation_split(
    dataset: Path,
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    message: str,
    decoded: bool,
) -> None:
    """Another network is refused before any image is decoded; another split once the split is known."""
    decoding = count_decoding(monkeypatch)
    argv = train_args(dataset, tmp_path / "tuned", "--init", "model", "--init-model", str(run_dir), *options)
    assert main(argv) == 2
    last = last_error(capsys)
    assert last.startswith("error: --init-model") and message in last
    assert bool(decoding) is decoded
    assert not (tmp_path / "tuned" / "checkpoint").exists()


def test_fine_tune_refuses_a_tampered_parent(
    dataset: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent is verified as the service verifies a model: one flipped byte and nothing trains from it
    (nor is any image decoded first)."""
    decoding = count_decoding(monkeypatch)
    parent = tampered_copy(run_dir, tmp_path / "parent")
    assert main(train_args(dataset, tmp_path / "tuned", "--init", "model", "--init-model", str(parent))) == 2
    last = last_error(capsys)
    assert last.startswith("error: --init-model: sha256 mismatch")
    assert main(train_args(dataset, tmp_path / "tuned", "--init", "model", "--init-model", str(tmp_path / "none"))) == 2
    last = last_error(capsys)
    assert last.startswith("error: --init-model: model metadata not found")
    assert decoding == []


def test_a_missing_imagenet_file_is_refused_before_any_image_is_decoded(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoding = count_decoding(monkeypatch)
    argv = train_args(dataset, tmp_path / "run", "--init", "imagenet", "--imagenet-weights", str(tmp_path / "no.pth"))
    assert main(argv) == 2
    last = last_error(capsys)
    assert last.startswith("error: ImageNet weights for vgg16 not found at") and "--imagenet-weights FILE" in last
    assert decoding == []


def test_fine_tune_on_the_official_layout_draws_the_parents_split(
    dataset: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kermany's own download has a val folder of 16 films, too few, so the split is drawn from train as the
    parent's was (it had no val folder): the same draw, accepted; the reason it was drawn does not matter."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    write_split(data / "val", normal_names(range(50, 52), 1), pneumonia_names(range(50, 52), 1), seed=7)
    argv = train_args(data, tmp_path / "tuned", "--epochs", "1", "--init", "model", "--init-model", str(run_dir))
    assert main(argv) == 0, last_error(capsys)
    tuned = load_model(tmp_path / "tuned").metadata.provenance
    assert "val split too small (4 images) or one-class; fraction 0.3, seed 0" in tuned["val_source"]
    assert load_model(run_dir).metadata.provenance["val_source"] != tuned["val_source"]  # was refused for this


def test_fine_tune_on_a_provided_val_folder_takes_the_users_word(run_dir: Path, tmp_path: Path) -> None:
    """A val folder is the user's own hold-out (new hospital data, say): the parent's split is not required."""
    data = make_dataset(tmp_path / "data", normal_patients=4, pneumonia_patients=4)
    write_split(data / "val", normal_names(range(50, 53), 1), pneumonia_names(range(50, 53), 1), seed=7)
    argv = train_args(data, tmp_path / "tuned", "--epochs", "1", "--min-val-images", "6")
    assert main([*argv, "--init", "model", "--init-model", str(run_dir)]) == 0
    assert load_model(tmp_path / "tuned").metadata.provenance["val_source"] == "provided val split"
