"""benchmarks/aspect_check: the anisotropy statistic, the stretch, a planted shape cue, and a real run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.artifacts import load_model
from app.core.decision import is_pneumonia, pneumonia_probability
from benchmarks import aspect_check
from tests.training_support import make_dataset, normal_names, pneumonia_names, train_args, write_split
from training.cli import main as training_main


def stripes(period: int, side: int = 32, vertical: bool = True) -> torch.Tensor:
    """uint8[1, 1, side, side] bars of ``period`` pixels; vertical bars vary only across."""
    bars = ((torch.arange(side) // period) % 2 * 200).to(torch.uint8)
    image = bars.view(1, side).expand(side, side) if vertical else bars.view(side, 1).expand(side, side)
    return image.reshape(1, 1, side, side).clone()


def test_anisotropy_measures_across_against_down() -> None:
    checker = (stripes(4) ^ stripes(4, vertical=False)).reshape(1, 1, 32, 32)
    flat = torch.full((1, 1, 32, 32), 7, dtype=torch.uint8)
    got = aspect_check.anisotropy(torch.cat([stripes(4), stripes(4, vertical=False), checker, flat]))
    assert got[0] == np.inf and got[1] == 0.0 and got[2] == pytest.approx(1.0) and got[3] == 1.0
    noise = torch.randint(0, 256, (3, 1, 32, 32), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    np.testing.assert_allclose(aspect_check.anisotropy(noise) * aspect_check.anisotropy(noise.transpose(2, 3)), 1.0)


def test_stretch_magnifies_one_axis_about_the_centre() -> None:
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disk = ((((yy - 31.5) ** 2 + (xx - 31.5) ** 2) < 10**2).to(torch.uint8) * 200).view(1, 1, 64, 64)
    torch.testing.assert_close(aspect_check.stretch(disk, 1.0, "horizontal"), disk.float(), atol=1e-3, rtol=0)

    def extent(image: torch.Tensor) -> tuple[int, int]:
        inside = image[0, 0] > 100
        return int(inside.any(0).sum()), int(inside.any(1).sum())  # (width, height)

    assert extent(disk) == (20, 20)
    assert extent(aspect_check.stretch(disk, 1.5, "horizontal")) == (30, 20)
    assert extent(aspect_check.stretch(disk, 1.5, "vertical")) == (20, 30)
    assert extent(aspect_check.stretch(disk, 0.75, "both")) == (15, 15)  # the mirrored margins hold no disk
    # Widening bars spaces their edges out: the horizontal differences halve, the vertical stay 0.
    wide = aspect_check.stretch(stripes(4), 2.0, "horizontal")
    assert aspect_check.anisotropy(wide)[0] == np.inf
    ratio = float(wide.diff(dim=3).abs().mean() / stripes(4).float().diff(dim=3).abs().mean())
    assert 0.45 < ratio < 0.55


def shaped_score(pixels: torch.Tensor) -> np.ndarray:
    """A planted network that reads the shape alone: log-odds rise with horizontal over vertical detail."""
    return 3.0 * np.log(aspect_check.anisotropy(pixels))


def table(lines: list[str], title: str) -> dict[str, list[str]]:
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    header = [c.strip() for c in lines[start + 2].strip("|").split("|")]
    rows = {}
    for line in lines[start + 4 :]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return rows


def test_a_planted_shape_cue_moves_with_the_shape_and_not_with_the_zoom() -> None:
    # Smooth random films (plane waves 12-30 px long in random directions), which bilinear resampling
    # reproduces: a stretch changes the balance of their gradients and nothing else.
    rng = np.random.default_rng(3)
    yy, xx = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    waves = np.zeros((40, 64, 64))
    for film in waves:
        for _ in range(6):
            angle, length, phase = rng.uniform(0, np.pi), rng.uniform(12, 30), rng.uniform(0, 2 * np.pi)
            film += np.cos(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / length + phase)
    films = torch.from_numpy((waves - waves.min()) / np.ptp(waves) * 255).round().to(torch.uint8).unsqueeze(1)
    labels = np.array([0, 1] * 20)
    base, stretched = aspect_check.score_set(shaped_score, films, (0.85, 1.15))
    groups = [
        aspect_check.Group("validation NORMAL", labels == 0),
        aspect_check.Group("validation PNEUMONIA", labels == 1),
    ]
    scored = aspect_check.Scored(base, stretched, aspect_check.anisotropy(films), groups)
    lines = aspect_check.report([scored], threshold=0.5, factors=(0.85, 1.15))
    changes = table(lines, "mean calibrated log-odds")
    for group in ("validation NORMAL", "validation PNEUMONIA"):
        row = {name: float(value) for name, value in changes[group].items()}
        # Widening (x1.15 across) spaces out horizontal detail: lower; narrowing: higher; the vertical
        # stretch does the reverse; zooming both ways keeps the shape and so the planted score.
        assert row["horizontal x1.15"] < -0.3 and row["horizontal x0.85"] > 0.3
        assert row["vertical x1.15"] > 0.3 and row["vertical x0.85"] < -0.3
        assert abs(row["both x1.15"]) < 0.1 and abs(row["both x0.85"]) < 0.1
    # Unrelated to the label by construction: the class-cue AUC sits near one half.
    auc = float(re.search(r"validation PNEUMONIA against validation NORMAL: ([\d.]+)", "\n".join(lines)).group(1))
    assert 0.25 < auc < 0.75


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    data = make_dataset(tmp_path_factory.mktemp("data"))
    write_split(data / "test", normal_names(range(70, 74), 1), pneumonia_names(range(70, 74), 1), seed=5)
    out = tmp_path_factory.mktemp("runs") / "compact"
    assert training_main(train_args(data, out, "--epochs", "1")) == 0
    return {"data": data, "model": out}


def test_main_groups_the_films_as_the_model_calls_them(
    run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    aspect_check.main([str(run["model"]), "--data", str(run["data"]), "--factors", "0.9", "1.2"])
    out = capsys.readouterr().out
    loaded = load_model(run["model"])
    test = aspect_check.eval_sets.held_out_set(run["data"], loaded.metadata)
    p = pneumonia_probability(loaded.network(test.pixels).detach(), loaded.metadata.temperature).numpy()
    called = is_pneumonia(p, loaded.metadata.threshold)
    calls = table(out.splitlines(), "films called PNEUMONIA")
    for group, members in (
        ("test false positives", (test.labels == 0) & called),
        ("test true negatives", (test.labels == 0) & ~called),
        ("test true positives", (test.labels == 1) & called),
        ("test false negatives", (test.labels == 1) & ~called),
    ):
        n = int(members.sum())
        assert (f"| {group} | {n} |" in out) == (n > 0)
        if n:
            assert calls[group]["as they are"] == str(int(called[members].sum()))
    assert "horizontal x1.2" in out and "both x0.9" in out


@pytest.mark.parametrize("factors", [["1.0"], ["0.4"], ["2.5", "1.1"]])
def test_factors_outside_the_range_or_of_one_are_refused(run: dict[str, Path], factors: list[str]) -> None:
    with pytest.raises(SystemExit, match=r"--factors must lie in 0\.5\.\.2\.0 and differ from 1"):
        aspect_check.main([str(run["model"]), "--data", str(run["data"]), "--factors", *factors])
