"""fresh_weights: seeded new values that follow each module's and each model's own init."""

from __future__ import annotations

import math

import torch
from torch import nn

from sobre.core.masks import attach_mask
from sobre.core.weights import fresh_weights
from sobre.models import create


def test_a_model_scheme_is_reapplied_after_the_module_resets() -> None:
    torch.manual_seed(0)
    vit = create("vit_tiny28", num_classes=5, dim=64, depth=2, heads=2)
    values = fresh_weights(vit, seed=1)
    assert set(values) == set(vit.state_dict())
    linear = [k for k, m in vit.named_modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([values[f"{k}.weight"].flatten() for k in linear])
    assert abs(float(weights.std()) - 0.02) < 0.002  # trunc-normal 0.02, not PyTorch's uniform
    assert all(not values[f"{k}.bias"].any() for k in linear)
    assert abs(float(values["cls_token"].std()) - 0.02) < 0.01
    assert not torch.equal(values["pos_embed"], vit.pos_embed.detach())


def test_cifar_resnet_convs_stay_kaiming_fan_out() -> None:
    net = create("resnet20", num_classes=10, width=2.0)
    values = fresh_weights(net, seed=3)
    conv = dict(net.named_modules())["features.layer3.0.conv2"]
    w = values["features.layer3.0.conv2.weight"]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(float(w.std()) / math.sqrt(2 / fan_out) - 1) < 0.05


def test_seeded_device_free_and_the_model_and_masks_untouched() -> None:
    net = create("resnet20", num_classes=10)
    attach_mask(net.classifier, kind="weight")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    a, b, c = fresh_weights(net, 5), fresh_weights(net, 5), fresh_weights(net, 6)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert "classifier.weight" in a and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_parameters_without_any_init_keep_their_values_and_are_named(caplog) -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

    model = nn.Sequential(nn.Linear(3, 3), Scale())
    with caplog.at_level("WARNING", logger="sobre.core.weights"):
        values = fresh_weights(model, 0)
    assert set(values) == {"0.weight", "0.bias"}
    assert "1.gain" in caplog.text
