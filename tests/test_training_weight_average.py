"""The weight average (``--ema-epochs``) and the shared validation split (``--split-seed``).

The average is checked against an EMA computed here by hand, through a crash and resume, and in what
the run exports: the averaged weights, never the raw ones.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.core.artifacts import load_model
from app.core.network import CLASS_NAMES, ModelSpec, build_model
from app.core.preprocessing import preprocess
from benchmarks import eval_sets
from tests.training_support import (
    INPUT_SIZE,
    assert_same_run,
    crash_then_resume,
    history,
    make_dataset,
    train_args,
)
from training.checkpoint import load_checkpoint, save_checkpoint
from training.cli import main
from training.loops import predict_logits
from training.split import recorded_split
from training.user_errors import UsageError
from training.weight_average import WeightAverage

SPEC = ModelSpec(architecture="vgg16_bn", head="compact", input_size=32)


def _step(network: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Stand-in for an optimizer step: new random weights and BN statistics; returns a copy of them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in network.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return {k: v.clone() for k, v in network.state_dict().items()}


def test_the_average_is_the_hand_computed_ema_of_parameters_and_bn_statistics() -> None:
    network = build_model(SPEC)
    average = WeightAverage(network, epochs=0.5, steps_per_epoch=6, warmup_steps=2)
    decay = 1 - 1 / 3  # 0.5 epochs of 6 steps
    assert average.decay == pytest.approx(decay)
    expected: dict[str, torch.Tensor] = {}
    for step in range(5):
        weights = _step(network, seed=step)
        average.update(step)
        if step <= 2:  # the warm-up resets the average to the weights; step 2 is the first averaged one after it
            expected = {k: v.clone() for k, v in weights.items()} if step < 2 else expected
        if step >= 2:
            expected = {
                k: decay * expected[k] + (1 - decay) * v if v.is_floating_point() else v for k, v in weights.items()
            }
        averaged = average.network.state_dict()
        for key, value in expected.items():
            if value.is_floating_point():
                torch.testing.assert_close(averaged[key], value, msg=f"step {step}: {key}")
    running_means = [k for k in expected if k.endswith("running_mean")]
    assert running_means  # BN statistics were part of the check
    assert not torch.equal(average.network.state_dict()[running_means[0]], network.state_dict()[running_means[0]])


def test_without_warm_up_the_first_step_starts_the_average() -> None:
    network = build_model(SPEC)
    average = WeightAverage(network, epochs=1, steps_per_epoch=4, warmup_steps=0)
    first = _step(network, seed=0)
    average.update(0)
    second = _step(network, seed=1)
    average.update(1)
    key = next(k for k in first if k.endswith("weight"))
    torch.testing.assert_close(average.network.state_dict()[key], 0.75 * first[key] + 0.25 * second[key])


@pytest.mark.parametrize(("epochs", "steps"), [(0.0, 10), (-1.0, 10), (1.0, 0)])
def test_an_average_over_nothing_is_refused(epochs: float, steps: int) -> None:
    with pytest.raises(ValueError, match=f"epochs > 0 and steps > 0, not {epochs} and {steps}$"):
        WeightAverage(build_model(SPEC), epochs=epochs, steps_per_epoch=steps, warmup_steps=0)


def test_a_checkpoint_without_the_average_is_refused_when_one_is_needed(tmp_path: Path) -> None:
    network = build_model(SPEC)
    save_checkpoint(tmp_path, "last", network, {"state": {}}, None)
    average = WeightAverage(network, epochs=1, steps_per_epoch=4, warmup_steps=0)
    with pytest.raises(UsageError) as caught:
        load_checkpoint(tmp_path, "last", build_model(SPEC), None, average)
    assert str(caught.value) == f"the 'last' checkpoint in {tmp_path / 'checkpoint'} holds no weight average"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


# 5 steps per epoch: a 2-step warm-up, then an average with decay 0.8.
EMA_ARGS = ("--epochs", "2", "--batch-size", "4", "--ema-epochs", "1", "--warmup-epochs", "0.4")
EMA_ARGS += ("--export-dtype", "float32")


@pytest.fixture(scope="module")
def ema_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ema-run")
    assert main(train_args(dataset, out, *EMA_ARGS)) == 0
    return out


def test_the_run_exports_the_averaged_weights_not_the_raw_ones(dataset: Path, tmp_path: Path) -> None:
    # One epoch, so it is the best one and the average in `last` is the one exported.
    assert main(train_args(dataset, tmp_path, *EMA_ARGS, "--epochs", "1")) == 0
    tensors = load_file(str(tmp_path / "checkpoint" / "last.safetensors"))
    raw = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    averaged = {k.removeprefix("average.module."): v for k, v in tensors.items() if k.startswith("average.module.")}
    assert raw.keys() == averaged.keys()
    exported = load_model(tmp_path).network.state_dict()
    differs = 0
    for key, value in averaged.items():
        torch.testing.assert_close(exported[key], value, msg=key)
        differs += not torch.equal(raw[key], value)
    assert differs > len(averaged) // 2  # the average is not a copy of the raw weights
    assert int(tensors["average.n_averaged"]) == 4  # the copy at the end of the warm-up, then steps 2, 3 and 4
    # Validation scored the averaged network: its loss on the val images is the one recorded for the epoch.
    rows = list(csv.DictReader((tmp_path / "val_report" / "predictions.csv").open()))
    pixels = torch.stack([preprocess(Path(row["path"]).read_bytes(), INPUT_SIZE) for row in rows])
    labels = torch.tensor([CLASS_NAMES.index(row["label"]) for row in rows])
    logits = predict_logits(load_model(tmp_path).network, pixels, batch_size=16, device=torch.device("cpu"))
    assert history(tmp_path)[0]["val_loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5
    )


def test_resume_continues_the_average_exactly(
    dataset: Path, ema_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    crash_then_resume(monkeypatch, train_args(dataset, out, *EMA_ARGS), out)
    assert_same_run(out, ema_run)


def test_resume_refuses_to_switch_the_average_on(ema_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(ema_run), "--ema-epochs", "2"]) == 2
    assert "--ema-epochs" in capsys.readouterr().err


def test_seed_replicates_share_the_validation_split_of_their_split_seed(dataset: Path, tmp_path: Path) -> None:
    def split_of(*extra: str) -> tuple[dict[str, object], str]:
        out = tmp_path / "-".join(extra)
        args = train_args(dataset, out, "--epochs", "1", "--bootstrap", "0", *extra)
        assert main(args) == 0
        summary = json.loads((out / "summary.json").read_text())
        return json.loads((out / "split.json").read_text()), summary["provenance"]["val_source"]

    base, base_source = split_of("--seed", "0")
    replicate, replicate_source = split_of("--seed", "1", "--split-seed", "0")
    other, other_source = split_of("--seed", "1")
    assert replicate == base and replicate_source == base_source
    assert other["val"] != base["val"]
    assert base_source.endswith("seed 0)") and other_source.endswith("seed 1)")
    # The scripts that rebuild a model's validation split from its model.json find the replicate's.
    metadata = load_model(tmp_path / "--seed-1---split-seed-0").metadata
    _, val, _ = eval_sets.train_split(dataset, metadata)
    assert sorted(str(s.path) for s in val) == sorted(row["path"] for row in base["val"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"val_fraction": 0.2, "seed": 3}, (0.2, 3)),  # a run from before --split-seed
        ({"val_fraction": 0.2, "seed": 3, "split_seed": None}, (0.2, 3)),
        ({"val_fraction": 0.2, "seed": 3, "split_seed": 0}, (0.2, 0)),
    ],
)
def test_recorded_split_reads_the_split_seed_first(args: dict[str, object], expected: tuple[float, int]) -> None:
    assert recorded_split(args) == expected
