"""``python -m training mix``: a point between a model and its fine-tune, exported as a model the service loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.artifacts import load_model
from benchmarks import eval_sets
from tests.training_support import last_error, lock_held_elsewhere, make_dataset, tampered_copy, train_args
from training.cli import main
from training.loops import predict_logits
from training.mix_choice import RESAMPLES, Candidate, score_candidates
from training.weight_mix import mix, soup


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
    assert not (tmp_path / "a" / "model.json").exists() and not (tmp_path / "a" / "cache").exists()  # not decoded

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
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    assert main(mix_args(runs, a_file, "0.5")) == 2
    assert last_error(capsys) == f"error: --out {a_file} is a file, not a directory"
    busy = tmp_path / "busy"
    busy.mkdir()
    with lock_held_elsewhere(busy) as pid:
        assert main(mix_args(runs, busy, "0.5")) == 2
        assert f"error: --out {busy} is in use by a run that is still going (pid {pid} on " in last_error(capsys)
    assert not (busy / "model.json").exists()

    for fraction in ("1.5", "-0.1", "nan", "0.5,2"):
        with pytest.raises(SystemExit) as exited:
            main(mix_args(runs, tmp_path / "c", fraction))
        assert exited.value.code == 2 and "argument --fraction: each fraction must lie in [0, 1]" in last_error(capsys)
    assert not (tmp_path / "c").exists()


def test_of_several_fractions_the_validation_rule_keeps_one_and_model_json_shows_why(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each candidate is scored against the parent on the validation images as it would be exported, the rule
    keeps the largest that holds the parent's validation AUC, model.json records every score, and the exported
    weights are the kept fraction's."""
    seen: list[tuple[np.ndarray, np.ndarray, dict[float, np.ndarray]]] = []

    def spy(labels: np.ndarray, parent_scores: np.ndarray, scores: dict[float, np.ndarray]) -> list[Candidate]:
        seen.append((labels, parent_scores, scores))
        return score_candidates(labels, parent_scores, scores)

    monkeypatch.setattr("training.mix_export.score_candidates", spy)
    assert main(mix_args(runs, tmp_path / "auto", "1,0,0.5,1", soup=("tuned2",))) == 0
    mixed, parent = load_model(tmp_path / "auto"), load_model(runs["parent"])
    far = soup(parent, [load_model(runs[name]) for name in ("tuned", "tuned2")])

    # What was scored: the validation images (read here by ensemble_check's own path) through each network.
    val = eval_sets.validation_set(runs["data"], mixed.metadata)

    def log_odds(network: torch.nn.Module) -> np.ndarray:
        logits = predict_logits(network, val.pixels, batch_size=64, device=torch.device("cpu")).double().numpy()
        return logits[:, 1] - logits[:, 0]

    (labels, parent_scores, scores), *more = seen
    assert not more and sorted(scores) == [0.0, 0.5, 1.0]
    np.testing.assert_array_equal(labels, val.labels)
    np.testing.assert_allclose(parent_scores, log_odds(parent.network), atol=1e-5)
    for fraction, values in scores.items():
        np.testing.assert_allclose(values, log_odds(mix(parent.network, far, fraction)), atol=1e-5)

    record = mixed.metadata.provenance["weight_mix"]
    candidates = [Candidate(**c) for c in record["choice"]["candidates"]]
    assert [c.fraction for c in candidates] == [0.0, 0.5, 1.0] and record["choice"]["resamples"] == RESAMPLES
    assert (candidates[0].val_auc_difference, candidates[0].low, candidates[0].high) == (0.0, 0.0, 0.0)
    assert record["fraction"] == max(c.fraction for c in candidates if c.high >= 0)  # the rule, written out
    kept = mix(parent.network, far, record["fraction"]).state_dict()
    for key, value in mixed.network.state_dict().items():
        torch.testing.assert_close(value, kept[key])


def test_when_every_fraction_loses_validation_nothing_is_exported(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = [Candidate(fraction=f, val_auc_difference=-0.01, low=-0.02, high=-0.005) for f in (0.5, 1.0)]
    monkeypatch.setattr("training.mix_export.score_candidates", lambda *args, **kwargs: lost)
    assert main(mix_args(runs, tmp_path / "none", "0.5,1")) == 2
    assert last_error(capsys).startswith("error: --fraction: no fraction keeps the parent's validation AUC")
    assert not (tmp_path / "none" / "model.json").exists()
