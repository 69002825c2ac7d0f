"""Fit an input guard for an exported model and re-export it with the guard, network weights unchanged.

``python -m benchmarks.attach_guard --weights weights --data ../shared/data/chest_xray --out runs/guarded
--version 1.1.0-cpu64-guard``

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
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from app.core.artifacts import GOLDEN_KEY, export_model, load_model, resolve_paths
from app.core.input_guard import fit_guard
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


if __name__ == "__main__":
    raise SystemExit(main())
