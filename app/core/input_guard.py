"""The input guard: refuse what does not look like the chest X-rays the model was trained on.

A classifier labels whatever it is given; a blank page or a knee radiograph comes back as
"PNEUMONIA, p = 0.99". The guard takes, from the same forward pass that makes the prediction,
the channel means and standard deviations of every VGG block's output (after its max-pool),
and measures the Mahalanobis distance of that vector from the training images' distribution
(Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples",
feature ensemble). Early blocks see intensity and texture (blank, noise, documents), late
blocks see anatomy (other body parts, views, modalities). Chosen by measurement over the
final-layer features alone, energy scores and pixel thumbnails: see ``weights/README.md``.

The guard is part of the model: its mean and whitening matrix are stored in
``model.safetensors`` (under the sha256), its parameters and threshold in ``model.json``
(:class:`GuardSpec`), and the golden inputs' scores are re-checked on load. The score is the
distance divided by ``sqrt(dim)``: about 1 for a typical training image, larger the less an
image resembles the training data; images above the threshold fail.

The features are blind to a loss of fine detail: a film blurred or enlarged from a thumbnail keeps
its block statistics and is mostly called PNEUMONIA (blur reads as opacity). So the guard also
measures the pixels' fine detail (:func:`detail`) and fails images with less of it than nearly all
training images had (``GuardSpec.detail_floor``; measured in ``benchmarks/guard_measure.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from app.core.preprocessing import ImageError

GUARD_MEAN_KEY = "__guard__.mean"
# The whitener is a Cholesky factor (lower triangular): only its lower triangle is stored, row-major,
# which halves the guard's share of the weights file without losing a bit.
GUARD_WHITENER_KEY = "__guard__.whitener_tril"
GuardMode = Literal["reject", "flag", "off"]
# With two images the centred rows are +-one vector and Ledoit-Wolf's shrinkage is exactly 0 (singular).
MIN_TRAIN_IMAGES = 3
# Share of the training images the detail floor may fail: below it, 86-94 % of films blurred by 1 px at the
# model's input, and every film blurred more or enlarged from 32 px (benchmarks/guard_measure.py).
MAX_LOW_DETAIL = 0.0025
Block = int  # 1-based index of a VGG block, i.e. of the max-pool that ends it


class NotChestXrayError(ImageError):
    """The guard refused the image: it is not (or not enough like) a frontal chest X-ray."""

    code = "not_chest_xray"
    default_message = "the image does not look like a frontal chest X-ray"


class InsufficientDetailError(NotChestXrayError):
    """The guard refused the image for lack of fine detail: blurred, or enlarged from a small picture.

    A subclass: everything that handles a guard refusal handles this one, under its own code.
    """

    code = "insufficient_detail"
    default_message = "the image has too little fine detail to be read (blurred, or enlarged from a small picture)"


class GuardSpec(BaseModel):
    """The guard's method and parameters as stored in ``model.json``; its tensors live in the weights file."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)  # a threshold of Infinity refused nothing

    method: Literal["mahalanobis-block-stats"] = "mahalanobis-block-stats"
    mean_blocks: tuple[Block, ...] = Field(description="Blocks whose channel means enter the feature vector.")
    std_blocks: tuple[Block, ...] = Field(description="Blocks whose channel standard deviations enter it.")
    dim: int = Field(ge=1, description="Length of the feature vector.")
    shrinkage: float = Field(ge=0.0, le=1.0, description="Ledoit-Wolf weight of the scaled identity in the covariance.")
    threshold: float = Field(
        gt=0.0, le=100.0, description="Images whose score is above this are not chest X-rays (a typical one scores 1)."
    )
    threshold_method: str = Field(description="How the threshold was chosen.")
    golden_scores: list[float] = Field(default_factory=list, description="Scores of the golden inputs at export.")
    detail_floor: float | None = Field(
        default=None, gt=0.0, description="Images whose fine detail is below this fail; None: not checked."
    )
    detail_floor_method: str = Field(default="", description="How the detail floor was chosen.")
    golden_details: list[float] = Field(
        default_factory=list, description="Fine detail of the golden inputs at export, re-checked on load."
    )
    calibration: dict[str, float | int | str] = Field(
        default_factory=dict, description="What the statistics and the threshold were fitted on, and measured rates."
    )


@dataclass(frozen=True)
class GuardStats:
    """The fitted feature distribution: mean and whitening matrix ``W`` with ``W @ W.T`` = inverse covariance."""

    mean: torch.Tensor  # float32[D]
    whitener: torch.Tensor  # float32[D, D]

    def tensors(self) -> dict[str, torch.Tensor]:
        if bool(torch.triu(self.whitener, diagonal=1).any()):
            raise ValueError("the guard's whitening matrix must be lower triangular (a Cholesky factor)")
        rows, cols = torch.tril_indices(*self.whitener.shape)
        return {GUARD_MEAN_KEY: self.mean.contiguous(), GUARD_WHITENER_KEY: self.whitener[rows, cols].contiguous()}

    @classmethod
    def pop_from(cls, tensors: dict[str, torch.Tensor]) -> GuardStats | None:
        """Take the guard's tensors out of a loaded tensor file; ``None`` when it has none."""
        mean, whitener = tensors.pop(GUARD_MEAN_KEY, None), tensors.pop(GUARD_WHITENER_KEY, None)
        if mean is None and whitener is None:
            return None
        if mean is None or whitener is None:
            raise ValueError("the tensor file holds only one of the guard's two tensors")
        dim = mean.numel()
        if whitener.dim() != 1 or whitener.numel() != dim * (dim + 1) // 2:
            count = whitener.numel()
            raise ValueError(f"the guard's packed whitening matrix has {count} values, not {dim}x{dim}'s lower half")
        full = torch.zeros((dim, dim), dtype=torch.float32)
        rows, cols = torch.tril_indices(dim, dim)
        full[rows, cols] = whitener.float()
        return cls(mean.float(), full)

    def to(self, device: torch.device) -> GuardStats:
        return GuardStats(self.mean.to(device), self.whitener.to(device))


@dataclass(frozen=True)
class GuardVerdict:
    """What the guard says about one image; ``reason`` is a one-line explanation when it fails.

    ``detail`` and ``detail_floor`` are None for a model whose guard has no detail floor.
    """

    score: float
    threshold: float
    passed: bool
    detail: float | None = None
    detail_floor: float | None = None

    @property
    def resembles(self) -> bool:
        return bool(self.score <= self.threshold)  # NaN, from a non-finite feature, does not

    @property
    def reason(self) -> str:
        if not self.resembles or self.detail is None or self.detail_floor is None:
            relation = "<=" if self.resembles else ">"
            return (
                f"input guard score {self.score:.3f} {relation} threshold {self.threshold:.3f}: "
                + ("it resembles" if self.resembles else "it does not resemble")
                + " the frontal chest X-rays the model was trained on"
            )
        if self.passed:
            return (
                f"input guard score {self.score:.3f} <= threshold {self.threshold:.3f} and fine detail "
                f"{self.detail:.3f} >= floor {self.detail_floor:.3f}: it resembles the frontal chest X-rays "
                "the model was trained on"
            )
        return (
            f"fine detail {self.detail:.3f} < floor {self.detail_floor:.3f}: the image is blurred or was enlarged "
            "from a small picture, and blur reads as opacity to the model (send the original, sharp film)"
        )

    def refusal(self) -> NotChestXrayError:
        """The error a failed verdict refuses with: not like the training films, else too little detail."""
        error = NotChestXrayError if not self.resembles else InsufficientDetailError
        return error(f"refused: {self.reason}")


def features_and_maps(
    features: nn.Module, x: torch.Tensor, mean_blocks: Sequence[Block], std_blocks: Sequence[Block]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the VGG ``features`` stack once; return its output maps and the guard's ``float32[N, D]`` vector.

    The output equals ``features(x)`` (the same modules in the same order); the block
    statistics are read on the way, after each max-pool, in float32 whatever the compute dtype.
    """
    wanted_means, wanted_stds = set(mean_blocks), set(std_blocks)
    parts: dict[tuple[str, Block], torch.Tensor] = {}
    block = 0
    assert isinstance(features, nn.Sequential)
    for layer in features:
        x = layer(x)
        if isinstance(layer, nn.MaxPool2d):
            block += 1
            if block in wanted_means or block in wanted_stds:
                var, mean = torch.var_mean(x.float(), dim=(2, 3), correction=0)
                parts["mean", block] = mean
                parts["std", block] = var.sqrt()
    vector = [parts["mean", b] for b in mean_blocks] + [parts["std", b] for b in std_blocks]
    return x, torch.cat(vector, dim=1)


def guard_scores(features: torch.Tensor, stats: GuardStats, noise: float = 0.0) -> torch.Tensor:
    """Mahalanobis distance / sqrt(dim) of each row of ``features``, in float32 on their device.

    ``noise`` is the squared score a runtime's own rounding adds to every image (int8:
    :func:`noise_energy`). Noise independent of the image adds to the squared distance, so it is
    taken off in quadrature; without it the scores are the plain distance, bit for bit.
    """
    centred = features.float() - stats.mean
    scores = torch.linalg.vector_norm(centred @ stats.whitener, dim=1) / math.sqrt(stats.mean.numel())
    if noise:
        scores = (scores.square() - noise).clamp_min(0.0).sqrt()
    return scores


def noise_energy(exact: torch.Tensor, noisy: torch.Tensor) -> float:
    """Median of ``noisy**2 - exact**2`` over the same images (never below 0): the ``noise`` of :func:`guard_scores`.

    Measured on training-side images only. Why squared: whitening spreads a runtime's small
    per-feature errors over all 2,944 directions, and their energy adds to each image's squared
    distance, so int8 scores run a near-constant amount high in squares (benchmarks/NOTES.md).
    """
    if exact.shape != noisy.shape or exact.numel() == 0:
        raise ValueError(f"need the same images scored twice, got {tuple(exact.shape)} and {tuple(noisy.shape)}")
    return max(0.0, float((noisy.double().square() - exact.double().square()).median()))


def detail(pixels: torch.Tensor) -> torch.Tensor:
    """Fine detail of ``uint8[N,1,S,S]`` model inputs, ``float32[N]``: the mean absolute 4-neighbour
    Laplacian over the pixels' standard deviation (+1, so a flat image scores 0, not NaN).

    The Laplacian is the finest scale an image at the model's input holds; dividing by the spread
    makes it independent of exposure and contrast. Blur and enlargement take it away; the model's
    own features barely notice (module docstring). Computed on the pixels the model sees.
    """
    p = pixels.to(torch.float32)[:, 0]
    laplacian = 4 * p[:, 1:-1, 1:-1] - p[:, :-2, 1:-1] - p[:, 2:, 1:-1] - p[:, 1:-1, :-2] - p[:, 1:-1, 2:]
    return laplacian.abs().mean((1, 2)) / (p.std((1, 2)) + 1)


def judge(spec: GuardSpec, score: float, fine_detail: float | None = None) -> GuardVerdict:
    """The one place a score (and fine detail) becomes pass or fail (NaN, from a non-finite feature, fails).

    ``fine_detail`` is required exactly when the guard has a detail floor: a check left out would pass.
    """
    floor = spec.detail_floor
    if floor is None:
        return GuardVerdict(score, spec.threshold, passed=bool(score <= spec.threshold))
    if fine_detail is None:
        raise ValueError("this input guard checks fine detail: judge needs the image's detail")
    passed = bool(score <= spec.threshold) and bool(fine_detail >= floor)
    return GuardVerdict(score, spec.threshold, passed, fine_detail, floor)


def ledoit_wolf(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, shrunk covariance and shrinkage of ``features`` [N, D] (Ledoit & Wolf 2004), in float64.

    With a few thousand images and thousands of dimensions the sample covariance is nearly
    singular; the closed-form weight towards a scaled identity makes it invertible without a
    tuned constant (checked against scikit-learn's ``LedoitWolf`` in the tests).
    """
    x = features.double()
    n, dim = x.shape
    mean = x.mean(0)
    centred = x - mean
    sample = centred.T @ centred / n
    mu = torch.trace(sample) / dim
    identity = torch.eye(dim, dtype=x.dtype)
    delta = ((sample - mu * identity) ** 2).sum() / dim
    squared = centred**2
    beta = ((squared.T @ squared).sum() / n - (sample**2).sum()) / (n * dim)
    shrinkage = float(min(beta, delta) / delta) if float(delta) > 0 else 1.0
    covariance = (1 - shrinkage) * sample + shrinkage * mu * identity
    return mean, covariance, shrinkage


def fit_stats(features: torch.Tensor) -> tuple[GuardStats, float]:
    """Fit the guard's Gaussian to training features; returns the stats and the shrinkage used."""
    mean, covariance, shrinkage = ledoit_wolf(features)
    try:
        precision = torch.linalg.inv(covariance)
        whitener = torch.linalg.cholesky((precision + precision.T) / 2)  # L with L @ L.T = precision
    except torch.linalg.LinAlgError as exc:  # e.g. identical images: no spread to shrink towards
        raise ValueError(f"the input guard's training features have a singular covariance: {exc}") from exc
    return GuardStats(mean.float(), whitener.float()), shrinkage


def fit_threshold(scores: torch.Tensor, max_false_refusal: float) -> float:
    """The smallest threshold that refuses at most ``max_false_refusal`` of these in-distribution scores."""
    ordered = torch.sort(scores.double()).values
    keep = min(len(ordered), max(1, math.ceil((1 - max_false_refusal) * len(ordered))))
    return float(ordered[keep - 1])


def fit_detail_floor(details: torch.Tensor, max_low_detail: float) -> float | None:
    """The largest floor that at most ``max_low_detail`` of these training images fall below; None when
    there are too few images to place one (under ``1 / max_low_detail``: the floor would be their minimum,
    and a fine-tune on 30 films would refuse one sharp film in 31) or they have no detail at all.

    From the training images, not validation: fine detail is measured, not fitted, so the training
    images are as unbiased and their 4,000-odd give a steadier low quantile than validation's 784.
    """
    if len(details) * max_low_detail < 1:
        return None
    ordered = torch.sort(details.double()).values
    floor = float(ordered[min(len(ordered) - 1, math.floor(max_low_detail * len(ordered)))])
    return floor if floor > 0 else None


def block_count(features: nn.Module) -> int:
    return sum(isinstance(layer, nn.MaxPool2d) for layer in features.modules())


def default_blocks(features: nn.Module, input_size: int) -> tuple[tuple[Block, ...], tuple[Block, ...]]:
    """Means of every block; standard deviations of the blocks whose maps are bigger than 2 x 2.

    A 2 x 2 map's deviation is four numbers' spread: noise more than signal.
    """
    blocks = block_count(features)
    means = tuple(range(1, blocks + 1))
    stds = tuple(b for b in means if input_size // 2**b > 2)
    return means, stds


def guard_vectors(
    network: nn.Module, pixels: torch.Tensor, spec_blocks: tuple[Sequence[Block], Sequence[Block]], batch_size: int
) -> torch.Tensor:
    """Guard feature vectors of ``uint8[N,1,S,S]`` images, on the CPU in float32, for fitting."""
    out = []
    network.eval()
    device = next(network.parameters()).device
    with torch.inference_mode():
        for batch in torch.split(pixels, batch_size):
            x = network.normalize(batch.to(device))  # type: ignore[operator]
            _, vector = features_and_maps(network.features, x, *spec_blocks)  # type: ignore[arg-type]
            out.append(vector.float().cpu())
    return torch.cat(out)


def fit_guard(
    network: nn.Module,
    train_pixels: torch.Tensor,
    val_pixels: torch.Tensor,
    *,
    input_size: int,
    max_false_refusal: float = 0.01,
    max_low_detail: float = MAX_LOW_DETAIL,
    batch_size: int = 128,
    source: str = "",
) -> tuple[GuardSpec, GuardStats]:
    """Statistics and detail floor from the training images, threshold from the validation images (never
    test data)."""
    blocks = default_blocks(network.features, input_size)  # type: ignore[arg-type]
    train = guard_vectors(network, train_pixels, blocks, batch_size)
    if len(train) < MIN_TRAIN_IMAGES:
        raise ValueError(f"the input guard needs at least {MIN_TRAIN_IMAGES} training images")
    stats, shrinkage = fit_stats(train)
    val_scores = guard_scores(guard_vectors(network, val_pixels, blocks, batch_size), stats)
    threshold = fit_threshold(val_scores, max_false_refusal)
    spec = GuardSpec(
        mean_blocks=blocks[0],
        std_blocks=blocks[1],
        dim=int(stats.mean.numel()),
        shrinkage=shrinkage,
        threshold=threshold,
        threshold_method=f"validation quantile: at most {max_false_refusal:g} of validation images refused",
        calibration={
            "train_images": len(train),
            "val_images": len(val_scores),
            "val_refusal_rate": float((val_scores > threshold).double().mean()),
            "val_score_median": float(val_scores.median()),
            **({"source": source} if source else {}),
        },
    )
    return with_detail_floor(spec, train_pixels, val_pixels, val_scores, max_low_detail), stats


def with_detail_floor(
    spec: GuardSpec,
    train_pixels: torch.Tensor,
    val_pixels: torch.Tensor,
    val_scores: torch.Tensor,
    max_low_detail: float = MAX_LOW_DETAIL,
) -> GuardSpec:
    """``spec`` with the detail floor placed on the training images, and the validation refusals it makes
    beside the score's (``val_scores``): the one place a floor is fitted, for a new guard or an old one."""
    floor = fit_detail_floor(detail(train_pixels), max_low_detail)
    val_low = detail(val_pixels) < (floor or 0.0)
    method = (
        f"training quantile: at most {max_low_detail:g} of training images below it"
        if floor is not None
        else f"none: {len(train_pixels)} training images are too few to place a floor at {max_low_detail:g}"
    )
    calibration = {
        **spec.calibration,
        "val_low_detail_rate": float(val_low.double().mean()),
        "val_guard_refusal_rate": float(((val_scores > spec.threshold) | val_low).double().mean()),
    }
    return spec.model_copy(update={"detail_floor": floor, "detail_floor_method": method, "calibration": calibration})
