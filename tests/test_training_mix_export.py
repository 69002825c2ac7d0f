"""``python -m training mix``: a point between a model and its fine-tune, exported as a model the service loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from app.core.artifacts import load_model
from tests.training_support import last_error, make_dataset, tampered_copy, train_args
from training.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A parent (2 epochs from scratch), two fine-tunes of it (1 epoch, seeds 0 and 1) and a seed replicate of it."""
    root = tmp_path_factory.mktemp("mix")
    data = make_dataset(root / "data")
    parent, tuned, tuned2, other = root / "parent", root / "tuned", root / "tuned2", root / "other"
    assert main(train_args(data, parent, "--epochs", "2")) == 0
    from_parent = ("--epochs", "1", "--init", "model", "--init-model", str(parent))
    assert main(train_args(data, tuned, *from_parent)) == 0
    assert main(train_args(data, tuned2, *from_parent, "--seed", "1", "--split-seed", "0")) == 0
    assert main(train_args(data, other, "--epochs", "1", "--seed", "1", "--split-seed", "0")) == 0
    return {"data": data, "parent": parent, "tuned": tuned, "tuned2": tuned2, "other": other}


def mix_args(runs: dict[str, Path], out: Path, fraction: str, *extra: str, soup: tuple[str, ...] = ()) -> list[str]:
    return [
        "mix",
        "--parent",
        str(runs["parent"]),
        "--tuned",
        str(runs["tuned"]),
        *(str(runs[name]) for name in soup),
        "--fraction",
        fraction,
        "--data",
        str(runs["data"]),
        "--out",
        str(out),
        "--workers",
        "2",
        *extra,
    ]


def test_the_midpoint_is_exported_verified_calibrated_guarded_and_traced(runs: dict[str, Path], tmp_path: Path) -> None:
    """Every tensor is the midpoint of the two ends; load_model (the service's loader) accepts it, which checks
    its sha256 and golden outputs; its operating point and guard are fitted anew; model.json names both ends."""
    assert main(mix_args(runs, tmp_path / "mid", "0.5", "--version", "mid-1")) == 0
    mixed, parent, tuned = (load_model(p) for p in (tmp_path / "mid", runs["parent"], runs["tuned"]))
    ends = parent.network.state_dict(), tuned.network.state_dict()
    for key, value in mixed.network.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, torch.lerp(ends[0][key], ends[1][key], 0.5), rtol=0, atol=0)
    meta = mixed.metadata
    assert meta.version == "mid-1" and meta.spec == tuned.metadata.spec
    record = meta.provenance["weight_mix"]
    assert record["fraction"] == 0.5
    assert record["parent"] == {
        "path": str(runs["parent"]),
        "version": parent.metadata.version,
        "sha256": parent.metadata.sha256,
    }
    assert [end["sha256"] for end in record["tuned"]] == [tuned.metadata.sha256]
    for key in ("val_source", "data_hash", "val_images", "train_images"):
        assert meta.provenance[key] == tuned.metadata.provenance[key]
    assert meta.guard is not None and meta.guard.threshold != tuned.metadata.guard.threshold
    assert meta.metrics["validation"]["n"] == tuned.metadata.metrics["validation"]["n"]
    assert (meta.temperature, meta.threshold) != (tuned.metadata.temperature, tuned.metadata.threshold)


def test_the_far_end_reproduces_the_fine_tunes_weights_and_operating_point(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """Fraction 1 is the fine-tune itself: the mix command calibrates exactly as training did (no skew)."""
    assert main(mix_args(runs, tmp_path / "end", "1")) == 0
    mixed, tuned = load_model(tmp_path / "end"), load_model(runs["tuned"])
    theirs = tuned.network.state_dict()
    for key, value in mixed.network.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    assert mixed.metadata.temperature == pytest.approx(tuned.metadata.temperature, abs=1e-6)
    assert mixed.metadata.threshold == pytest.approx(tuned.metadata.threshold, abs=1e-6)
    assert mixed.metadata.guard.threshold == pytest.approx(tuned.metadata.guard.threshold, abs=1e-6)


def test_two_fine_tunes_make_a_soup_at_the_far_end(runs: dict[str, Path], tmp_path: Path) -> None:
    """With two fine-tunes of the parent the far end is their mean, and model.json names both."""
    assert main(mix_args(runs, tmp_path / "soup", "0.5", soup=("tuned2",))) == 0
    mixed, parent = load_model(tmp_path / "soup"), load_model(runs["parent"])
    states = [load_model(runs[name]).network.state_dict() for name in ("tuned", "tuned2")]
    for key, value in mixed.network.state_dict().items():
        if value.is_floating_point():
            far = torch.stack([state[key] for state in states]).mean(0)
            torch.testing.assert_close(value, torch.lerp(parent.network.state_dict()[key], far, 0.5))
    ends = [Path(end["path"]).name for end in mixed.metadata.provenance["weight_mix"]["tuned"]]
    assert ends == ["tuned", "tuned2"]


@pytest.mark.parametrize(
    ("swap", "message"),
    [
        ({"parent": "tuned", "tuned": "parent"}, "was not fine-tuned from"),
        ({"tuned": "other"}, "was not fine-tuned from"),
        ({"tuned2": "other"}, "was not fine-tuned from"),
    ],
)
def test_a_pair_that_is_not_model_and_fine_tune_is_refused(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], swap: dict[str, str], message: str
) -> None:
    pair = {**runs, **{role: runs[source] for role, source in swap.items()}}
    assert main(mix_args(pair, tmp_path / "out", "0.5", soup=("tuned2",) if "tuned2" in swap else ())) == 2
    error = last_error(capsys)
    assert error.startswith("error: --tuned: ") and message in error
    assert not (tmp_path / "out" / "model.json").exists()


def test_other_data_a_tampered_or_relabelled_end_a_used_out_and_a_fraction_off_the_line_are_refused(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = tmp_path / "data"
    shutil.copytree(runs["data"], changed)
    next(iter(sorted((changed / "train" / "NORMAL").iterdir()))).unlink()
    assert main(mix_args({**runs, "data": changed}, tmp_path / "a", "0.5")) == 2
    assert "is not the data" in last_error(capsys)
    assert not (tmp_path / "a" / "model.json").exists()

    tampered = tampered_copy(runs["parent"], tmp_path / "parent")
    assert main(mix_args({**runs, "parent": tampered}, tmp_path / "b", "0.5")) == 2
    assert last_error(capsys).startswith("error: --parent: sha256 mismatch")

    relabelled = tmp_path / "tuned"  # a hand-edited model.json: the same tensors, another dropout
    shutil.copytree(runs["tuned"], relabelled, ignore=shutil.ignore_patterns("checkpoint", "cache"))
    meta = json.loads((relabelled / "model.json").read_text())
    meta["spec"]["dropout"] = 0.2
    (relabelled / "model.json").write_text(json.dumps(meta))
    assert main(mix_args({**runs, "tuned": relabelled}, tmp_path / "d", "0.5")) == 2
    assert "'s network differs from the parent's" in last_error(capsys)
    del meta["provenance"]["args"]  # without its training arguments there is no split to calibrate on
    meta["spec"]["dropout"] = 0.5
    (relabelled / "model.json").write_text(json.dumps(meta))
    assert main(mix_args({**runs, "tuned": relabelled}, tmp_path / "d", "0.5")) == 2
    assert "records no training arguments (provenance.args)" in last_error(capsys)

    assert main(mix_args(runs, runs["tuned"], "0.5")) == 2
    assert "already holds a model" in last_error(capsys)

    for fraction in ("1.5", "-0.1", "nan"):
        assert main(mix_args(runs, tmp_path / "c", fraction)) == 2
        assert "--fraction must lie in [0, 1]" in last_error(capsys)
    assert not (tmp_path / "c").exists()
