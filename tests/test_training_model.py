"""Augmentation, learning-rate schedule, ImageNet initialisation and checkpoint round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import vgg16

from app.core.network import ModelSpec, build_model
from training.augment import Augmentation, augment_batch
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.distributed import DistInfo
from training.imagenet import load_imagenet
from training.loops import Schedule, epoch_batches
from training.user_errors import UsageError


def test_augment_is_seeded_in_range_and_off_at_zero_strength() -> None:
    pixels = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    first = augment_batch(pixels, torch.Generator().manual_seed(3), Augmentation())
    assert first.shape == pixels.shape and first.dtype == torch.float32
    assert float(first.min()) >= 0.0 and float(first.max()) <= 255.0
    torch.testing.assert_close(first, augment_batch(pixels, torch.Generator().manual_seed(3), Augmentation()))
    assert not torch.allclose(first, pixels.float())
    torch.testing.assert_close(augment_batch(pixels, torch.Generator(), Augmentation(strength=0.0)), pixels.float())


def test_hflip_only_flips() -> None:
    pixels = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = augment_batch(pixels, torch.Generator().manual_seed(0), Augmentation(strength=0.0, hflip=True))
    flipped = torch.flip(pixels.float(), dims=[3])
    is_flipped = [torch.allclose(o, f, atol=1e-3) for o, f in zip(out, flipped, strict=True)]
    is_same = [torch.allclose(o, p.float(), atol=1e-3) for o, p in zip(out, pixels, strict=True)]
    assert all(a or b for a, b in zip(is_flipped, is_same, strict=True)) and 10 < sum(is_flipped) < 54


def test_erase_corners_fills_one_corner_rectangle_with_the_mean() -> None:
    size = 40
    pixels = torch.randint(1, 255, (64, 1, size, size), dtype=torch.uint8)
    out = augment_batch(pixels, torch.Generator().manual_seed(1), Augmentation(strength=0.0, erase_corners=0.5))
    erased = 0
    for before, after in zip(pixels.float(), out, strict=True):
        changed = (after != before)[0]
        if not changed.any():
            continue
        erased += 1
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        # one solid rectangle, 10-25% of the side, flush with one corner, holding the image's mean
        height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert 4 <= height <= 10 and 4 <= width <= 10
        assert int(rows[0]) == 0 or int(rows[-1]) == size - 1
        assert int(cols[0]) == 0 or int(cols[-1]) == size - 1
        patch = after[0, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        torch.testing.assert_close(patch, torch.full_like(patch, float(before.mean())))
        outside = torch.ones_like(changed)
        outside[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = False
        assert torch.equal(after[0][outside], before[0][outside])
    assert 16 < erased < 48  # about half of 64


def test_zoom_in_enlarges_the_subject() -> None:
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disk = (((yy - 31.5) ** 2 + (xx - 31.5) ** 2) < 12**2).to(torch.uint8) * 200
    pixels = disk.view(1, 1, 64, 64).repeat(32, 1, 1, 1)
    area = float((pixels > 100).sum(dim=(1, 2, 3)).float().mean())
    zoomed = augment_batch(pixels, torch.Generator().manual_seed(0), Augmentation(strength=0.0, zoom_in=0.5))
    areas = (zoomed > 100).sum(dim=(1, 2, 3)).float()
    # scale 1 + U(0, 0.5): the disk's area grows by scale^2, i.e. by 1.58x on average (1x to 2.25x)
    assert float(areas.min()) >= area * 0.97 and 1.4 < float(areas.mean()) / area < 1.8


def _disk(count: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disk = (((yy - 31.5) ** 2 + (xx - 31.5) ** 2) < 12**2).to(torch.uint8) * 200
    return disk.view(1, 1, 64, 64).repeat(count, 1, 1, 1)


def test_aspect_jitter_stretches_width_against_height_and_keeps_the_area() -> None:
    pixels = _disk(200)
    out = augment_batch(pixels, torch.Generator().manual_seed(0), Augmentation(strength=0.0, aspect_jitter=0.3)) > 100
    width = out.any(dim=2).sum(dim=(1, 2)).float()  # columns the disk covers
    height = out.any(dim=3).sum(dim=(1, 2)).float()
    ratio = width / height
    # log-uniform in [1/1.3, 1.3] (plus a pixel of rounding on a 24 px disk): both ways, centred on 1
    assert float(ratio.min()) > 1 / 1.3 - 0.06 and float(ratio.max()) < 1.3 + 0.06
    assert float((ratio > 1.15).float().mean()) > 0.2 and float((ratio < 1 / 1.15).float().mean()) > 0.2
    assert abs(float(ratio.log().mean())) < 0.03
    areas = out.sum(dim=(1, 2, 3)).float()
    assert float((areas / float((pixels > 100).sum() / len(pixels)) - 1).abs().max()) < 0.05


def test_aspect_jitter_shares_every_other_draw_with_the_run_without_it() -> None:
    """Its draw comes last: a vanishing jitter gives the same rotation, shift, flip and intensity as none."""
    pixels = torch.randint(0, 256, (16, 1, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    options = Augmentation(strength=1.0, hflip=True, zoom_in=0.3)
    without = augment_batch(pixels, torch.Generator().manual_seed(4), options)
    tiny = augment_batch(pixels, torch.Generator().manual_seed(4), options.model_copy(update={"aspect_jitter": 1e-7}))
    real = augment_batch(pixels, torch.Generator().manual_seed(4), options.model_copy(update={"aspect_jitter": 0.3}))
    assert float((tiny - without).abs().max()) < 0.01
    assert float((real - without).abs().mean()) > 5


def test_each_augmentation_flag_reaches_the_batch() -> None:
    """The trainer passes TrainConfig.augmentation() to every batch: one field per flag, none dropped."""
    flags = {"aug_strength": 1.5, "hflip": True, "zoom_in": 0.2, "erase_corners": 0.3, "aspect_jitter": 0.25}
    config = TrainConfig(data=Path("d"), out=Path("o"), **flags)
    expected = Augmentation(strength=1.5, hflip=True, zoom_in=0.2, erase_corners=0.3, aspect_jitter=0.25)
    assert config.augmentation() == expected
    assert TrainConfig(data=Path("d"), out=Path("o")).augmentation() == Augmentation()  # the defaults agree


def test_schedule_warms_up_then_decays_to_zero() -> None:
    schedule = Schedule(peak_lr=1.0, warmup_steps=4, total_steps=20)
    assert [schedule.lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule.lr(12) == pytest.approx(0.5)
    assert schedule.lr(20) == pytest.approx(0.0)


def test_epoch_batches_shard_all_images_evenly() -> None:
    shards = [epoch_batches(21, 4, 7, DistInfo(rank, 2)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    seen = torch.cat([torch.cat(s) for s in shards])
    assert set(seen.tolist()) == set(range(21))
    single = epoch_batches(21, 4, 7, DistInfo())
    assert [len(b) for b in single] == [4, 4, 4, 4, 4]  # trailing batch of one is dropped
    assert torch.equal(torch.cat(single), torch.cat(epoch_batches(21, 4, 7, DistInfo())))


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-format VGG16 state dict (random values; features only to keep it small)."""
    torch.manual_seed(5)
    state = {k: v for k, v in vgg16(weights=None).state_dict().items() if k.startswith("features.")}
    path = tmp_path_factory.mktemp("imagenet") / "vgg16.safetensors"
    save_file(state, str(path))
    return path


def test_imagenet_features_are_copied(imagenet_file: Path) -> None:
    from safetensors.torch import load_file

    network = build_model(ModelSpec(architecture="vgg16", head="compact", input_size=32))
    load_imagenet(network, imagenet_file)
    source = load_file(str(imagenet_file))
    for key, value in network.features.state_dict().items():
        torch.testing.assert_close(value, source[f"features.{key}"])


def test_imagenet_errors_are_clear(imagenet_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--imagenet-weights"):
        load_imagenet(build_model(ModelSpec(architecture="vgg16", input_size=32)), tmp_path / "absent.pth")
    with pytest.raises(UsageError, match="missing"):  # BN model needs BN tensors
        load_imagenet(build_model(ModelSpec(architecture="vgg16_bn", input_size=32)), imagenet_file)
    with pytest.raises(UsageError, match="classifier"):  # classic head also loads fc6/fc7
        load_imagenet(build_model(ModelSpec(architecture="vgg16", head="classic", input_size=32)), imagenet_file)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="not torchvision"):
        load_imagenet(build_model(ModelSpec(architecture="vgg16", input_size=32)), tmp_path / "bad.pth")


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_checkpoint_round_trips_model_and_optimizer(opt: str, tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    make = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.1),
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    }[opt]
    optimizer = make(model.parameters())
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 3)).sum().backward()
        optimizer.step()
    save_checkpoint(tmp_path, "last", model, {"state": {"epoch": 3}}, optimizer)
    assert not list((tmp_path / "checkpoint").glob("*.tmp*"))
    clone = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    clone_optimizer = make(clone.parameters())
    meta = load_checkpoint(tmp_path, "last", clone, clone_optimizer)
    assert meta["state"] == {"epoch": 3}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(clone.state_dict()[key], value)
    expected, actual = optimizer.state_dict(), clone_optimizer.state_dict()
    assert actual["param_groups"] == expected["param_groups"]
    for index, entries in expected["state"].items():
        for key, value in entries.items():
            torch.testing.assert_close(torch.as_tensor(actual["state"][index][key]), torch.as_tensor(value))


class _KilledError(Exception):
    """Stands for a SIGKILL between the two renames of a checkpoint pair."""


def test_a_kill_between_the_two_renames_of_a_checkpoint_is_completed_never_mismatched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tensors were renamed, the JSON not: epoch 2's weights sat under epoch 1's state, and a resume re-trained
    epoch 2 on top of them without a word. The tensors carry their JSON's digest: the save is completed on load."""
    import os

    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, "last", model, {"state": {"epoch": 1}}, None)
    with torch.no_grad():
        model.weight.add_(1.0)
    real_replace = os.replace

    def killed_after_the_tensors(src: object, dst: object) -> None:
        real_replace(src, dst)  # type: ignore[arg-type]
        if str(dst).endswith("last.safetensors"):
            raise _KilledError

    monkeypatch.setattr(os, "replace", killed_after_the_tensors)
    with pytest.raises(_KilledError):
        save_checkpoint(tmp_path, "last", model, {"state": {"epoch": 2}}, None)
    monkeypatch.undo()
    clone = torch.nn.Linear(3, 2)
    assert load_checkpoint(tmp_path, "last", clone)["state"] == {"epoch": 2}
    torch.testing.assert_close(clone.weight, model.weight)
    assert not list((tmp_path / "checkpoint").glob("*.tmp*"))
    # Without the new JSON to finish with, the pair is refused as damaged, never read as one save.
    info = tmp_path / "checkpoint" / "last.json"
    info.write_text(info.read_text().replace('"epoch": 2', '"epoch": 1'))
    with pytest.raises(UsageError, match=r"damaged \(ValueError: last.safetensors and last.json come from different"):
        load_checkpoint(tmp_path, "last", clone)


def test_imagenet_files_that_are_not_weights_are_refused_in_one_clear_line(tmp_path: Path) -> None:
    """Non-tensor values crashed with an AttributeError; a pickle of objects dumped torch's advice to load it with
    weights_only=False; an empty file ended its message in nothing."""
    import pickle

    network = build_model(ModelSpec(architecture="vgg16", input_size=32))
    floats = tmp_path / "floats.pth"
    torch.save({k: 1.0 for k in network.state_dict() if k.startswith("features.")}, floats)
    with pytest.raises(UsageError, match=r"floats.pth is not a state dict of weights: features.0.weight holds a float"):
        load_imagenet(network, floats)
    pickled = tmp_path / "objects.pth"
    pickled.write_bytes(pickle.dumps({"features.0.weight": Augmentation()}))
    with pytest.raises(UsageError) as refused:
        load_imagenet(network, pickled)
    message = str(refused.value)
    assert "\n" not in message and "is a pickle that holds more than tensors: loading it would run its code" in message
    assert "OUT.safetensors" in message and "Re-running" not in message and "file an issue" not in message
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match=r"^cannot read ImageNet weights .*empty.pth: empty file$"):
        load_imagenet(network, empty)


def test_imagenet_weights_with_non_finite_values_are_refused_before_training(tmp_path: Path) -> None:
    """A NaN in the file made the first loss NaN, reported as divergence with advice to lower the lr."""
    from safetensors.torch import save_file

    network = build_model(ModelSpec(architecture="vgg16", input_size=32))
    state = {k: v.clone() for k, v in network.state_dict().items() if k.startswith("features.")}
    state["features.2.weight"][0, 0, 0, 0] = float("nan")
    damaged = tmp_path / "damaged.safetensors"
    save_file(state, str(damaged))
    with pytest.raises(UsageError, match=r"not finite \(NaN or infinity\) in \['features.2.weight'\]"):
        load_imagenet(network, damaged)
