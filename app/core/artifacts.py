"""The exported model: ``model.safetensors`` plus ``model.json``, written by training, read by the app.

Loading never unpickles anything: tensors come from safetensors, metadata from JSON validated
by pydantic. The tensor file's sha256 must match the one recorded at export, the tensors must
fit the declared architecture exactly, and the stored golden inputs must reproduce the
exported logits, so a model that loads is the model that training produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from app.core.coded_error import first_validation_error
from app.core.input_guard import GuardSpec, GuardStats, detail, features_and_maps, guard_scores
from app.core.network import ModelSpec, PneumoniaNet, build_model
from app.durable_files import fsync_dir, replace_durably

FORMAT_VERSION = 1
WEIGHTS_FILENAME = "model.safetensors"
METADATA_FILENAME = "model.json"
GOLDEN_KEY = "__golden__.inputs"
StorageDtype = Literal["float32", "float16"]
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model files are missing, tampered with, or do not fit the architecture."""


class Golden(BaseModel):
    """Reference logits for the inputs stored under ``GOLDEN_KEY`` in the tensor file."""

    model_config = ConfigDict(allow_inf_nan=False)  # an infinite tolerance passes every network

    logits: list[list[float]]
    atol: float = Field(1e-3, gt=0, le=1.0)  # logits are tens at most: a tolerance of 1e30 passes any network


class ModelMetadata(BaseModel):
    """Contents of ``model.json``: the model card that travels with the weights.

    Its numbers must be finite and sane: an edited temperature of ``Infinity`` (or 1e300) turned every
    answer into 0.5 or a flip. A format this code does not know is refused, not read as its own.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    format_version: Literal[1] = FORMAT_VERSION
    name: str = "cxr-pneumonia-vgg16"
    version: str
    spec: ModelSpec
    dtype: StorageDtype = "float32"
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Decision threshold on P(pneumonia).")
    threshold_method: str = "default"
    temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="Calibration temperature for the logits (fitted ones are 0.5-5)."
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    golden: Golden | None = None
    guard: GuardSpec | None = Field(None, description="The input guard; its tensors are in the weights file.")
    metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)


@dataclass
class LoadedModel:
    """A verified network in eval mode plus its metadata."""

    network: PneumoniaNet
    metadata: ModelMetadata
    golden_inputs: torch.Tensor | None
    guard: GuardStats | None = None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_paths(path: Path) -> tuple[Path, Path]:
    """Accept the weights directory, the ``.safetensors`` file or the ``.json`` file."""
    if path.is_dir():
        return path / WEIGHTS_FILENAME, path / METADATA_FILENAME
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def compute_logits(network: PneumoniaNet, pixels: torch.Tensor) -> torch.Tensor:
    """Logits in float32 on the CPU, in eval mode, without autograd."""
    network.eval()
    with torch.inference_mode():
        return network(pixels).float().cpu()


def compute_guard_scores(
    network: PneumoniaNet, pixels: torch.Tensor, spec: GuardSpec, stats: GuardStats
) -> torch.Tensor:
    """Input-guard scores in float32 on the CPU, computed exactly as the engine does."""
    device = next(network.parameters()).device
    with torch.inference_mode():
        x = network.normalize(pixels.to(device))
        _, vector = features_and_maps(network.features, x, spec.mean_blocks, spec.std_blocks)
        return guard_scores(vector, stats.to(device)).cpu()


def export_model(
    network: PneumoniaNet,
    out_dir: Path,
    *,
    version: str,
    golden_inputs: torch.Tensor,
    dtype: StorageDtype = "float32",
    threshold: float = 0.5,
    threshold_method: str = "default",
    temperature: float = 1.0,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    guard: tuple[GuardSpec, GuardStats] | None = None,
) -> ModelMetadata:
    """Write both files; golden logits (and guard scores) are computed from the weights as stored (after rounding).

    The pair is valid only together, and two files cannot be replaced at once. So both are
    written and synced in a staging folder first; then the old ``model.json`` goes, and the new
    weights and ``model.json`` are renamed in, in that order. A kill at any point leaves the old
    pair, the new pair, or weights without ``model.json`` (refused on load as an interrupted
    export), never new weights under the old sha256.
    """
    state = {key: value.detach().to("cpu", _DTYPES[dtype]).contiguous() for key, value in network.state_dict().items()}
    reference = build_model(network.spec)
    reference.load_state_dict({key: value.float() for key, value in state.items()})
    golden_pixels = golden_inputs.to(torch.uint8).cpu().contiguous()
    logits = compute_logits(reference, golden_pixels)
    tensors = {**state, GOLDEN_KEY: golden_pixels}
    guard_spec = None
    if guard is not None:
        spec, stats = guard
        if stats.mean.numel() != spec.dim or tuple(stats.whitener.shape) != (spec.dim, spec.dim):
            raise ValueError(f"guard statistics do not match the declared dimension {spec.dim}")
        scores = compute_guard_scores(reference, golden_pixels, spec, stats)
        details = detail(golden_pixels).tolist() if spec.detail_floor is not None else []
        guard_spec = spec.model_copy(update={"golden_scores": scores.tolist(), "golden_details": details})
        tensors.update(stats.tensors())
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path, metadata_path = out_dir / WEIGHTS_FILENAME, out_dir / METADATA_FILENAME
    with _staging(out_dir) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILENAME), metadata={"format": "pt"})
        (staging / WEIGHTS_FILENAME).chmod(0o644)  # safetensors writes 0600; a non-root container user must read it
        metadata = ModelMetadata(
            version=version,
            spec=network.spec,
            dtype=dtype,
            threshold=threshold,
            threshold_method=threshold_method,
            temperature=temperature,
            sha256=file_sha256(staging / WEIGHTS_FILENAME),
            golden=Golden(logits=logits.tolist()),
            guard=guard_spec,
            metrics=metrics or {},
            provenance=provenance or {},
        )
        (staging / METADATA_FILENAME).write_text(json.dumps(metadata.model_dump(mode="json"), indent=2) + "\n")
        metadata_path.unlink(missing_ok=True)
        fsync_dir(out_dir)
        replace_durably([(staging / WEIGHTS_FILENAME, weights_path), (staging / METADATA_FILENAME, metadata_path)])
    return metadata


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A private folder beside the target for files being written (safetensors' own temporary file lands
    in it too); removed afterwards, and any left by a killed export is removed first."""
    for stale in out_dir.glob(".export-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir / f".export-{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_metadata(path: Path) -> ModelMetadata:
    weights_path, metadata_path = resolve_paths(path)
    if not metadata_path.is_file():
        if weights_path.is_file():  # export_model removes model.json first and writes it last
            raise ModelLoadError(
                f"model metadata not found: {metadata_path}, beside {weights_path.name}: an export was "
                "interrupted (run it again) or the file was not copied"
            )
        raise ModelLoadError(f"model metadata not found: {metadata_path}")
    try:
        return ModelMetadata.model_validate_json(metadata_path.read_bytes())
    except ValidationError as exc:
        where, message, _ = first_validation_error(exc.errors())
        raise ModelLoadError(f"invalid model metadata {metadata_path}: {where}: {message}") from exc


def load_model(path: Path, *, verify_golden: bool = True) -> LoadedModel:
    """Load and verify a model on the CPU in float32; the caller moves it to its device."""
    weights_path, _ = resolve_paths(path)
    metadata = read_metadata(path)
    if not weights_path.is_file():
        raise ModelLoadError(f"model weights not found: {weights_path}")
    actual = file_sha256(weights_path)
    if actual != metadata.sha256:
        raise ModelLoadError(
            f"sha256 mismatch for {weights_path}: file is {actual}, model.json expects {metadata.sha256}"
        )
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {weights_path}: {exc}") from exc
    golden_inputs = tensors.pop(GOLDEN_KEY, None)
    size = metadata.spec.input_size
    if golden_inputs is not None and tuple(golden_inputs.shape[1:]) != (1, size, size):
        # The golden inputs are inside the sha256; spec.input_size is not. An input_size edited from 128 to
        # 224 passed the golden check at 128 and then served every upload at a size the model never saw.
        raise ModelLoadError(
            f"{weights_path}: the golden inputs are {list(golden_inputs.shape)}, but model.json's spec says "
            f"[N, 1, {size}, {size}]: the spec does not belong to these weights"
        )
    guard = _guard_stats(tensors, metadata, weights_path)  # takes the guard's (float32) tensors out
    stored = {value.dtype for key, value in tensors.items() if key != GOLDEN_KEY and value.is_floating_point()}
    if stored != {_DTYPES[metadata.dtype]}:
        raise ModelLoadError(
            f"{weights_path}: model.json says the weights are {metadata.dtype}, the file holds "
            f"{', '.join(sorted(str(dtype).removeprefix('torch.') for dtype in stored))}"
        )
    if verify_golden:
        _check_golden_details(metadata, golden_inputs, weights_path)
    network = build_model(metadata.spec)
    try:
        network.load_state_dict({key: value.float() for key, value in tensors.items()}, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise ModelLoadError(
            f"weights in {weights_path} do not fit {metadata.spec.architecture}/{metadata.spec.head}: {reason[:300]}"
        ) from exc
    network.eval()
    loaded = LoadedModel(network=network, metadata=metadata, golden_inputs=golden_inputs, guard=guard)
    if verify_golden:
        check_golden(loaded, network)
    return loaded


def _guard_stats(tensors: dict[str, torch.Tensor], metadata: ModelMetadata, weights_path: Path) -> GuardStats | None:
    """The guard's tensors, which must be present exactly when model.json describes a guard, at its size."""
    try:
        stats = GuardStats.pop_from(tensors)
    except ValueError as exc:
        raise ModelLoadError(f"{weights_path}: {exc}") from exc
    spec = metadata.guard
    if stats is None or spec is None:
        if stats is not None or spec is not None:
            where = "the weights file" if stats is not None else "model.json"
            raise ModelLoadError(f"{weights_path}: only {where} has an input guard; re-export the model")
        return None
    if stats.mean.numel() != spec.dim or tuple(stats.whitener.shape) != (spec.dim, spec.dim):
        raise ModelLoadError(
            f"{weights_path}: input-guard tensors {tuple(stats.mean.shape)}/{tuple(stats.whitener.shape)} "
            f"do not fit the declared dimension {spec.dim}"
        )
    return stats


def _check_golden_details(metadata: ModelMetadata, golden_inputs: torch.Tensor | None, weights_path: Path) -> None:
    """The golden inputs' fine detail, recomputed, must be what the export measured: the floor was set on
    the export's :func:`detail`, and a changed measure would move every image against it unseen."""
    spec = metadata.guard
    if spec is None or spec.detail_floor is None:
        return
    if golden_inputs is None or len(spec.golden_details) != len(golden_inputs):
        count = 0 if golden_inputs is None else len(golden_inputs)
        raise ModelLoadError(
            f"{weights_path}: the guard's detail floor needs the golden inputs' details: "
            f"{len(spec.golden_details)} stored for {count} inputs"
        )
    measured = detail(golden_inputs).double()
    expected = torch.tensor(spec.golden_details, dtype=torch.float64)
    relative = float(((measured - expected).abs() / expected.abs().clamp_min(1e-6)).max())
    if not relative <= 1e-4:
        raise ModelLoadError(
            f"golden check failed: the golden inputs' fine detail differs from the exported one by {relative:.3g} "
            "(relative tolerance 0.0001)"
        )


def check_golden(
    loaded: LoadedModel, network: PneumoniaNet, atol: float | None = None, guard_rtol: float = 1e-3
) -> float:
    """Run the stored golden inputs through ``network`` (on any device/dtype) and compare.

    Checks the logits and, for a model with an input guard, the guard scores (relative
    tolerance ``guard_rtol``), so tampered guard statistics are refused like tampered weights.
    Returns the largest absolute logit difference; raises when either exceeds its tolerance.
    """
    if loaded.metadata.golden is None or loaded.golden_inputs is None:
        raise ModelLoadError("model has no golden reference outputs; re-export it with the training package")
    device = next(network.parameters()).device
    with torch.inference_mode():
        logits = network(loaded.golden_inputs.to(device)).float().cpu()
    spec, stats = loaded.metadata.guard, loaded.guard
    scores = None
    if spec is not None and stats is not None:
        scores = compute_guard_scores(network, loaded.golden_inputs, spec, stats)
    return compare_golden(loaded, logits, scores, atol, guard_rtol)


def golden_logit_difference(loaded: LoadedModel, logits: torch.Tensor) -> tuple[float, float]:
    """(largest absolute logit difference from the exported golden logits, their scale: max(1, largest |logit|))."""
    golden = loaded.metadata.golden
    if golden is None:
        raise ModelLoadError("model has no golden reference outputs; re-export it with the training package")
    logits = logits.float().cpu()
    expected = torch.tensor(golden.logits, dtype=torch.float32)
    if logits.shape != expected.shape:
        raise ModelLoadError(f"golden check: output shape {tuple(logits.shape)} != {tuple(expected.shape)}")
    return float((logits - expected).abs().max()), max(1.0, float(expected.abs().max()))


def golden_guard_difference(loaded: LoadedModel, guard_scores: torch.Tensor | None) -> float | None:
    """Largest relative difference from the exported golden guard scores; None when either side has none."""
    spec = loaded.metadata.guard
    if spec is None or guard_scores is None:
        return None
    scores = guard_scores.float().cpu()
    reference = torch.tensor(spec.golden_scores, dtype=torch.float32)
    if scores.shape != reference.shape:
        raise ModelLoadError(f"golden check: {len(spec.golden_scores)} guard scores stored, {len(scores)} computed")
    return float(((scores - reference).abs() / reference.abs().clamp_min(1e-6)).max())


def compare_golden(
    loaded: LoadedModel,
    logits: torch.Tensor,
    guard_scores: torch.Tensor | None,
    atol: float | None = None,
    guard_rtol: float = 1e-3,
) -> float:
    """Compare outputs computed for the golden inputs (by any runtime) with the exported ones.

    ``guard_scores`` is None when the runtime does not compute the guard (served without it);
    otherwise they must match too. Returns the largest absolute logit difference.
    """
    diff, scale = golden_logit_difference(loaded, logits)  # refuses a model without golden outputs
    golden = loaded.metadata.golden
    assert golden is not None
    tolerance = (atol if atol is not None else golden.atol) * scale
    if not diff <= tolerance:
        raise ModelLoadError(
            f"golden check failed: logits differ from the exported ones by {diff:.4g} (tolerance {tolerance:.4g})"
        )
    relative = golden_guard_difference(loaded, guard_scores)
    if relative is not None and not relative <= guard_rtol:
        raise ModelLoadError(
            f"golden check failed: input-guard scores differ from the exported ones by {relative:.3g} "
            f"(relative tolerance {guard_rtol:g})"
        )
    return diff
