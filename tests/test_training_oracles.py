"""Training behaviours checked against answers computed here, independently of the training code."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from app.core.artifacts import load_model
from app.core.preprocessing import preprocess
from tests.training_support import INPUT_SIZE, make_dataset, train_args
from training.calibration import select_threshold
from training.cli import main

NORMAL_PATIENTS, PNEUMONIA_PATIENTS, PER_PATIENT = 4, 10, 2  # imbalanced on purpose


@pytest.fixture(scope="module")
def imbalanced_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = make_dataset(
        tmp_path_factory.mktemp("data"),
        normal_patients=NORMAL_PATIENTS,
        pneumonia_patients=PNEUMONIA_PATIENTS,
        per_patient=PER_PATIENT,
    )
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(data, out, "--epochs", "2")) == 0
    return out


def _logits(run: Path, paths: list[str]) -> np.ndarray:
    network = load_model(run).network.eval()
    pixels = torch.stack([preprocess(Path(p).read_bytes(), INPUT_SIZE) for p in paths])
    with torch.inference_mode():
        return network(pixels).double().numpy()


def test_exported_temperature_minimises_validation_nll(imbalanced_run: Path) -> None:
    split = json.loads((imbalanced_run / "split.json").read_text())
    paths = [row["path"] for row in split["val"]]
    labels = np.array([row["label"] == "PNEUMONIA" for row in split["val"]], dtype=np.int64)
    logits = _logits(imbalanced_run, paths)

    def nll(temperature: float) -> float:
        return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels].mean())

    best = minimize_scalar(nll, bounds=(0.02, 50.0), method="bounded", options={"xatol": 1e-8})
    exported = json.loads((imbalanced_run / "model.json").read_text())["temperature"]
    assert exported == pytest.approx(best.x, rel=1e-3)
    assert nll(exported) <= nll(1.0)


def test_loss_weights_balance_the_classes(imbalanced_run: Path) -> None:
    split = json.loads((imbalanced_run / "split.json").read_text())
    counts = [sum(row["label"] == name for row in split["train"]) for name in ("NORMAL", "PNEUMONIA")]
    assert counts[0] < counts[1]
    expected = [sum(counts) / (2 * count) for count in counts]  # n / (classes * n_c)
    provenance = json.loads((imbalanced_run / "model.json").read_text())["provenance"]
    assert provenance["loss_class_weights"] == pytest.approx(expected, rel=1e-6)


def test_evaluate_applies_the_stored_temperature(imbalanced_run: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(imbalanced_run / "model.safetensors", model_dir)
    meta = json.loads((imbalanced_run / "model.json").read_text())
    meta["temperature"] = 3.0  # not covered by the sha256 (it is calibration metadata), so a copy may change it
    (model_dir / "model.json").write_text(json.dumps(meta))
    split = json.loads((imbalanced_run / "split.json").read_text())
    data = tmp_path / "eval"
    for row in split["val"]:
        target = data / row["label"] / Path(row["path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(row["path"], target)
    report = tmp_path / "report"
    assert main(["evaluate", "--weights", str(model_dir), "--data", str(data), "--report", str(report)]) == 0
    rows = list(csv.DictReader((report / "predictions.csv").open()))
    expected = softmax(_logits(imbalanced_run, [row["path"] for row in rows]) / 3.0, axis=1)[:, 1]
    assert [float(row["probability"]) for row in rows] == pytest.approx(expected.tolist(), abs=2e-6)


def test_early_stopping_stops_when_validation_auc_cannot_improve(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", normal_patients=4, pneumonia_patients=4)
    out = tmp_path / "run"
    # lr 1e-12 leaves every weight bitwise unchanged, so epoch 2 cannot beat epoch 1's validation AUC.
    args = train_args(data, out, "--epochs", "4", "--patience", "1", "--lr", "1e-12", "--warmup-epochs", "0")
    assert main(args) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    provenance = json.loads((out / "model.json").read_text())["provenance"]
    assert provenance["stopped_early"] is True and provenance["epochs_trained"] == 2


def test_an_unknown_threshold_rule_is_refused_not_read_as_youden() -> None:
    # model.json stores the rule as "sensitivity>=0.95"; passing that string on as a method once
    # silently chose Youden's J (threshold 0.74 instead of 0.93 for the shipped model).
    labels, probs = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.6, 0.9])
    with pytest.raises(ValueError, match="unknown threshold method"):
        select_threshold(labels, probs, "sensitivity>=0.95", 0.95)  # type: ignore[arg-type]
