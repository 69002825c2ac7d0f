"""benchmarks/occlusion_check.py: the cells tile the film, a planted cause is found, the CAM split is exact."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.core.artifacts import load_model
from app.core.decision import is_pneumonia, pneumonia_probability
from app.core.network import ModelSpec, build_model
from benchmarks import occlusion_check
from tests.training_support import make_dataset, normal_names, pneumonia_names, train_args, write_split
from training.cli import main as training_main


@pytest.mark.parametrize(("size", "grid"), [(10, 3), (128, 4), (7, 7), (5, 1)])
def test_cells_tile_the_side_exactly(size: int, grid: int) -> None:
    bands = occlusion_check.cell_slices(size, grid)
    covered = [i for band in bands for i in range(band.start, band.stop)]
    assert covered == list(range(size)) and len(bands) == grid and all(b.stop > b.start for b in bands)


def test_occlusion_paints_one_cell_with_its_own_median_and_leaves_the_input_alone() -> None:
    pixels = torch.arange(2 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 1, 8, 8)
    before = pixels.clone()
    out = occlusion_check.occlude(pixels, slice(0, 4), slice(4, 8))
    assert torch.equal(pixels, before)
    for i in range(2):
        cell = before[i, 0, 0:4, 4:8]
        assert torch.all(out[i, 0, 0:4, 4:8] == cell.flatten().median())
        mask = torch.ones(8, 8, dtype=torch.bool)
        mask[0:4, 4:8] = False
        assert torch.equal(out[i, 0][mask], before[i, 0][mask])


def planted_films() -> tuple[torch.Tensor, np.ndarray]:
    """Bright films with a dark top-left cell; a few have a small white 'marker' inside that cell.

    Normal films with the marker are the false positives of the planted scorer below; the rest of
    the film is bright, so filling the cell with the film's median (not the cell's) would keep the
    cell bright and the call would not flip.
    """
    labels = np.array([0] * 6 + [1] * 4)
    pixels = torch.full((10, 1, 16, 16), 200, dtype=torch.uint8)
    pixels[:, :, 0:4, 0:4] = 0
    for i in (0, 1, 6, 7):  # two normal films and two pneumonia films carry the marker
        pixels[i, :, 1:3, 1:2] = 255
    pixels[8:, :, 13, 13:15] = 255  # the other pneumonia films are called on a spot in the bottom-right cell
    return pixels, labels


def planted_score(pixels: torch.Tensor) -> np.ndarray:
    """Log-odds +5 when the top-left cell holds anything brighter than 150 or the bottom-right a white spot."""
    marker = pixels[:, 0, 0:4, 0:4].flatten(1).amax(1) > 150
    bottom = pixels[:, 0, 12:16, 12:16].flatten(1).amax(1) > 250
    return np.where((marker | bottom).numpy(), 5.0, -5.0)


def test_a_planted_marker_is_found_in_its_cell_and_nowhere_else() -> None:
    pixels, labels = planted_films()
    base = planted_score(pixels)
    occluded = occlusion_check.occlusion_log_odds(planted_score, pixels, 4)
    cam = np.zeros((len(base), 4, 4))
    names = [f"f{i}" for i in range(10)]
    lines = occlusion_check.report(occlusion_check.Scored(base, occluded, cam, labels, 0.5, names))
    text = "\n".join(lines)
    assert "## false positives: 2" in text and "## true negatives: 4" in text and "## true positives: 4" in text
    false_positive_flips = section_grid(lines, "false positives", "films whose call flips when hidden")
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 0] = 2
    assert np.array_equal(false_positive_flips, expected)
    assert np.array_equal(section_grid(lines, "true negatives", "films whose call flips when hidden"), 0 * expected)
    tp = section_grid(lines, "true positives", "films whose call flips when hidden")
    assert tp[0, 0] == 2 and tp[3, 3] == 2 and tp.sum() == 4
    assert "| f0 | 0.993 | (0, 0) | -10.00 | (0, 0) |" in text


def test_the_montage_shows_each_false_positive_with_its_occlusion_map_in_the_service_colours() -> None:
    pixels, labels = planted_films()
    base = planted_score(pixels)
    occluded = occlusion_check.occlusion_log_odds(planted_score, pixels, 4)
    tile = 128
    names = [f"f{i}" for i in range(10)]
    scored = occlusion_check.Scored(base, occluded, None, labels, 0.5, names)
    sheet = occlusion_check.montage(pixels, scored, tile)
    assert sheet is not None and sheet.size == (2 * tile, 2 * tile)  # two false positives, film + occlusion
    image = np.asarray(sheet).astype(int)
    for row in range(2):
        red, green, blue = image[row * tile + 24, tile + 16]  # the marker's cell on the occlusion map
        assert red > green + 60 and red > blue + 60
        assert len(set(image[row * tile + 100, tile + 100])) == 1  # a cell that did nothing stays grey
        assert len(set(image[row * tile + 100, 100])) == 1  # the film itself is drawn grey
    with_cam = occlusion_check.montage(pixels, replace(scored, cam=np.zeros((10, 4, 4))), 32)
    assert with_cam is not None and with_cam.size == (3 * 32, 2 * 32)
    assert occlusion_check.montage(pixels, replace(scored, threshold=0.999)) is None


def section_grid(lines: list[str], group: str, table: str) -> np.ndarray:
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {group}:"))
    head = next(i for i in range(start, len(lines)) if lines[i].startswith(f"| {table} |"))
    rows = [re.split(r"\s*\|\s*", line.strip("| "))[1:] for line in lines[head + 2 : head + 6]]
    return np.array([[float(v) for v in row] for row in rows])


def test_cam_cells_sum_to_the_calibrated_log_odds_minus_the_bias() -> None:
    torch.manual_seed(0)
    network = build_model(ModelSpec(input_size=64)).eval()
    pixels = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    temperature = 1.7
    cam = occlusion_check.cam_contributions(network, temperature, pixels)
    assert cam.shape == (3, 2, 2)
    bias = float(network.classifier[-1].bias.detach()[1] - network.classifier[-1].bias.detach()[0]) / temperature
    log_odds = occlusion_check.network_scorer(network, temperature)(pixels)
    np.testing.assert_allclose(cam.sum((1, 2)) + bias, log_odds, rtol=1e-4, atol=1e-4)
    p = pneumonia_probability(network(pixels).detach(), temperature).double().numpy()
    np.testing.assert_allclose(occlusion_check.probability(log_odds), p, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    data = make_dataset(tmp_path_factory.mktemp("data"))
    write_split(data / "test", normal_names(range(70, 74), 1), pneumonia_names(range(70, 74), 1), seed=5)
    out = tmp_path_factory.mktemp("runs")
    for head in ("compact", "classic"):
        assert training_main(train_args(data, out / head, "--epochs", "1", "--head", head)) == 0
    return {"data": data, "compact": out / "compact", "classic": out / "classic"}


def test_main_groups_the_films_as_the_model_calls_them(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    sheet = runs["data"].parent / "sheet.png"
    occlusion_check.main([str(runs["compact"]), "--data", str(runs["data"]), "--montage", str(sheet)])
    out = capsys.readouterr().out
    loaded = load_model(runs["compact"])
    test = occlusion_check.eval_sets.evaluation_sets(runs["data"], loaded.metadata)[-1]
    p = pneumonia_probability(loaded.network(test.pixels).detach(), loaded.metadata.temperature).numpy()
    called = is_pneumonia(p, loaded.metadata.threshold)
    counts = {
        "false positives": int(((test.labels == 0) & called).sum()),
        "true negatives": int(((test.labels == 0) & ~called).sum()),
        "true positives": int(((test.labels == 1) & called).sum()),
    }
    for group, n in counts.items():
        assert f"## {group}: {n}\n" in out
    # 32 px: the feature grid, and so the default occlusion grid, is 1 x 1
    assert "occlusion grid 1 x 1" in out and f"{len(test.labels)} films" in out
    assert out.count("| mean CAM contribution (log-odds) |") == sum(n > 0 for n in counts.values())
    if counts["false positives"]:
        assert Image.open(sheet).size == (3 * 256, counts["false positives"] * 256)
    else:
        assert f"no false positives: {sheet} not written" in out and not sheet.exists()


def test_a_grid_off_the_feature_grid_or_a_classic_head_gets_no_cam(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for run in ("compact", "classic"):
        occlusion_check.main([str(runs[run]), "--data", str(runs["data"]), "--grid", "2"])
        out = capsys.readouterr().out
        assert "occlusion grid 2 x 2" in out and "films whose call flips" in out and "CAM" not in out


def test_a_classic_head_needs_a_grid_and_a_grid_finer_than_the_image_is_refused(runs: dict[str, Path]) -> None:
    with pytest.raises(SystemExit, match="no class activation map: give --grid"):
        occlusion_check.main([str(runs["classic"]), "--data", str(runs["data"])])
    for grid in ("0", "33"):
        with pytest.raises(SystemExit, match=rf"--grid must be 1\.\.32, got {grid}"):
            occlusion_check.main([str(runs["compact"]), "--data", str(runs["data"]), "--grid", grid])
