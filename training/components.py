"""The network, optimizer and loss function a :class:`TrainConfig` asks for."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from app.core.network import CLASS_NAMES, PneumoniaNet, build_model
from training.config import TrainConfig
from training.finetune import load_parent
from training.imagenet import load_imagenet


def make_network(config: TrainConfig) -> tuple[PneumoniaNet, dict[str, Any] | None]:
    """Seeded random init, ImageNet weights or an exported model; returns the network and what it loaded, if any.

    Called before the data is decoded; a parent model's validation split is checked after (``check_split``).
    """
    torch.manual_seed(config.seed)
    network = build_model(config.model_spec())
    source: dict[str, Any] | None = None
    if config.init == "imagenet":
        source = {"imagenet": str(load_imagenet(network, config.imagenet_weights))}
    elif config.init == "model":
        assert config.init_model is not None  # TrainConfig refuses --init model without it
        source = {"model": load_parent(network, config.init_model)}
    if config.freeze_features:
        network.features.requires_grad_(False)
    return network, source


def make_optimizer(network: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on biases and batch-norm parameters (1-D tensors), as in torchvision's recipe."""
    params = [p for p in network.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.resolved_weight_decay()},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.opt == "sgd":
        return torch.optim.SGD(
            groups, lr=config.resolved_lr(), momentum=config.momentum, nesterov=config.momentum > 0, foreach=True
        )
    return torch.optim.AdamW(groups, lr=config.resolved_lr(), foreach=True)


def class_weighted_loss(
    labels: torch.Tensor, device: torch.device, label_smoothing: float = 0.0
) -> nn.CrossEntropyLoss:
    """Weights n / (classes * n_c): both classes contribute equally despite the ~2.9:1 imbalance."""
    counts = torch.bincount(labels, minlength=len(CLASS_NAMES)).double()
    weights = counts.sum() / (len(CLASS_NAMES) * counts.clamp(min=1))
    return nn.CrossEntropyLoss(weight=weights.float().to(device), label_smoothing=label_smoothing)
