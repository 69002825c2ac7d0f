"""Would an ensemble of exported models rank and calibrate better on the test folder than its members?

The members must share one validation split (same ``val_fraction`` and split seed in their provenance;
``--split-seed`` lets seed replicates do so). Each member scores the validation and test images at its
own input size; the ensemble averages the members' raw logits. Every row (each member alone, then the
ensemble) gets its temperature and threshold fitted on the validation split exactly as training does,
and is then reported on the test folder with bootstrap intervals. Nothing is fitted on the test folder;
the ranking column's threshold comes from it, to show the ranking apart from the threshold's placement,
and is a diagnostic only. The last column is the test specificity at both ends of the 95% interval of
the validation threshold over bootstrap resamples of validation: what the threshold's own uncertainty
does on test. With more than one member it then compares each row with the first member on the same
test resamples (paired bootstrap: the difference in test AUC and in the ranking column, with 95%
intervals), so a gain can be told from the luck of one test sample, does the same for the validation
AUC over validation resamples, so a loss there can be told from the luck of one split, and names the normal test films
that every member calls pneumonia at its own validation threshold: errors no averaging of these
members can remove.

``--weight-mix 0.25,0.5`` adds a row for each point between the first member and the second, which
must have been fine-tuned from it (``training.weight_mix``: WiSE-FT), fitted and paired like the rest.
With ``--soup`` the far end is the mean of every member after the first (a model soup), each of which
must have been fine-tuned from the first; ``--weight-mix 1`` is then the soup itself.

    python -m benchmarks.ensemble_check runs/a runs/b runs/c --data ../shared/data/chest_xray
    python -m benchmarks.ensemble_check weights runs/tuned --weight-mix 0.25,0.5,0.75
    python -m benchmarks.ensemble_check weights runs/tuned runs/tuned-seed1 --soup --weight-mix 0.5,1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from app.core.artifacts import LoadedModel, load_model
from app.core.decision import is_pneumonia, pneumonia_probability
from benchmarks import eval_sets
from training.calibration import operating_point, select_threshold, threshold_interval
from training.loops import predict_logits
from training.metrics import binary_metrics, bootstrap_ci, paired_difference, roc_auc, threshold_metrics
from training.mix_choice import parse_fractions
from training.split import recorded_split
from training.weight_mix import LineageError, mix, soup


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", type=Path, nargs="+", help="exported model directories or files")
    parser.add_argument("--data", type=Path, default=eval_sets.DEFAULT_DATA)
    parser.add_argument("--target-sensitivity", type=float, default=0.95)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each set (smoke runs)")
    parser.add_argument(
        "--weight-mix",
        type=parse_fractions,
        default=[],
        metavar="A,B,...",
        help="rows for the weights A (B, ...) of the way from the first member to the second, its fine-tune",
    )
    parser.add_argument(
        "--soup",
        action="store_true",
        help="--weight-mix's far end is the mean of every member after the first (each fine-tuned from it)",
    )
    args = parser.parse_args(argv)
    if args.weight_mix and len(args.members) < 2:
        parser.error("--weight-mix needs the parent model first and its fine-tune second")
    if args.soup and not args.weight_mix:
        parser.error("--soup makes the far end of --weight-mix: give --weight-mix (1 is the soup itself)")

    logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    members: list[tuple[LoadedModel, list[eval_sets.EvalSet]]] = []
    splits, labels, test_paths = set(), None, []
    for path in args.members:
        loaded = load_model(path)
        splits.add(recorded_split(loaded.metadata.provenance.get("args", {})))
        val, test = eval_sets.evaluation_sets(args.data, loaded.metadata, limit=args.limit)
        same = labels is None or (np.array_equal(labels[0], val.labels) and np.array_equal(labels[1], test.labels))
        if not same:
            raise SystemExit(f"{path}: its validation or test images differ from the first member's")
        labels, test_paths = (val.labels, test.labels), test.paths
        if args.weight_mix and (args.soup or len(members) < 2):  # the parent and its fine-tune(s); others go
            members.append((loaded, [val, test]))
        logits[f"{loaded.metadata.version} ({path})"] = scores(loaded.network, [val, test])
    mixed = weight_mix_rows(members, args.weight_mix)
    if len(splits) != 1 or labels is None:
        raise SystemExit(f"the members were validated on different splits (fraction, seed): {sorted(splits)}")
    val_y, test_y = labels
    print(f"validation split (fraction, seed) {splits.pop()}: {len(val_y)} images; test: {len(test_y)} images")
    columns = ["model", "temperature", "threshold", "val AUC", "test AUC (95% CI)", "test sens", "test spec (95% CI)"]
    columns += ["test ECE", "test Brier", "test spec at test sens 0.95 (diagnostic)"]
    columns += ["test spec over the threshold's val-bootstrap 95% interval"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    rows = {**logits, **mixed}
    if len(logits) > 1:
        rows[f"mean of the {len(logits)} members' logits"] = (
            torch.stack([v for v, _ in logits.values()]).mean(0),
            torch.stack([t for _, t in logits.values()]).mean(0),
        )
    calls: dict[str, np.ndarray] = {}  # each member's test predictions at its own validation threshold
    test_probabilities: dict[str, np.ndarray] = {}
    val_probabilities: dict[str, np.ndarray] = {}
    for name, (val_logits, test_logits) in rows.items():
        temperature, threshold, val_p = operating_point(
            val_logits, torch.from_numpy(val_y), "sensitivity", args.target_sensitivity
        )
        test_p = pneumonia_probability(test_logits, temperature).numpy().astype(np.float64)
        v, t = binary_metrics(val_y, val_p, threshold), binary_metrics(test_y, test_p, threshold)
        if name in logits:
            calls[name] = is_pneumonia(test_p, threshold)
        ci = bootstrap_ci(test_y, test_p, threshold, n_boot=args.bootstrap) if args.bootstrap else {}
        auc_ci, spec_ci = ci.get("roc_auc", (np.nan, np.nan)), ci.get("specificity", (np.nan, np.nan))
        # The ranking alone, free of where validation put the threshold: a threshold picked on the test
        # folder itself, so only a diagnostic, never an operating point.
        test_probabilities[name], val_probabilities[name] = test_p, val_p
        # Where another draw of validation images could have put the threshold, and what that does on test.
        spread = "-"
        if args.bootstrap:
            low, high = threshold_interval(
                val_y, val_p, "sensitivity", args.target_sensitivity, resamples=args.bootstrap
            )
            spread = "-".join(f"{binary_metrics(test_y, test_p, cut)['specificity']:.3f}" for cut in (low, high))
        print(
            f"| {name} | {temperature:.3f} | {threshold:.4f} | {v['roc_auc']:.4f} "
            f"| {t['roc_auc']:.3f} ({auc_ci[0]:.3f}-{auc_ci[1]:.3f}) | {t['sensitivity']:.3f} "
            f"| {t['specificity']:.3f} ({spec_ci[0]:.3f}-{spec_ci[1]:.3f}) | {t['ece']:.3f} | {t['brier']:.3f} "
            f"| {ranking_specificity(test_y, test_p):.3f} | {spread} |"
        )
    if len(rows) > 1 and args.bootstrap:
        print_paired_gains(test_y, test_probabilities, args.bootstrap, "test", TEST_MEASURES)
        # The validation split is nearly saturated: a loss of 0.001 there is one or two misordered pairs
        # per thousand, and only its own paired interval says whether a recipe really loses it.
        print_paired_gains(val_y, val_probabilities, args.bootstrap, "validation", VAL_MEASURES, digits=4)
    if len(calls) > 1:
        print_shared_false_positives(calls, test_y, test_paths)


def scores(network: torch.nn.Module, sets: list[eval_sets.EvalSet]) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation and test logits on the CPU."""
    val, test = (predict_logits(network, s.pixels, batch_size=64, device=torch.device("cpu")).float() for s in sets)
    return val, test


def weight_mix_rows(
    members: list[tuple[LoadedModel, list[eval_sets.EvalSet]]], fractions: list[float]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Logits of the networks ``fractions`` of the way from the first member to the second, its fine-tune, or
    to the soup of all the members after the first."""
    if not fractions:
        return {}
    (parent, sets), *tuned = members
    try:
        far = soup(parent, [model for model, _ in tuned])
    except LineageError as exc:
        raise SystemExit(f"--weight-mix: {exc}") from exc
    end = "the second member" if len(tuned) == 1 else f"the soup of members 2-{len(members)}"
    return {
        f"weights {alpha:g} of the way to {end}": scores(mix(parent.network, far, alpha), sets) for alpha in fractions
    }


def ranking_specificity(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Specificity at the threshold picked on these very images for sensitivity 0.95: the ranking alone.

    A diagnostic, never an operating point: the threshold comes from the images it is scored on.
    """
    threshold = select_threshold(labels, probabilities, "sensitivity", 0.95)
    return threshold_metrics(labels, probabilities, threshold)["specificity"]


Measure = Callable[[np.ndarray, np.ndarray], float]
TEST_MEASURES: dict[str, Measure] = {"test AUC": roc_auc, "test spec at test sens 0.95": ranking_specificity}
VAL_MEASURES: dict[str, Measure] = {"val AUC": roc_auc}


def paired_gains(
    labels: np.ndarray, first: np.ndarray, other: np.ndarray, resamples: int, measures: dict[str, Measure]
) -> dict[str, tuple[float, float, float]]:
    """``other`` minus ``first`` on these images, and its 95% interval over the same resamples for both."""
    return {
        name: paired_difference(labels, first, other, measure, resamples=resamples)
        for name, measure in measures.items()
    }


def print_paired_gains(
    labels: np.ndarray,
    probabilities: dict[str, np.ndarray],
    resamples: int,
    images: str,
    measures: dict[str, Measure],
    digits: int = 3,
) -> None:
    """Each row minus the first member, paired over resamples of ``images``: more than one sample's luck?"""
    (first_name, first), *others = probabilities.items()
    print(f"\npaired with {first_name} over {resamples} {images} resamples (row minus it, 95% interval):")
    for name, values in others:
        gains = paired_gains(labels, first, values, resamples, measures)
        shown = (f"{m} {d:+.{digits}f} ({lo:+.{digits}f} to {hi:+.{digits}f})" for m, (d, lo, hi) in gains.items())
        print(f"  {name}: " + "; ".join(shown))


def print_shared_false_positives(calls: dict[str, np.ndarray], labels: np.ndarray, paths: list[Path]) -> None:
    """The normal films every member calls pneumonia: the floor under any ensemble of them."""
    normal = labels == 0
    per_member = ", ".join(str(int((c & normal).sum())) for c in calls.values())
    shared = normal & np.logical_and.reduce(list(calls.values()))
    print(
        f"\nnormal test films called pneumonia at each member's own threshold: {per_member} of {int(normal.sum())}; "
        f"by every member: {int(shared.sum())}"
    )
    for index in np.flatnonzero(shared):
        print(f"  {paths[index].name}")


if __name__ == "__main__":
    main()
