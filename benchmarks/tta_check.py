"""Would test-time augmentation help an exported model? Calibrated on validation, reported on a test folder.

For each view (identity, zoom out/in, small shifts) and each averaged combination of views, the logits are
averaged, the temperature and the threshold are re-fitted on the VALIDATION split exactly as training does
(``fit_temperature``, ``select_threshold``), and the test metrics are computed at that threshold with the
project's own metric code. Nothing is fitted on the test folder. Views act on the network's ``uint8[S,S]``
input, as a serving-side TTA would.

    python -m benchmarks.tta_check --weights weights --data ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from app.core.artifacts import load_model
from app.core.decision import pneumonia_probability
from training.calibration import operating_point, parse_rule
from training.data import discover, load_images
from training.loops import predict_logits
from training.metrics import binary_metrics, roc_auc
from training.split import grouped_stratified_split, recorded_split

View = Callable[[torch.Tensor], torch.Tensor]


def zoom(pixels: torch.Tensor, factor: float) -> torch.Tensor:
    """factor < 1 zooms out (edge-replicated border), > 1 zooms in (centre crop); back to the input size."""
    size = pixels.shape[-1]
    x = pixels.float()
    if factor < 1:
        pad = round(size * (1 / factor - 1) / 2)
        x = F.pad(x, (pad,) * 4, mode="replicate")
    else:
        cut = round(size * (1 - 1 / factor) / 2)
        x = x[..., cut : size - cut, cut : size - cut]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


VIEWS: dict[str, View] = {
    "id": lambda x: x,
    "zoom_out_0.9": lambda x: zoom(x, 0.9),
    "zoom_out_0.8": lambda x: zoom(x, 0.8),
    "zoom_in_1.1": lambda x: zoom(x, 1.1),
    "shift_+2": lambda x: torch.roll(x, (2, 2), (-2, -1)),
    "shift_-2": lambda x: torch.roll(x, (-2, -2), (-2, -1)),
}
COMBOS = [
    ("id", "zoom_out_0.9"),
    ("id", "zoom_out_0.9", "zoom_out_0.8"),
    ("id", "shift_+2", "shift_-2"),
    ("id", "zoom_out_0.9", "shift_+2", "shift_-2"),
    tuple(VIEWS),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"), help="decoded-image cache folder")
    args = parser.parse_args(argv)

    loaded = load_model(args.weights)
    meta = loaded.metadata
    size = meta.spec.input_size
    run_args = meta.provenance.get("args", {})
    splits = discover(args.data)
    train = load_images(splits["train"], size, workers=2, cache_dir=args.cache).images
    test = load_images(splits["test"], size, workers=2, cache_dir=args.cache).images
    # The model's own validation split (same seed and fraction as its training run).
    fraction, seed = recorded_split({"val_fraction": 0.15, "seed": 0} | run_args)
    _, val_index = grouped_stratified_split([str(p) for p in train.paths], train.labels.numpy(), fraction, seed)
    val_x, val_y = train.pixels[val_index], train.labels[val_index]
    # The model's own operating-point rule, as finalize stored it: "youden" or "sensitivity>=T".
    try:
        method, target = parse_rule(meta.threshold_method)
    except ValueError as error:
        raise SystemExit(f"{error} in {args.weights}") from None
    cpu = torch.device("cpu")

    def logits(pixels: torch.Tensor, view: View) -> torch.Tensor:
        return predict_logits(loaded.network, view(pixels), batch_size=64, device=cpu, show=False).float()

    views = {name: (logits(val_x, view), logits(test.pixels, view)) for name, view in VIEWS.items()}
    print("| views | temperature | threshold | val AUC | test AUC | test sens | test spec | test ECE |")
    print("|---|---|---|---|---|---|---|---|")
    for combo in [(name,) for name in VIEWS] + COMBOS:
        val_logits = torch.stack([views[n][0] for n in combo]).mean(0)
        test_logits = torch.stack([views[n][1] for n in combo]).mean(0)
        temperature, threshold, val_p = operating_point(val_logits, val_y, method, target)
        test_p = pneumonia_probability(test_logits, temperature).numpy().astype(np.float64)
        m = binary_metrics(test.labels.numpy(), test_p, threshold)
        print(
            f"| {' + '.join(combo)} | {temperature:.3f} | {threshold:.4f} | {roc_auc(val_y.numpy(), val_p):.4f} "
            f"| {m['roc_auc']:.4f} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | {m['ece']:.3f} |"
        )


if __name__ == "__main__":
    main()
