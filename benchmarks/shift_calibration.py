"""Would a temperature fitted on perturbed validation images calibrate better under the test split's shift?

Temperature scaling fitted on clean, in-distribution validation images stays over-confident under a
dataset shift (Ovadia et al., NeurIPS 2019); fitting it on validation images perturbed with a range of
strengths is the remedy of Tomani et al. (CVPR 2021). Here the perturbation is the training
augmentation itself (``training.augment.augment_batch``: rotation, shift, scale, brightness, contrast)
at a given strength, so no new family of distortions is invented. For each strength the temperature is
fitted on the clean validation logits plus ``--draws`` perturbed copies; the threshold is re-selected
on the clean validation images with that temperature (the same logit cut, so the same decisions); the
test folder is only reported on. The last two rows are diagnostics, never candidates: the temperatures
that would minimise the test NLL and the test ECE (on a grid), i.e. the best any temperature could do.

    python -m benchmarks.shift_calibration --weights weights --data ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from app.core.artifacts import load_model
from app.core.decision import pneumonia_probability
from benchmarks import eval_sets
from training.augment import Augmentation, augment_batch
from training.calibration import fit_temperature, parse_rule, select_threshold
from training.loops import predict_logits
from training.metrics import binary_metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--data", type=Path, default=eval_sets.DEFAULT_DATA)
    parser.add_argument("--strengths", type=float, nargs="*", default=[1.0, 2.0, 3.0])
    parser.add_argument("--draws", type=int, default=2, help="perturbed copies of the validation set per strength")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each set (smoke runs)")
    args = parser.parse_args(argv)

    loaded = load_model(args.weights)
    meta = loaded.metadata
    val, test = eval_sets.evaluation_sets(args.data, meta, limit=args.limit)
    try:
        method, target = parse_rule(meta.threshold_method)
    except ValueError as error:
        raise SystemExit(f"{error} in {args.weights}") from None
    cpu = torch.device("cpu")

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        return predict_logits(loaded.network, pixels, batch_size=64, device=cpu).float()

    val_y, test_y = torch.from_numpy(val.labels), test.labels
    clean_val, clean_test = logits(val.pixels), logits(test.pixels)
    print(f"{meta.version}: {val.description}; {test.description}")
    print(
        "| temperature fitted on | temperature | threshold | val ECE | test ECE | test Brier | test sens | test spec |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def row(label: str, temperature: float) -> None:
        val_p = pneumonia_probability(clean_val, temperature).numpy().astype(np.float64)
        test_p = pneumonia_probability(clean_test, temperature).numpy().astype(np.float64)
        threshold = select_threshold(val.labels, val_p, method, target)
        v, t = binary_metrics(val.labels, val_p, threshold), binary_metrics(test_y, test_p, threshold)
        print(
            f"| {label} | {temperature:.3f} | {threshold:.4f} | {v['ece']:.3f} | {t['ece']:.3f} | {t['brier']:.3f} "
            f"| {t['sensitivity']:.3f} | {t['specificity']:.3f} |"
        )

    row("clean validation (as shipped)", fit_temperature(clean_val, val_y))
    for strength in args.strengths:
        generator, options = torch.Generator().manual_seed(0), Augmentation(strength=strength)
        perturbed = [logits(augment_batch(val.pixels, generator, options)) for _ in range(args.draws)]
        temperature = fit_temperature(torch.cat([clean_val, *perturbed]), val_y.repeat(1 + args.draws))
        row(f"clean + {args.draws} x augmented at strength {strength}", temperature)
    row("test NLL (diagnostic only, never a candidate)", fit_temperature(clean_test, torch.from_numpy(test_y)))
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121))
    test_ece = [
        binary_metrics(test_y, pneumonia_probability(clean_test, float(t)).numpy().astype(np.float64), 0.5)["ece"]
        for t in grid
    ]
    row("test ECE, grid 0.25-8 (diagnostic only, never a candidate)", float(grid[int(np.argmin(test_ece))]))


if __name__ == "__main__":
    main()
