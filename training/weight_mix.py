"""Weight-space mixing of a model and its own fine-tune (WiSE-FT, Wortsman et al., CVPR 2022).

A fine-tune that trains a cue away (EXPERIMENTS.md, E25) moves a network along a path from its
parent, and the points between the two are working networks too, because both share one start and
one basin; unrelated networks do not, and their mix is noise. ``mix`` returns the point at fraction
``alpha`` of the way: every float tensor (weights, biases, batch-norm running statistics) is
``(1 - alpha) * parent + alpha * tuned``, and integer counters are the tuned network's. ``alpha`` is
chosen on validation like any other setting, never on test.

The tuned end may be a uniform soup (``soup``: Wortsman et al., ICML 2022): the mean of several
fine-tunes of the same parent (seed replicates, say), which share its basin as well; averaging them
cancels what each seed's run did by chance and keeps what they all did.
"""

from __future__ import annotations

import copy

import torch

from app.core.artifacts import LoadedModel
from app.core.network import PneumoniaNet


class LineageError(ValueError):
    """The second model was not fine-tuned from the first, so no point between them is a network."""


def check_lineage(parent: LoadedModel, tuned: LoadedModel) -> None:
    """``tuned``'s provenance must name ``parent``'s weights (sha256) as the model it started from, and both
    must be the same network (a hand-edited model.json could relabel tensors of the same shapes)."""
    started_from = (tuned.metadata.provenance.get("init_weights") or {}).get("model", {})
    if started_from.get("sha256") != parent.metadata.sha256:
        raise LineageError(
            f"{tuned.metadata.version} was not fine-tuned from {parent.metadata.version} "
            f"(its provenance.init_weights names {started_from.get('version', 'no parent model')})"
        )
    if tuned.metadata.spec != parent.metadata.spec:
        raise LineageError(
            f"{tuned.metadata.version}'s network differs from the parent's "
            f"({tuned.metadata.spec} vs {parent.metadata.spec})"
        )


def _network_with(template: PneumoniaNet, state: dict[str, torch.Tensor]) -> PneumoniaNet:
    """A copy of ``template`` holding ``state``, in eval mode."""
    network = copy.deepcopy(template)
    network.load_state_dict(state, strict=True)
    return network.eval()


def mix(parent: PneumoniaNet, tuned: PneumoniaNet, alpha: float) -> PneumoniaNet:
    """A copy of ``parent`` moved ``alpha`` of the way (0 = parent, 1 = tuned) to ``tuned``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], not {alpha}")
    theirs = tuned.state_dict()
    state = {
        key: torch.lerp(value, theirs[key], alpha) if value.is_floating_point() else theirs[key].clone()
        for key, value in parent.state_dict().items()
    }
    return _network_with(parent, state)


def soup(parent: LoadedModel, tuned: list[LoadedModel]) -> PneumoniaNet:
    """The mean of ``tuned``, every float tensor, each checked to be a fine-tune of ``parent``
    (``check_lineage``); a soup of one is that network."""
    if not tuned:
        raise ValueError("a soup needs at least one network")
    for model in tuned:
        check_lineage(parent, model)
    states = [model.network.state_dict() for model in tuned]
    state = {
        key: torch.stack([s[key] for s in states]).mean(0) if value.is_floating_point() else value.clone()
        for key, value in states[0].items()
    }
    return _network_with(tuned[0].network, state)
