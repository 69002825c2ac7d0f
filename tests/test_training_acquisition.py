"""The acquisition shift (``--acquisition``): gamma, blur and noise within their bounds, and paired runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import training.augment
import training.loops
from tests.training_support import assert_same_run, crash_then_resume, history, make_dataset, train_args
from training.augment import MAX_BLUR_SIGMA, MAX_LOG_GAMMA, MAX_NOISE, _gaussian_blur, acquisition_shift
from training.cli import main

GREY = 128.0


def _constant(n: int, value: float = GREY, size: int = 32) -> torch.Tensor:
    return torch.full((n, 3, size, size), value)


def test_strength_zero_and_an_empty_batch_are_left_alone() -> None:
    x = torch.rand(4, 3, 16, 16) * 255
    assert acquisition_shift(x, torch.Generator().manual_seed(0), 0.0) is x
    empty = torch.empty(0, 3, 16, 16)
    assert acquisition_shift(empty, torch.Generator().manual_seed(0), 1.0).shape == (0, 3, 16, 16)


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
def test_grey_level_moves_by_a_gamma_within_its_bound_both_ways(strength: float) -> None:
    """A flat grey image stays flat under blur, so its mean is the gamma curve's value (noise averages out)."""
    out = acquisition_shift(_constant(3000), torch.Generator().manual_seed(1), strength)
    means = out.mean(dim=(1, 2, 3))
    bound = MAX_LOG_GAMMA * strength
    darkest, brightest = 255 * (GREY / 255) ** math.exp(bound), 255 * (GREY / 255) ** math.exp(-bound)
    assert means.min() >= darkest - 1.0 and means.max() <= brightest + 1.0
    assert means.min() < darkest + 3.0 and means.max() > brightest - 3.0  # the whole range is used
    assert (means < GREY - 1).float().mean() == pytest.approx(0.5, abs=0.05)  # as often darker as brighter


def test_noise_std_stays_within_its_bound_and_reaches_it() -> None:
    out = acquisition_shift(_constant(2000), torch.Generator().manual_seed(2), 1.0)
    stds = out.std(dim=(1, 2, 3))
    bound = MAX_NOISE * 255
    assert stds.max() <= bound * 1.05 and stds.max() > bound * 0.9
    assert stds.min() < bound * 0.1


def test_blur_spreads_a_point_by_its_sigma_and_sigma_zero_is_identity() -> None:
    point = torch.zeros(2, 1, 31, 31)
    point[:, :, 15, 15] = 1.0
    out = _gaussian_blur(point, torch.tensor([0.0, 2.0]), radius=8)
    torch.testing.assert_close(out[0], point[0])
    assert float(out[1].sum()) == pytest.approx(1.0, abs=1e-5)  # mass kept
    row = out[1, 0, 15] / out[1, 0, 15].sum()
    offsets = torch.arange(31.0) - 15
    assert float((row * offsets**2).sum()) == pytest.approx(4.0, rel=0.02)  # variance sigma^2


def test_about_half_the_images_are_blurred_up_to_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without noise, a point's spread along a row is the image's blur: none for half, up to the bound."""
    monkeypatch.setattr(training.augment, "MAX_NOISE", 0.0)
    size = 64
    point = torch.zeros(2000, 3, size, size)
    point[:, :, size // 2, size // 2] = 255.0  # gamma keeps 0 and 255
    out = acquisition_shift(point, torch.Generator().manual_seed(3), 1.0)
    row = out[:, 0, size // 2] / out[:, 0, size // 2].sum(dim=1, keepdim=True)
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    variance = (row * offsets**2).sum(dim=1)
    sigma_max = MAX_BLUR_SIGMA * size
    assert variance.max() <= sigma_max**2 * 1.01 and variance.max() > 0.8 * sigma_max**2
    sharp, blurred = (variance < 1e-6).float().mean(), (variance > 0.05).float().mean()
    # Half the images are not blurred; a sigma below ~0.2 px is a no-op on the pixel grid, which adds ~10 %.
    assert 0.5 <= sharp <= 0.7 and blurred >= 0.25


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


ARGS = ("--epochs", "2", "--batch-size", "4", "--export-dtype", "float32")


@pytest.fixture(scope="module")
def acquisition_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("acquisition-run")
    assert main(train_args(dataset, out, *ARGS, "--acquisition", "1.0")) == 0
    return out


def test_the_shift_changes_nothing_else_the_run_draws(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paired runs: with and without the shift, the same batches get the same affine augmentation."""
    seen: dict[str, list[torch.Tensor]] = {"off": [], "on": []}
    shifted: list[torch.Tensor] = []
    augment, shift = training.loops.augment_batch, training.loops.acquisition_shift
    key = "off"

    def record_augment(*args: object, **kwargs: object) -> torch.Tensor:
        out = augment(*args, **kwargs)
        seen[key].append(out.clone())
        return out

    def record_shift(*args: object, **kwargs: object) -> torch.Tensor:
        out = shift(*args, **kwargs)
        shifted.append(out.clone())
        return out

    monkeypatch.setattr(training.loops, "augment_batch", record_augment)
    monkeypatch.setattr(training.loops, "acquisition_shift", record_shift)
    assert main(train_args(dataset, tmp_path / "off", *ARGS)) == 0
    key = "on"
    assert main(train_args(dataset, tmp_path / "on", *ARGS, "--acquisition", "1.0")) == 0
    assert len(seen["on"]) == len(seen["off"]) == len(shifted) > 2
    for off, on, after in zip(seen["off"], seen["on"], shifted, strict=True):
        torch.testing.assert_close(on, off)
        assert (after - on).abs().mean() > 1.0  # and the network saw the shifted images
    assert history(tmp_path / "on")[0]["train_loss"] != pytest.approx(history(tmp_path / "off")[0]["train_loss"])


def test_resume_replays_the_same_shift(
    dataset: Path, acquisition_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    crash_then_resume(monkeypatch, train_args(dataset, out, *ARGS, "--acquisition", "1.0"), out)
    assert_same_run(out, acquisition_run)


def test_resume_refuses_to_change_the_shift(acquisition_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(acquisition_run), "--acquisition", "2.0"]) == 2
    assert "--acquisition" in capsys.readouterr().err
