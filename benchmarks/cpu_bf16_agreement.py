"""How far CPU bf16 inference (CXR_PRECISION=bf16) moves the shipped model's answers from fp32.

Scores the validation images listed in a run's ``val_report/predictions.csv`` with both
engines and prints the largest probability difference, label flips at the model's threshold,
and ROC AUC for each, so the speed option is chosen knowing what it costs.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from app.core.decision import is_pneumonia
from app.core.engine import load_engine
from app.core.preprocessing import preprocess
from training.metrics import roc_auc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--predictions", type=Path, default=Path("runs/cpu64/val_report/predictions.csv"))
    args = parser.parse_args()
    rows = list(csv.DictReader(args.predictions.open()))
    exact = load_engine(args.weights, device="cpu", precision="fp32")
    fast = load_engine(args.weights, device="cpu", precision="bf16")
    labels = np.array([row["label"] == "PNEUMONIA" for row in rows], dtype=np.int64)
    pixels = torch.stack([preprocess(Path(row["path"]).read_bytes(), exact.input_size) for row in rows])
    p32 = np.array([r.probability for i in range(0, len(rows), 64) for r in exact.infer(pixels[i : i + 64])])
    p16 = np.array([r.probability for i in range(0, len(rows), 64) for r in fast.infer(pixels[i : i + 64])])
    threshold = exact.metadata.threshold
    flips = int((is_pneumonia(p32, threshold) != is_pneumonia(p16, threshold)).sum())
    print(
        f"n={len(rows)} max|p_bf16 - p_fp32|={np.abs(p16 - p32).max():.4f} "
        f"mean={np.abs(p16 - p32).mean():.5f} label flips at {threshold:.4f}: {flips}"
    )
    print(f"ROC AUC fp32={roc_auc(labels, p32):.5f} bf16={roc_auc(labels, p16):.5f}")


if __name__ == "__main__":
    main()
