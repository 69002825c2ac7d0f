"""Measure candidate input-guard scores with an exported model; the evidence behind the guard's design.

``python -m benchmarks.guard_measure --weights weights --data ../shared/data/chest_xray --ood runs/ood``

Statistics are fitted on the training images minus the validation patients (the same
patient-grouped split, fraction and seed as the model's training run, read from its
``model.json``), each candidate's threshold is the smallest refusing at most ``--max-false``
of the validation images, and the refusal rates are then reported on the validation split,
the test folder(s) and every category of the OOD set (``benchmarks/ood_set.py``). Nothing is
fitted on test or OOD images. Prints one markdown table; ``--json`` keeps the numbers.

The shipped guard is ``maha_block_means_stds`` plus the fine-detail floor (``+detail_floor``: the
floor refuses at most ``MAX_LOW_DETAIL`` of the training images, as ``fit_guard`` places it). A
row counts an image as refused when its score is above the candidate's threshold (or its detail
below the floor); images the decoder refuses first (``unsuitable_shape``, say) are counted apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from app.core.artifacts import LoadedModel, load_model
from app.core.input_guard import (
    MAX_LOW_DETAIL,
    detail,
    fit_detail_floor,
    fit_stats,
    fit_threshold,
    guard_scores,
)
from app.core.preprocessing import preprocess_file
from training.data import discover, load_images
from training.split import grouped_stratified_split, recorded_split

Features = dict[str, torch.Tensor]


def _pooled(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """Channel means over a ``grid`` x ``grid`` partition of the maps, flattened."""
    return torch.nn.functional.adaptive_avg_pool2d(maps.float(), grid).flatten(1)


def extract(loaded: LoadedModel, pixels: torch.Tensor, batch_size: int = 256) -> Features:
    """Per-block pooled features, logits, pixel thumbnails, contrast and detail for uint8 images, one pass each."""
    network = loaded.network.eval()
    out: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for batch in torch.split(pixels, batch_size):
            x = network.normalize(batch)
            block = 0
            found: dict[str, torch.Tensor] = {}
            for layer in network.features:
                x = layer(x)
                if isinstance(layer, torch.nn.MaxPool2d):
                    block += 1
                    found[f"mean{block}"] = x.float().mean((2, 3))
                    found[f"std{block}"] = (
                        x.float().std((2, 3)) if x.shape[2] * x.shape[3] > 1 else x.float()[:, :, 0, 0] * 0
                    )
            found["g1"] = _pooled(x, 1)
            found["g2"] = _pooled(x, 2)
            found["logits"] = network.head(x).float()
            found["contrast"] = batch.float().flatten(1).std(1)
            found["detail"] = detail(batch)
            found["thumb16"] = torch.nn.functional.adaptive_avg_pool2d(batch.float(), 16).flatten(1)
            found["thumb8"] = torch.nn.functional.adaptive_avg_pool2d(batch.float(), 8).flatten(1)
            for key, value in found.items():
                out.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in out.items()}


def folder_inputs(root: Path, input_size: int) -> tuple[torch.Tensor, list[str]]:
    """(pixels, refused) for every image file under ``root``, decoded as the service does; ``refused``
    names the files the decoder refused (as the service would, before the guard sees them)."""
    pixels, failed = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg")):
        prepared = preprocess_file(path, input_size)
        if prepared.pixels is None:
            failed.append(f"{path.name}: {prepared.error}")
            continue
        pixels.append(prepared.pixels)
    stacked = torch.stack(pixels) if pixels else torch.zeros((0, 1, input_size, input_size), dtype=torch.uint8)
    return stacked, failed


class Candidate:
    """A score (higher = less like training) fitted on training features, and an optional detail floor."""

    def __init__(self, name: str, score: Callable[[Features], torch.Tensor], floor: float | None = None) -> None:
        self.name = name
        self.score = score
        self.floor = floor

    def refused(self, features: Features, threshold: float) -> torch.Tensor:
        out = self.score(features) > threshold
        return out if self.floor is None else out | (features["detail"] < self.floor)


def _maha(train: Features, keys: tuple[str, ...]) -> Callable[[Features], torch.Tensor]:
    """Mahalanobis score on the concatenation of ``keys``."""
    stats, _ = fit_stats(torch.cat([train[k] for k in keys], dim=1))
    return lambda f: guard_scores(torch.cat([f[k] for k in keys], dim=1), stats)


def _max_of(parts: list[Callable[[Features], torch.Tensor]], val: Features) -> Callable[[Features], torch.Tensor]:
    """Largest of several scores, each divided by its validation median so they share a scale."""
    medians = [float(part(val).median()) for part in parts]
    return lambda f: torch.stack([part(f) / m for part, m in zip(parts, medians, strict=True)]).max(0).values


def candidates(train: Features, val: Features) -> list[Candidate]:
    means = tuple(f"mean{i}" for i in range(1, 6))
    stds = tuple(f"std{i}" for i in range(1, 6))  # as default_blocks: block 5 is 4 x 4 at 128 px
    g1, thumb = _maha(train, ("g1",)), _maha(train, ("thumb16",))
    blocks = [_maha(train, (f"mean{i}", f"std{i}") if i < 5 else (f"mean{i}",)) for i in range(1, 6)]
    all_means = _maha(train, means)
    means_stds = _maha(train, means + stds)
    floor = fit_detail_floor(train["detail"], MAX_LOW_DETAIL)
    return [
        Candidate("maha_final_g1", g1),
        Candidate("maha_final_g2", _maha(train, ("g2",))),
        Candidate("energy", lambda f: -torch.logsumexp(f["logits"], dim=1)),
        Candidate("maha_thumb16", thumb),
        Candidate("maha_thumb8", _maha(train, ("thumb8",))),
        Candidate("maha_block_means", all_means),
        Candidate("maha_block_means_stds", means_stds),
        Candidate("maha_block_means_stds+detail_floor", means_stds, floor),
        Candidate("max_per_block", _max_of(blocks, val)),
        Candidate("max(block_means_stds,thumb16)", _max_of([means_stds, thumb], val)),
        Candidate("max(per_block,thumb16)", _max_of([*blocks, thumb], val)),
    ]


def rate(refused: torch.Tensor) -> float:
    return float(refused.float().mean()) if refused.numel() else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard_measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--data", type=Path, required=True, help="chest_xray root with train/ (split as in training)")
    parser.add_argument("--ood", type=Path, required=True, help="OOD set from benchmarks.ood_set")
    parser.add_argument("--test", type=Path, nargs="*", default=[], help="other chest X-ray folders to report")
    parser.add_argument("--max-false", type=float, default=0.01, help="validation false-refusal target")
    parser.add_argument("--cache", type=Path, default=Path("runs/guard-cache"), help="decoded-image cache")
    parser.add_argument("--json", type=Path, default=None, help="write all rates here")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)

    loaded = load_model(args.weights)
    size = loaded.metadata.spec.input_size
    run_args = loaded.metadata.provenance.get("args", {})
    fraction, seed = recorded_split({"val_fraction": 0.15, "seed": 0} | run_args)
    decoded = load_images(discover(args.data)["train"], size, workers=2, cache_dir=args.cache).images
    train_index, val_index = grouped_stratified_split(decoded.paths, decoded.labels.numpy(), fraction, seed)
    print(f"train {len(train_index)} / val {len(val_index)} images (fraction {fraction}, seed {seed})", file=sys.stderr)
    cached = args.cache / f"features-{loaded.metadata.sha256[:16]}.safetensors"
    if cached.is_file():
        feats = load_file(str(cached))
    else:
        feats = extract(loaded, decoded.pixels)
        save_file({k: v.contiguous() for k, v in feats.items()}, str(cached))
    train = {k: v[train_index] for k, v in feats.items()}
    val = {k: v[val_index] for k, v in feats.items()}
    cands = candidates(train, val)

    sets: dict[str, Features] = {}
    decoder_refused: dict[str, int] = {}
    folders = {f"cxr:{f.name}": f for f in args.test}
    folders.update({p.name: p for p in sorted(args.ood.iterdir()) if p.is_dir()})
    for name, folder in folders.items():
        cache = args.cache / f"set-{loaded.metadata.sha256[:16]}-{name.replace(':', '_')}.safetensors"
        if cache.is_file():
            tensors = load_file(str(cache))
        else:
            pixels, refused = folder_inputs(folder, size)
            tensors = {**extract(loaded, pixels), "decoder_refused": torch.tensor([len(refused)])}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(cache))
        decoder_refused[name] = int(tensors.pop("decoder_refused"))
        if decoder_refused[name]:
            print(f"{name}: {decoder_refused[name]} refused by the decoder", file=sys.stderr)
        sets[name] = tensors

    results: dict[str, dict[str, float]] = {}
    ood = [name for name in sets if not name.startswith(("cxr:", "control_"))]
    for cand in cands:
        threshold = fit_threshold(cand.score(val), args.max_false)
        row = {"threshold": threshold, "val": rate(cand.refused(val, threshold))}
        for name, features in sets.items():
            row[name] = rate(cand.refused(features, threshold))
        row["ood_all"] = rate(torch.cat([cand.refused(sets[name], threshold) for name in ood]))
        results[cand.name] = row
    # The cheap checks alone, at thresholds set from the training images (not OOD): how much they add.
    contrast_floor = float(train["contrast"].min()) / 2
    results["contrast_only"] = {"threshold": contrast_floor, "val": rate(val["contrast"] < contrast_floor)}
    for name, features in sets.items():
        results["contrast_only"][name] = rate(features["contrast"] < contrast_floor)
    results["contrast_only"]["ood_all"] = rate(torch.cat([sets[name]["contrast"] < contrast_floor for name in ood]))

    names = ["val", *sets, "ood_all"]
    print("| set | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    print("| threshold | " + " | ".join(f"{r['threshold']:.4g}" for r in results.values()) + " |")
    for name in names:
        cells = [f"{100 * r[name]:.1f}%" if name in r else "" for r in results.values()]
        n = len(val_index) if name == "val" else (len(sets[name]["contrast"]) if name in sets else "")
        note = f", {decoder_refused[name]} refused by the decoder" if decoder_refused.get(name) else ""
        print(f"| {name} ({n}{note}) | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
