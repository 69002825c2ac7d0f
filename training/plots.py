"""Report figures (matplotlib, headless Agg backend): ROC, PR, confusion matrix, reliability."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from app.core.network import CLASS_NAMES
from training.metrics import pr_curve, reliability_bins, roc_curve


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_roc(labels: np.ndarray, probs: np.ndarray, auc: float, threshold: float, path: Path) -> None:
    fpr, tpr, thresholds = roc_curve(labels, probs)
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"ROC (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    point = int(np.flatnonzero(thresholds >= threshold)[-1])
    ax.scatter([fpr[point]], [tpr[point]], color="red", zorder=3, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title="ROC")
    ax.legend(loc="lower right")
    _save(figure, path)


def plot_pr(labels: np.ndarray, probs: np.ndarray, ap: float, path: Path) -> None:
    precision, recall, _ = pr_curve(labels, probs)
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.step(recall, precision, where="post", label=f"PR (AP {ap:.3f})")
    ax.axhline(float(np.mean(labels)), linestyle=":", color="grey", label="prevalence")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-recall")
    ax.legend(loc="lower left")
    _save(figure, path)


def plot_confusion(tp: int, fp: int, tn: int, fn: int, path: Path) -> None:
    matrix = np.array([[tn, fp], [fn, tp]])
    figure, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, str(value), ha="center", va="center", color="black", fontsize=12)
    ax.set_xticks([0, 1], labels=list(CLASS_NAMES))
    ax.set_yticks([0, 1], labels=list(CLASS_NAMES))
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    _save(figure, path)


def plot_reliability(labels: np.ndarray, probs: np.ndarray, ece: float, path: Path) -> None:
    confidence, observed, counts = reliability_bins(labels, probs)
    filled = counts > 0
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    ax.plot(confidence[filled], observed[filled], marker="o", label=f"model (ECE {ece:.3f})")
    ax.set(
        xlabel="mean P(pneumonia) in bin",
        ylabel="observed pneumonia rate",
        xlim=(0, 1),
        ylim=(0, 1),
        title="Reliability",
    )
    ax.legend(loc="upper left")
    _save(figure, path)
