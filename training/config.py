"""Validated training configuration: its fields are the ``train`` command's flags (one source of truth)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.core.artifacts import StorageDtype
from app.core.network import (
    Architecture,
    ClaheClip,
    ClaheTiles,
    Dropout,
    Head,
    InputSize,
    ModelSpec,
    Normalization,
)
from training.augment import Augmentation
from training.calibration import ThresholdMethod

# Inference keeps no activations for a backward pass, so twice the training batch fits in the same memory.
EVAL_BATCH_FACTOR = 2


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field: ``input_size`` is ``--input-size``."""
    return "--" + name.replace("_", "-")


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


class TrainConfig(BaseModel):
    """Everything that defines a run; stored in OUTDIR/config.json and reused on --resume."""

    # allow_inf_nan: no float flag means anything at infinity (--warmup-epochs inf crashed the schedule).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: Path = Field(description="dataset root: DIR/{train,val,test}/{NORMAL,PNEUMONIA} or DIR/{NORMAL,PNEUMONIA}")
    out: Path = Field(description="run directory (checkpoints, metrics, exported model)")
    epochs: int = Field(20, ge=1, description="total number of epochs")
    input_size: InputSize = Field(224, description="square network input side in pixels")
    init: Literal["scratch", "imagenet", "model"] = Field(
        "scratch", description="random init, ImageNet VGG16 weights, or an exported model to fine-tune (--init-model)"
    )
    imagenet_weights: Path | None = Field(
        None, description="torchvision VGG16(-BN) ImageNet weights (.pth or .safetensors); default: torch hub cache"
    )
    init_model: Path | None = Field(
        None,
        description="for --init model: an exported model (DIR or model.safetensors, with model.json) whose "
        "network this run builds and whose validation split it draws",
    )
    arch: Architecture = Field("vgg16_bn", description="VGG16 without or with batch norm")
    head: Head = Field("compact", description="classic: fc6/fc7/fc8 on 7x7 pooling; compact: global pool + linear")
    dropout: Dropout = Field(0.5, description="dropout in the head")
    equalize: bool = Field(
        False, description="per-image histogram equalisation inside the network (served the same way)"
    )
    clahe_clip: ClaheClip | None = Field(
        None, description="CLAHE with this clip limit inside the network (served the same way); off if absent"
    )
    clahe_tiles: ClaheTiles = Field(8, description="CLAHE tiles per side (must divide --input-size)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing of the training loss")
    freeze_features: bool = Field(False, description="train only the head (convolutions and their BN frozen)")
    opt: Literal["adamw", "sgd"] = Field("adamw", description="optimizer")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default 5e-4 adamw, 1e-2 sgd)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (Nesterov)")
    weight_decay: float | None = Field(None, ge=0, description="weight decay (default 0.05 adamw, 1e-4 sgd)")
    batch_size: int = Field(32, ge=2, description="images per step per process")
    warmup_epochs: float = Field(1.0, ge=0.0, description="linear learning-rate warm-up before the cosine decay")
    hflip: bool = Field(False, description="random horizontal flips (off: anatomy is not left/right symmetric)")
    aug_strength: float = Field(
        1.0, ge=0.0, le=3.0, description="scales rotation/translation/scale/intensity jitter; 0 = off"
    )
    zoom_in: float = Field(
        0.0, ge=0.0, le=1.0, description="extra one-sided random zoom-in of up to this fraction (tighter framing)"
    )
    aspect_jitter: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="random width-to-height stretch up to 1+F either way, area kept (a film's squash to a square "
        "is then no cue); 0 = off",
    )
    erase_corners: float = Field(
        0.0, ge=0.0, le=1.0, description="probability of filling one image corner (side markers) with the mean"
    )
    acquisition: float = Field(
        0.0, ge=0.0, le=3.0, description="random gamma, blur and noise (another detector), scaled by F; 0 = off"
    )
    mixup: float = Field(
        0.0, ge=0.0, le=10.0, description="mixup: blend image pairs with weight ~ Beta(F, F) per batch; 0 = off"
    )
    # Seeds within numpy's and torch's range (torch.manual_seed takes seed * EPOCH_SEED_STRIDE + epoch).
    seed: int = Field(0, ge=0, lt=2**32, description="seed for the split, init, shuffling and augmentation")
    split_seed: int | None = Field(
        None,
        ge=0,
        lt=2**32,
        description="seed of the validation split alone (default: --seed), so seed replicates share one",
    )
    ema_epochs: float = Field(
        0.0,
        ge=0.0,
        description="validate and export a moving average of the weights over about this many epochs; 0 = off",
    )
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0, description="share of train split off as validation (by patient)")
    min_val_images: int = Field(100, ge=1, description="a provided val split smaller than this is replaced")
    patience: int = Field(5, ge=0, description="early stop after this many epochs without val AUC gain; 0 = never")
    target_sensitivity: float = Field(0.95, gt=0.0, le=1.0, description="sensitivity the threshold must reach on val")
    threshold_method: ThresholdMethod = Field("sensitivity", description="operating point rule")
    export_dtype: StorageDtype = Field("float32", description="storage dtype of model.safetensors")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    workers: int = Field(default_factory=default_workers, ge=1, description="image decoding threads")
    threads: int | None = Field(None, ge=1, description="torch CPU threads per process (default: cores / processes)")
    limit_per_class: int | None = Field(None, ge=2, description="use at most N images per class (quick runs)")
    cache: bool = Field(True, description="cache decoded images in OUTDIR/cache keyed by file list + input size")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for 95 percent confidence intervals; 0 = none")
    golden_count: int = Field(4, ge=1, description="validation images stored as golden check inputs")
    guard_max_false_refusal: float = Field(
        0.01, ge=0.0, lt=1.0, description="input guard threshold: at most this fraction of val images refused"
    )
    version: str | None = Field(None, description="model version in model.json (default: run name + time)")

    def model_spec(self) -> ModelSpec:
        """The network this run trains; it is exported in model.json, so the service builds the same one."""
        return ModelSpec(
            architecture=self.arch,
            head=self.head,
            input_size=self.input_size,
            dropout=self.dropout,
            normalization=Normalization(
                equalize=self.equalize, clahe_clip=self.clahe_clip, clahe_tiles=self.clahe_tiles
            ),
        )

    @model_validator(mode="after")
    def _init_model_goes_with_init_model(self) -> Self:
        """A parent model is named exactly when the run starts from one, so neither is silently ignored."""
        if (self.init == "model") != (self.init_model is not None):
            raise ValueError("--init model and --init-model FILE go together")
        return self

    @model_validator(mode="after")
    def _imagenet_weights_go_with_init_imagenet(self) -> Self:
        """An ImageNet file given without ``--init imagenet`` would be ignored: the run would start from scratch."""
        if self.imagenet_weights is not None and self.init != "imagenet":
            raise ValueError("--imagenet-weights FILE needs --init imagenet")
        return self

    @model_validator(mode="after")
    def _network_is_buildable(self) -> Self:
        """Refuse at the command line what the network spec would refuse at export (e.g. tiles that do not divide)."""
        self.model_spec()
        return self

    def augmentation(self) -> Augmentation:
        """The random transforms of each training batch, from their flags."""
        return Augmentation(
            strength=self.aug_strength,
            hflip=self.hflip,
            zoom_in=self.zoom_in,
            erase_corners=self.erase_corners,
            aspect_jitter=self.aspect_jitter,
        )

    def eval_batch_size(self) -> int:
        """Batch size for validation and test predictions."""
        return self.batch_size * EVAL_BATCH_FACTOR

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (5e-4 if self.opt == "adamw" else 1e-2)

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.05 if self.opt == "adamw" else 1e-4


# Flags that may differ when resuming: they do not change what the saved state means.
RESUME_OVERRIDABLE = frozenset(
    {
        "data",
        "epochs",
        "patience",
        "device",
        "workers",
        "threads",
        "cache",
        "target_sensitivity",
        "threshold_method",
        "export_dtype",
        "bootstrap",
        "golden_count",
        "guard_max_false_refusal",
        "version",
        "imagenet_weights",
        "init_model",
    }
)
