"""A run whose numbers stop being finite stops with one line; nothing scores, keeps or exports NaN weights.

Before: a learning rate far too high trained on with loss NaN, validation AUC read 1.0000 (NaN scores
sort anywhere), the "best" epoch was kept, and calibration died in a TypeError traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.network import ModelSpec, build_model
from tests.training_support import INPUT_SIZE, make_dataset, refused_with_one_line, train_args
from training.cli import main
from training.data import ImageSet
from training.distributed import DistInfo
from training.loops import validate
from training.metrics import binary_metrics, roc_auc
from training.user_errors import DivergedError


def test_a_diverging_run_stops_at_the_step_with_one_line_and_keeps_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    err = refused_with_one_line(capsys, train_args(data, out, "--epochs", "3", "--lr", "1e6"))
    assert err.startswith("error: epoch 1/3, step ") and " the training loss is nan (learning rate " in err
    assert err.endswith("the run diverged; start a new run (another --out) with a lower --lr")
    assert not (out / "model.safetensors").exists() and not (out / "checkpoint").exists()
    assert (out / "metrics.jsonl").read_text() == ""  # no epoch scored, none kept as the best
    assert (out / "train.log").read_text().splitlines()[-1].endswith(f"ERROR stopped: {err.removeprefix('error: ')}")


def test_a_sane_learning_rate_is_not_stopped(tmp_path: Path) -> None:
    """The control: the same data and flags with the default learning rate train and export."""
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert main(train_args(data, out, "--epochs", "1")) == 0
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(row["train_loss"]) and (out / "model.safetensors").exists()
    finished = (out / "train.log").read_text()
    assert "ERROR" not in finished
    logging.getLogger("training.data").warning("a later run's line")  # the run is over: not its log any more
    assert (out / "train.log").read_text() == finished


def test_validation_outputs_that_are_not_finite_stop_the_run() -> None:
    """The last step can leave NaN weights behind a finite loss; validation is where that shows."""
    network = build_model(ModelSpec(architecture="vgg16", head="compact", input_size=INPUT_SIZE))
    val = ImageSet(
        torch.full((4, 1, INPUT_SIZE, INPUT_SIZE), 128, dtype=torch.uint8),
        torch.tensor([0, 1, 0, 1]),
        [f"v{i}.jpeg" for i in range(4)],
        [f"{i}" for i in range(4)],
    )
    assert 0.0 <= validate(network, val, batch_size=4, device=torch.device("cpu"), dist=DistInfo())["val_auc"] <= 1.0
    with torch.no_grad():
        network.classifier[-1].bias.fill_(float("inf"))
    with pytest.raises(DivergedError, match=r"^the network's validation outputs are not finite: the run diverged"):
        validate(network, val, batch_size=4, device=torch.device("cpu"), dist=DistInfo())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_metrics_refuse_scores_that_are_not_finite(bad: float) -> None:
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    with pytest.raises(ValueError, match=r"^1 of 4 scores are NaN or infinite$"):
        roc_auc(labels, np.array([0.1, bad, 0.35, 0.8]))
    with pytest.raises(ValueError, match="scores are NaN or infinite"):
        binary_metrics(labels, np.array([bad, 0.4, 0.35, 0.8]), 0.5)
