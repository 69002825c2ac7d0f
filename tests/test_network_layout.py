"""The VGG16 written out in ``app.core.network`` is torchvision's, layer for layer; serving does not import it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torchvision.models import vgg16, vgg16_bn

from app.core.network import ModelSpec, build_model

TORCHVISION = {"vgg16": vgg16, "vgg16_bn": vgg16_bn}


@pytest.mark.parametrize("architecture", ["vgg16", "vgg16_bn"])
@pytest.mark.parametrize("head", ["compact", "classic"])
def test_state_dict_keys_and_shapes_are_torchvisions(architecture: str, head: str) -> None:
    ours = build_model(ModelSpec(architecture=architecture, head=head, input_size=32)).state_dict()  # type: ignore[arg-type]
    theirs = TORCHVISION[architecture](weights=None, num_classes=2).state_dict()
    shared = ("features.",) if head == "compact" else ("features.", "classifier.")
    expected = {key: tuple(value.shape) for key, value in theirs.items() if key.startswith(shared)}
    got = {key: tuple(value.shape) for key, value in ours.items() if key.startswith(shared)}
    assert got == expected
    if head == "compact":
        assert {key for key in ours if key.startswith("classifier.")} == {"classifier.2.weight", "classifier.2.bias"}


@pytest.mark.parametrize("architecture", ["vgg16", "vgg16_bn"])
def test_same_weights_give_torchvisions_outputs(architecture: str) -> None:
    torch.manual_seed(0)
    theirs = TORCHVISION[architecture](weights=None, num_classes=2).eval()
    ours = build_model(ModelSpec(architecture=architecture, head="classic", input_size=32)).eval()  # type: ignore[arg-type]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    if architecture == "vgg16_bn":  # non-trivial running statistics, so eval-mode batch norm is exercised
        for module in theirs.features:
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(ours.forward_normalized(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_initialisation_follows_torchvisions_scheme() -> None:
    network = build_model(ModelSpec(architecture="vgg16_bn", head="classic", input_size=32))
    first_conv, last_conv = network.features[0], network.features[-4]
    # He-normal with fan out: std = sqrt(2 / (out_channels * 3 * 3)).
    for conv in (first_conv, last_conv):
        expected = (2 / (conv.out_channels * 9)) ** 0.5
        assert float(conv.weight.detach().std()) == pytest.approx(expected, rel=0.1)
        assert not conv.bias.any()
    batch_norm = network.features[1]
    assert bool((batch_norm.weight == 1).all()) and not batch_norm.bias.any()
    fc6 = network.classifier[0]
    assert float(fc6.weight.detach().std()) == pytest.approx(0.01, rel=0.02) and not fc6.bias.any()


def test_the_service_and_the_decoder_workers_do_not_import_torchvision() -> None:
    """torchvision's import drags in torch._dynamo: 1-3 s at every service start for nothing used."""
    code = (
        "import sys, app.__main__, app.core.decode_pool, app.core.openvino_backend; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
