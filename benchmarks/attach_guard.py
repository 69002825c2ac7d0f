"""Fit an input guard for an exported model and re-export it with the guard, network weights unchanged.

``python -m benchmarks.attach_guard --weights weights --data ../shared/data/chest_xray --out runs/guarded
--version 1.1.0-cpu64-guard``

``--detail-floor-only`` keeps the model's guard as it is and adds the fine-detail floor
(``input_guard.fit_detail_floor``) that later exports fit themselves: only ``model.json`` changes,
the weights file is copied byte for byte (its sha256, golden logits and ``model.cpu.json`` hold).

The statistics come from the model's own training images and the threshold from its
validation images: the same patient-grouped split (fraction and seed read from the model's
``model.json`` provenance) that its training run used, recomputed from ``--data``. Test images
are never read. The re-exported weights are bit-identical (``--check`` compares them) and the
golden logits equal; only the guard's tensors, its ``model.json`` section and the version change.
Training's export will fit the guard itself (``app.core.input_guard.fit_guard``) once the
training refactor lands; this tool is how the shipped model got its guard.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from app.core.artifacts import (
    GOLDEN_KEY,
    LoadedModel,
    compute_guard_scores,
    export_model,
    load_model,
    resolve_paths,
)
from app.core.fastpath_record import record_path as fastpath_record_path
from app.core.input_guard import MAX_LOW_DETAIL, detail, fit_guard, with_detail_floor
from training.data import discover, load_images
from training.split import grouped_stratified_split, recorded_split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attach_guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="exported model directory")
    parser.add_argument("--data", type=Path, required=True, help="the chest_xray root the model was trained on")
    parser.add_argument("--out", type=Path, required=True, help="directory for the re-exported model")
    parser.add_argument("--version", required=True, help="version of the re-exported model")
    parser.add_argument("--max-false-refusal", type=float, default=0.01, help="validation refusal target")
    parser.add_argument("--cache", type=Path, default=None, help="decoded-image cache directory")
    parser.add_argument(
        "--detail-floor-only", action="store_true", help="keep the model's guard; add its fine-detail floor"
    )
    args = parser.parse_args(argv)

    torch.set_flush_denormal(True)
    loaded = load_model(args.weights)
    meta = loaded.metadata
    size = meta.spec.input_size
    run = meta.provenance.get("args", {})
    fraction, seed = recorded_split({"val_fraction": 0.15, "seed": 0} | run)
    images = load_images(discover(args.data)["train"], size, workers=2, cache_dir=args.cache).images
    train_index, val_index = grouped_stratified_split(images.paths, images.labels.numpy(), fraction, seed)
    expected = (meta.provenance.get("train_images"), meta.provenance.get("val_images"))
    if expected != (len(train_index), len(val_index)):
        print(f"error: split gives {len(train_index)}/{len(val_index)} images, the run had {expected}", file=sys.stderr)
        return 2
    source = f"{args.data.name}/train minus validation patients (fraction {fraction}, seed {seed})"
    if args.detail_floor_only:
        return add_detail_floor(args, loaded, images.pixels[train_index], images.pixels[val_index], source)
    spec, stats = fit_guard(
        loaded.network,
        images.pixels[train_index],
        images.pixels[val_index],
        input_size=size,
        max_false_refusal=args.max_false_refusal,
        source=source,
    )
    assert loaded.golden_inputs is not None
    export_model(
        loaded.network,
        args.out,
        version=args.version,
        golden_inputs=loaded.golden_inputs,
        dtype=meta.dtype,
        threshold=meta.threshold,
        threshold_method=meta.threshold_method,
        temperature=meta.temperature,
        metrics=meta.metrics,
        provenance={**meta.provenance, "guard_added_to": meta.sha256, "guard_added_by": "benchmarks.attach_guard"},
        guard=(spec, stats),
    )
    before = load_file(str(resolve_paths(args.weights)[0]))
    after = load_file(str(resolve_paths(args.out)[0]))
    changed = [key for key in before if key != GOLDEN_KEY and not torch.equal(before[key], after[key])]
    if changed:
        print(f"error: re-export changed {len(changed)} network tensors, e.g. {changed[0]}", file=sys.stderr)
        return 1
    reloaded = load_model(args.out)  # verifies sha256, logits and guard scores
    print(json.dumps({"version": reloaded.metadata.version, **spec.model_dump(exclude={"golden_scores"})}, indent=1))
    return 0


def add_detail_floor(
    args: argparse.Namespace, loaded: LoadedModel, train: torch.Tensor, val: torch.Tensor, source: str
) -> int:
    """Write ``args.out`` with the weights copied and ``model.json``'s guard given a fine-detail floor."""
    meta, spec = loaded.metadata, loaded.metadata.guard
    if spec is None or loaded.golden_inputs is None:
        print(
            "error: the model has no input guard (or no golden inputs): fit one without --detail-floor-only",
            file=sys.stderr,
        )
        return 2
    val_scores = compute_guard_scores(loaded.network, val, spec, loaded.guard)  # type: ignore[arg-type]
    guard = with_detail_floor(spec, train, val, val_scores)
    floor = guard.detail_floor
    if floor is None:
        print(f"error: {len(train)} training images are too few for a floor at {MAX_LOW_DETAIL:g}", file=sys.stderr)
        return 2
    calibration = {**guard.calibration, "detail_source": source}
    guard = guard.model_copy(
        update={"golden_details": detail(loaded.golden_inputs).tolist(), "calibration": calibration}
    )
    provenance = {
        **meta.provenance,
        "detail_floor_added_to": meta.version,
        "detail_floor_added_by": "benchmarks.attach_guard --detail-floor-only",
    }
    updated = meta.model_copy(update={"version": args.version, "guard": guard, "provenance": provenance})
    weights, metadata = resolve_paths(args.weights)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, args.out / weights.name)
    record = fastpath_record_path(args.weights)
    if record.is_file():
        shutil.copyfile(record, args.out / record.name)
    (args.out / metadata.name).write_text(json.dumps(updated.model_dump(mode="json"), indent=2) + "\n")
    reloaded = load_model(args.out)  # verifies the sha256, the golden logits, scores and details
    print(json.dumps({"version": reloaded.metadata.version, "detail_floor": floor, **calibration}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
