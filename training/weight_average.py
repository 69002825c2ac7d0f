"""An exponential moving average of the weights, validated and exported instead of the raw weights.

Why: a from-scratch network's weights wander from step to step, and the same recipe on four seeds
spread from 0.72 to 0.87 in test-half specificity (training/EXPERIMENTS.md, E4). The average of the
last few epochs of steps sits in a flatter, steadier place, and unlike an ensemble it is still one
network to export, guard and serve. It is the ``--model-ema`` of torchvision's classification recipe.

Algorithm: after every optimizer step, ``average = decay * average + (1 - decay) * weights`` with
``decay = 1 - 1 / (epochs * steps_per_epoch)``, so a step's weight in the average falls to 1/e after
about ``epochs`` epochs. The average covers the batch-norm statistics too (torch's ``AveragedModel``
with ``use_buffers``): the averaged network needs no extra pass to re-estimate them. During the
learning-rate warm-up the average is reset to the current weights at every step, so it starts from
the end of the warm-up, not from the random init.
"""

from __future__ import annotations

from typing import cast

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from app.core.network import PneumoniaNet


class WeightAverage:
    """The moving average of ``network``'s parameters and buffers; ``update`` after each step."""

    def __init__(self, network: PneumoniaNet, *, epochs: float, steps_per_epoch: int, warmup_steps: int) -> None:
        if epochs <= 0 or steps_per_epoch < 1:
            raise ValueError(f"a weight average needs epochs > 0 and steps > 0, not {epochs} and {steps_per_epoch}")
        self.decay = 1.0 - 1.0 / max(1.0, epochs * steps_per_epoch)
        self.warmup_steps = warmup_steps
        self._source = network
        self._average = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)

    @property
    def network(self) -> PneumoniaNet:
        """The averaged network: what validation scores and the export stores."""
        return cast(PneumoniaNet, self._average.module)

    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (0-based, counted over the whole run)."""
        if step < self.warmup_steps:
            self._average.n_averaged.zero_()  # AveragedModel copies the weights when nothing is averaged yet
        self._average.update_parameters(self._source)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume the average exactly (its weights and its step count)."""
        return {k: v.detach().cpu().contiguous() for k, v in self._average.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._average.load_state_dict(tensors)
