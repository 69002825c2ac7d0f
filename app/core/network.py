"""The one VGG16 pneumonia network definition, shared by training and serving.

Everything that shapes the network's input (size, normalisation, class names) lives in
:class:`ModelSpec`, which is stored in ``model.json`` and read back by the service, so
training and serving can never disagree about it.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator
from torch import nn

from app.core.contrast import clahe, equalize_histogram

Architecture = Literal["vgg16", "vgg16_bn"]
Head = Literal["classic", "compact"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
ClassNames = tuple[Literal["NORMAL"], Literal["PNEUMONIA"]]
CLASS_NAMES: ClassNames = ("NORMAL", "PNEUMONIA")
# VGG16 ("configuration D" of Simonyan & Zisserman 2015): the output channels of each block's 3x3
# convolutions; every block ends with a 2x2 max-pool.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Constrained types shared with the training configuration, so a limit is written once.
InputSize = Annotated[int, Field(ge=32, le=1024, description="Square input side in pixels.")]
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]
ClaheClip = Annotated[float, Field(ge=1.0)]  # a multiple of a tile's mean bin height; 1 flattens the tile
ClaheTiles = Annotated[int, Field(ge=1, le=64)]


class Normalization(BaseModel):
    """Per-channel mean/std applied after scaling uint8 pixels to [0, 1], optionally after a contrast step."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD
    equalize: bool = Field(
        False,
        description="Per-image histogram equalisation first, so exposure and contrast differences between "
        "sites matter less; part of the network, so training, serving and scoring apply it alike.",
    )
    clahe_clip: ClaheClip | None = Field(
        None,
        description="Contrast-limited adaptive histogram equalisation first, with this clip limit (a multiple "
        "of a tile's mean bin height: lower is gentler); off when absent. Local, so texture in an over- or "
        "under-exposed region stays visible; part of the network like `equalize`.",
    )
    clahe_tiles: ClaheTiles = Field(8, description="CLAHE tiles per side (the input side must divide).")

    @model_validator(mode="after")
    def _one_contrast_step(self) -> Self:
        if self.equalize and self.clahe_clip is not None:
            raise ValueError("equalize and clahe_clip are alternatives: choose one contrast step")
        return self


class ModelSpec(BaseModel):
    """What the network is and what input it expects; the single source of truth."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    architecture: Architecture = "vgg16_bn"
    head: Head = "compact"
    input_size: InputSize = 224
    normalization: Normalization = Normalization()
    # Fixed: label 1 is PNEUMONIA in training, the decision and every response, so a model.json naming the
    # classes otherwise (swapped by hand) answered "NORMAL" with P(pneumonia) = 1.0.
    class_names: ClassNames = CLASS_NAMES
    dropout: Dropout = 0.5

    @model_validator(mode="after")
    def _whole_clahe_tiles(self) -> Self:
        tiles = self.normalization.clahe_tiles
        if self.normalization.clahe_clip is not None and self.input_size % tiles:
            raise ValueError(f"input_size {self.input_size} does not split into {tiles} CLAHE tiles per side")
        return self


def vgg16_features(batch_norm: bool) -> nn.Sequential:
    """torchvision's ``vgg16(_bn)().features``: the same modules at the same indices, initialised alike.

    Written out here rather than imported because the layout is all we take from torchvision:
    importing it costs the service 1-3 s at every start (``torchvision.ops`` pulls in
    ``torch._dynamo``), and building its model allocates and initialises the 120M-parameter
    classic classifier that the compact head throws away. The state-dict keys and shapes are
    torchvision's, so its ImageNet weights load unchanged (``training.imagenet``); a test checks
    the equivalence against torchvision itself.
    """
    layers: list[nn.Module] = []
    channels = 3
    for block in VGG16_BLOCKS:
        for width in block:
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            channels = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    features = nn.Sequential(*layers)
    init_like_torchvision(features)
    return features


def init_like_torchvision(modules: nn.Module) -> None:
    """torchvision's VGG initialisation: He-normal convolutions (fan out), unit batch norms, N(0, 0.01) linears."""
    for module in modules.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


class PneumoniaNet(nn.Module):
    """VGG16 features with a 2-class head, taking raw uint8 grayscale batches.

    The input is ``uint8[N, 1, S, S]`` (or 3 channels); scaling, channel replication and
    normalisation happen inside the network so that hosts ship 1 byte per pixel to the
    device and no caller can forget or duplicate a preprocessing step.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.features: nn.Module = vgg16_features(batch_norm=spec.architecture == "vgg16_bn")
        if spec.head == "classic":
            self.avgpool: nn.Module = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier: nn.Module = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096),
                nn.ReLU(True),
                nn.Dropout(spec.dropout),
                nn.Linear(4096, 4096),
                nn.ReLU(True),
                nn.Dropout(spec.dropout),
                nn.Linear(4096, len(spec.class_names)),
            )
            init_like_torchvision(self.classifier[:6])
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(
                nn.Flatten(1), nn.Dropout(spec.dropout), nn.Linear(512, len(spec.class_names))
            )
        mean = torch.tensor(spec.normalization.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.normalization.std).view(1, 3, 1, 1)
        # Folded into one affine map: x_norm = x_uint8 * scale + shift.
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map uint8 pixels (1 or 3 channels) to the normalised float input of VGG16."""
        contrast = self.spec.normalization
        if contrast.equalize:
            pixels = equalize_histogram(pixels)
        elif contrast.clahe_clip is not None:
            pixels = clahe(pixels, contrast.clahe_clip, contrast.clahe_tiles)
        x = pixels.to(self.scale.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x * self.scale + self.shift

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional block's output ``[N, 512, h, w]``, before pooling.

        Exposed because the engine reads it once per batch for more than the logits (heatmaps,
        the input guard) without a second forward pass.
        """
        return self.features(x)

    def head(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`feature_maps` output."""
        x = self.avgpool(maps)
        if self.spec.head == "classic":
            x = torch.flatten(x, 1)
        return self.classifier(x)

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an already normalised float batch (used by batch augmentation)."""
        return self.head(self.feature_maps(x))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_normalized(self.normalize(pixels))


def build_model(spec: ModelSpec) -> PneumoniaNet:
    """Build an untrained network for ``spec`` (random initialisation, torchvision's scheme)."""
    return PneumoniaNet(spec)
