"""The in-network contrast steps: histogram equalisation and CLAHE, against oracles written out in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from app.core.artifacts import export_model, load_model
from app.core.contrast import clahe, equalize_histogram
from app.core.network import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, Normalization, build_model


def _textbook_equalization(image: np.ndarray) -> np.ndarray:
    """round((cdf(v) - cdf_min) / (n - cdf_min) * 255), written out in numpy as an independent oracle."""
    cdf = np.bincount(image.ravel(), minlength=256).cumsum()
    lowest = cdf[image.min()]
    return np.round((cdf[image] - lowest) / (image.size - lowest) * 255)


def test_histogram_equalisation_matches_the_textbook_mapping() -> None:
    rng = np.random.default_rng(3)
    batch = (rng.beta(2, 5, (3, 1, 24, 20)) * 180 + 30).astype(np.uint8)
    got = equalize_histogram(torch.from_numpy(batch)).numpy()
    for image, equalized in zip(batch, got, strict=True):
        np.testing.assert_array_equal(equalized[0], _textbook_equalization(image[0]))
    assert equalize_histogram(torch.full((1, 1, 4, 4), 9, dtype=torch.uint8)).eq(0).all()


def test_histogram_equalisation_rounds_and_clamps_float_levels() -> None:
    """Augmented float batches leave 0..255: each value is rounded to the nearest level and clamped first."""
    pixels = torch.tensor([[[[-3.0, 0.4], [254.6, 300.0]]]])
    # Levels [[0, 0], [255, 255]]: cdf(0) = 2 = cdf_min, cdf(255) = 4, so 255 -> (4 - 2) / (4 - 2) * 255.
    expected = torch.tensor([[[[0.0, 0.0], [255.0, 255.0]]]])
    got = equalize_histogram(pixels)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_histogram_equalisation_of_a_nearly_constant_channel_is_per_channel() -> None:
    """One bright pixel over three dark ones: n - cdf_min = 1, the smallest denominator that is not clamped."""
    pixels = torch.tensor([[[[0, 0], [0, 5]], [[7, 7], [7, 7]]]], dtype=torch.uint8)
    # Channel 0: cdf(0) = 3 = cdf_min, cdf(5) = 4, so 5 -> (4 - 3) / (4 - 3) * 255; channel 1 is constant -> 0.
    expected = torch.tensor([[[[0.0, 0.0], [0.0, 255.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    assert torch.equal(equalize_histogram(pixels), expected)


def _textbook_clahe(image: np.ndarray, clip_limit: float, tiles: int) -> np.ndarray:
    """Zuiderveld's CLAHE pixel by pixel in float64, as the docstring states it: an independent oracle."""
    height, width = image.shape
    tile_h, tile_w = height // tiles, width // tiles
    size = tile_h * tile_w
    limit = max(clip_limit * size / 256, 1.0)
    mappings = np.empty((tiles, tiles, 256))
    for row in range(tiles):
        for col in range(tiles):
            tile = image[row * tile_h : (row + 1) * tile_h, col * tile_w : (col + 1) * tile_w]
            counts = np.bincount(tile.ravel(), minlength=256).astype(float)
            excess = np.maximum(counts - limit, 0).sum()
            mappings[row, col] = np.cumsum(np.minimum(counts, limit) + excess / 256) * 255 / size

    def bracket(position: float) -> tuple[int, int, float]:
        low = int(np.floor(position))
        return min(max(low, 0), tiles - 1), min(max(low + 1, 0), tiles - 1), position - low

    out = np.empty((height, width))
    for y in range(height):
        top, bottom, down = bracket((y + 0.5) / tile_h - 0.5)
        for x in range(width):
            left, right, across = bracket((x + 0.5) / tile_w - 0.5)
            v = image[y, x]
            upper = mappings[top, left, v] * (1 - across) + mappings[top, right, v] * across
            lower = mappings[bottom, left, v] * (1 - across) + mappings[bottom, right, v] * across
            out[y, x] = upper * (1 - down) + lower * down
    return np.round(out)


def _patchy_images(rng: np.random.Generator, count: int, side: int) -> np.ndarray:
    """Images whose exposure differs from region to region, so every tile has its own mapping."""
    gain = rng.uniform(0.2, 1.0, (count, 1, 4, 4)).repeat(side // 4, 2).repeat(side // 4, 3)
    offset = rng.uniform(0, 120, (count, 1, 4, 4)).repeat(side // 4, 2).repeat(side // 4, 3)
    return (rng.beta(2, 5, (count, 1, side, side)) * 255 * gain + offset).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(("clip_limit", "tiles"), [(1.0, 4), (2.0, 4), (3.5, 2), (1000.0, 8), (2.0, 1)])
def test_clahe_matches_the_pixel_by_pixel_oracle(clip_limit: float, tiles: int) -> None:
    """Float32 on the device vs float64 in loops: a half-level tie may round apart, nothing more."""
    batch = _patchy_images(np.random.default_rng(int(clip_limit * 10) + tiles), 3, 32)
    got = clahe(torch.from_numpy(batch), clip_limit, tiles).numpy()
    assert got.dtype == np.float32
    for image, result in zip(batch, got, strict=True):
        difference = np.abs(result[0] - _textbook_clahe(image[0], clip_limit, tiles))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.005


def test_unclipped_single_tile_clahe_is_plain_cumulative_equalisation() -> None:
    rng = np.random.default_rng(5)
    image = (rng.beta(2, 5, (24, 20)) * 180 + 30).astype(np.uint8)
    cdf = np.bincount(image.ravel(), minlength=256).cumsum()
    expected = np.round(cdf[image] * 255 / image.size)
    np.testing.assert_array_equal(clahe(torch.from_numpy(image)[None, None], 1e6, 1)[0, 0].numpy(), expected)
    # The top level is a level of its own: half 254, half 255 maps to cdf(254) = 1/2 and cdf(255) = 1.
    top = torch.tensor([[[[254, 255], [254, 255]]]], dtype=torch.uint8)
    assert torch.equal(clahe(top, 1e6, 1), torch.tensor([[[[128.0, 255.0], [128.0, 255.0]]]]))


def test_clahe_stretches_each_region_on_its_own() -> None:
    """A dark half and a bright half, each with faint texture: global equalisation gives each half
    about half the grey range, CLAHE with one tile per half gives each nearly all of it."""
    rng = np.random.default_rng(2)
    image = np.empty((1, 1, 32, 32), np.uint8)
    image[..., :16] = rng.integers(10, 40, (32, 16))
    image[..., 16:] = rng.integers(200, 230, (32, 16))
    pixels = torch.from_numpy(image)
    local = clahe(pixels, 1000.0, 2)[0, 0]
    whole = equalize_histogram(pixels)[0, 0]
    # Away from the seam, where the bilinear blend takes in the other half's mapping.
    for columns in (slice(0, 8), slice(24, 32)):
        assert float(local[:, columns].std()) > 1.7 * float(whole[:, columns].std())
        assert float(local[:, columns].max() - local[:, columns].min()) > 200


def test_lower_clip_limits_give_gentler_mappings() -> None:
    """The clip bounds each tile's mapping slope: contrast gained shrinks monotonically with the limit."""
    faint = torch.from_numpy(np.random.default_rng(8).integers(100, 131, (1, 1, 32, 32)).astype(np.uint8))
    spread = [float(clahe(faint, limit, 2).std()) for limit in (1.0, 1.5, 3.0, 6.0, 1000.0)]
    assert spread == sorted(spread) and spread[-1] > 4 * spread[0]
    # At limit 1 each present level keeps one count plus its share of the spread excess, so the
    # mapping's slope there is under twice the identity's (here 1.9); unclipped it is about 8.
    assert spread[0] < 2 * float(faint.float().std()) < spread[1]


def test_clahe_works_per_image_and_channel_and_on_float_batches() -> None:
    rng = np.random.default_rng(4)
    batch = torch.from_numpy(_patchy_images(rng, 4, 16).reshape(2, 2, 16, 16))
    together = clahe(batch, 2.0, 2)
    for i in range(2):
        for c in range(2):
            assert torch.equal(together[i : i + 1, c : c + 1], clahe(batch[i : i + 1, c : c + 1], 2.0, 2))
    # Augmented batches are floats that leave 0..255: each is rounded to a level and clamped first.
    jittered = batch.float() + torch.empty(batch.shape).uniform_(
        -0.49, 0.49, generator=torch.Generator().manual_seed(0)
    )
    jittered[0, 0, 0, 0], jittered[1, 1, 5, 5] = -7.0, 300.0
    levels = batch.clone()
    levels[0, 0, 0, 0], levels[1, 1, 5, 5] = 0, 255
    assert torch.equal(clahe(jittered, 2.0, 2), clahe(levels, 2.0, 2))


@pytest.mark.parametrize(
    ("clip_limit", "tiles", "height", "width"),
    [(0.5, 4, 32, 32), (2.0, 3, 32, 32), (2.0, 0, 32, 32), (2.0, 4, 30, 30), (2.0, 4, 32, 30), (2.0, 4, 30, 32)],
)
def test_clahe_refuses_what_it_cannot_compute(clip_limit: float, tiles: int, height: int, width: int) -> None:
    with pytest.raises(ValueError, match=r"clip_limit|whole tiles"):
        clahe(torch.zeros((1, 1, height, width), dtype=torch.uint8), clip_limit, tiles)


def test_clahe_network_normalises_through_clahe_and_survives_export(tmp_path: Path) -> None:
    """The spec's contrast step is applied inside the network and travels in model.json, so the
    loaded network (checked against its golden outputs at load) applies it too."""
    torch.manual_seed(0)
    spec = ModelSpec(architecture="vgg16", input_size=32, normalization=Normalization(clahe_clip=2.0, clahe_tiles=4))
    network = build_model(spec).eval()
    pixels = torch.from_numpy(_patchy_images(np.random.default_rng(1), 2, 32))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (clahe(pixels, 2.0, 4).expand(-1, 3, -1, -1) / 255 - mean) / std
    torch.testing.assert_close(network.normalize(pixels), expected)
    export_model(network, tmp_path, version="clahe", golden_inputs=pixels)
    loaded = load_model(tmp_path)
    assert loaded.metadata.spec.normalization == spec.normalization
    with torch.inference_mode():
        torch.testing.assert_close(loaded.network(pixels), network(pixels))
        plain = build_model(spec.model_copy(update={"normalization": Normalization()})).eval()
        plain.load_state_dict(network.state_dict())
        assert not torch.allclose(plain(pixels), network(pixels))


def test_the_spec_refuses_two_contrast_steps_and_tiles_that_do_not_divide() -> None:
    with pytest.raises(ValidationError, match="choose one contrast step"):
        Normalization(equalize=True, clahe_clip=2.0)
    with pytest.raises(ValidationError, match="does not split into 6 CLAHE tiles"):
        ModelSpec(input_size=64, normalization=Normalization(clahe_clip=2.0, clahe_tiles=6))
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Normalization(clahe_clip=0.5)
    with pytest.raises(ValidationError, match="less than or equal to 64"):
        Normalization(clahe_clip=2.0, clahe_tiles=65)
    # Tiles that do not divide are harmless while CLAHE is off.
    assert ModelSpec(input_size=64, normalization=Normalization(clahe_tiles=6)).normalization.clahe_clip is None
