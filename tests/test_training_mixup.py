"""Mixup (``--mixup``): what a batch is blended into, the loss it trains on, and an exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.network import ModelSpec, build_model
from tests.training_support import (
    assert_same_run,
    crash_then_resume,
    history,
    make_dataset,
    train_args,
)
from training.augment import Augmentation, mix_pairs
from training.cli import main
from training.distributed import DistInfo
from training.loops import Schedule, train_one_epoch


def _indexed_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i and has label i, so a blend names its partner."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).clone()
    return images, torch.arange(n)


def test_each_image_is_blended_with_the_partner_whose_label_it_returns() -> None:
    images, labels = _indexed_batch(16)
    mixed, partner, lam = mix_pairs(images, labels, torch.Generator().manual_seed(3), alpha=0.4)
    assert 0.0 < lam < 1.0
    assert sorted(partner.tolist()) == list(range(16))  # a permutation: every image is someone's partner
    assert not torch.equal(partner, labels)
    expected = lam * labels.float() + (1 - lam) * partner.float()
    torch.testing.assert_close(mixed[:, :, 0, 0], expected.view(16, 1).expand(16, 3))
    again = mix_pairs(images, labels, torch.Generator().manual_seed(3), alpha=0.4)
    assert again[2] == lam and torch.equal(again[1], partner)  # the generator alone decides: resumable
    assert mix_pairs(images, labels, torch.Generator().manual_seed(4), alpha=0.4)[2] != lam


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_the_blend_weight_follows_beta_alpha_alpha(alpha: float) -> None:
    generator = torch.Generator().manual_seed(0)
    images, labels = _indexed_batch(2)
    draws = np.array([mix_pairs(images, labels, generator, alpha)[2] for _ in range(4000)])
    assert draws.mean() == pytest.approx(0.5, abs=0.02)
    assert draws.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)  # Beta(a, a) variance


def test_an_epoch_trains_on_the_blended_images_and_the_blended_loss() -> None:
    """One batch at learning rate 0: the epoch's loss equals the mixup loss computed here by hand."""
    # A seeded init: left to the global generator, what ran before (another test, an import) picks the
    # network, and one draw gave a batch on which the mixed and the plain loss differ by only 3e-6.
    torch.manual_seed(0)
    network = build_model(ModelSpec(architecture="vgg16", head="compact", input_size=32, dropout=0.0))
    head = [module for module in network.modules() if isinstance(module, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(200.0)  # decisive logits, so the loss depends on which labels it is given
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 1])
    weights = torch.tensor([1.0, 3.0])  # class weights, as training uses
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    epoch_seed = 5
    result = train_one_epoch(
        network,
        pixels,
        labels,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.0),
        loss_fn=loss_fn,
        schedule=Schedule(peak_lr=0.0, warmup_steps=0, total_steps=1),
        first_step=0,
        epoch_seed=epoch_seed,
        batch_size=8,
        augmentation=Augmentation(strength=0.0),
        acquisition=0.0,
        mixup=0.4,
        device=torch.device("cpu"),
        amp=False,
        dist=DistInfo(rank=0, world_size=1, local_rank=0),
        description="mixup",
    )
    order = torch.randperm(8, generator=torch.Generator().manual_seed(epoch_seed))  # the epoch's one batch
    mixed, partner, lam = mix_pairs(
        pixels[order].float(), labels[order], torch.Generator().manual_seed(epoch_seed + 1), 0.4
    )
    network.train()
    with torch.no_grad():
        outputs = network(mixed)
    expected = lam * loss_fn(outputs, labels[order]) + (1 - lam) * loss_fn(outputs, partner)
    assert 0.0 < lam < 1.0
    assert result.loss == pytest.approx(float(expected), rel=1e-5)
    unmixed = loss_fn(outputs, labels[order])
    assert abs(float(unmixed) - float(expected)) > 1e-4  # the check can tell a mixed loss from a plain one


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


MIXUP_ARGS = ("--epochs", "2", "--batch-size", "4", "--mixup", "0.4", "--export-dtype", "float32")


@pytest.fixture(scope="module")
def mixup_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixup-run")
    assert main(train_args(dataset, out, *MIXUP_ARGS)) == 0
    return out


def test_mixup_changes_what_the_run_trains_on(dataset: Path, mixup_run: Path, tmp_path: Path) -> None:
    assert main(train_args(dataset, tmp_path, "--epochs", "1", "--batch-size", "4", "--export-dtype", "float32")) == 0
    assert history(mixup_run)[0]["train_loss"] != pytest.approx(history(tmp_path)[0]["train_loss"], rel=1e-3)


def test_resume_replays_the_same_blends(
    dataset: Path, mixup_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    crash_then_resume(monkeypatch, train_args(dataset, out, *MIXUP_ARGS), out)
    assert_same_run(out, mixup_run)


def test_resume_refuses_to_change_mixup(mixup_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(mixup_run), "--mixup", "1.0"]) == 2
    assert "--mixup" in capsys.readouterr().err
