"""The shared velocity probe: fixed probe sets and channel-major outputs in eval mode."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sobre.core.errors import ConfigError
from sobre.efficient.probe import ProbeOutputs, noise_probe, probe_inputs


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 5, 3, padding=1),
            bn=nn.BatchNorm2d(5),
            relu=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(5, 4),
        )
    )


def labelled(n: int = 12, classes: int = 3) -> DataLoader:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 6, 6).clone()
    y = torch.arange(n) % classes
    return DataLoader(TensorDataset(x, y), batch_size=5)


def test_outputs_are_channel_major_per_module():
    model = net()
    probe = ProbeOutputs(model, [torch.randn(4, 3, 6, 6), torch.randn(3, 3, 6, 6)], ["conv", "fc"])
    out = probe()
    assert probe.names == ["conv", "fc"]
    assert probe.num_samples == 7
    assert out["conv"].shape == (5, 7, 36)  # (C, N, H*W)
    assert out["fc"].shape == (4, 7, 1)  # vectors: one position
    x = torch.cat(probe.probe)
    with torch.no_grad():
        model.eval()
        expected = model.conv(x)
    assert torch.allclose(out["conv"], expected.flatten(2).transpose(0, 1))


def test_default_selection_is_conv_and_bn_and_dtype_is_kept():
    out = ProbeOutputs(net(), [torch.randn(2, 3, 6, 6)], dtype=torch.float16)()
    assert list(out) == ["conv", "bn"]
    assert all(t.dtype == torch.float16 for t in out.values())


def test_forward_runs_in_eval_mode_and_restores_the_mode():
    model = net().train()
    before = model.bn.running_mean.clone()
    seen = []
    model.bn.register_forward_hook(lambda m, i, o: seen.append(m.training))
    ProbeOutputs(model, [torch.randn(4, 3, 6, 6) + 3.0])()
    assert seen == [False]
    assert model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, before)  # no statistics update from the probe
    model.eval()
    ProbeOutputs(model, [torch.randn(1, 3, 6, 6)])()
    assert not model.training


def test_probe_inputs_first_n_and_per_class():
    first = probe_inputs(labelled(), n=7)
    assert [t.shape[0] for t in first] == [5, 2]
    assert torch.cat(first)[:, 0, 0, 0].tolist() == list(range(7))
    per = torch.cat(probe_inputs(labelled(), per_class=2))
    assert per[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]  # labels 0,1,2,0,1,2
    everything = torch.cat(probe_inputs(labelled()))
    assert everything.shape[0] == 12


def test_per_class_stops_reading_once_every_class_is_full():
    batches = iter(labelled())
    per = torch.cat(probe_inputs(batches, per_class=1, num_classes=3))
    assert per[:, 0, 0, 0].tolist() == [0, 1, 2]
    assert next(batches, None) is not None  # the rest of the loader was not read


def test_bare_one_element_batches_are_inputs():
    loader = DataLoader(TensorDataset(torch.arange(5.0).view(5, 1)), batch_size=2)
    assert torch.cat(probe_inputs(loader, n=3)).flatten().tolist() == [0.0, 1.0, 2.0]


def test_bare_inputs_and_bad_input():
    bare = [torch.zeros(2, 3, 6, 6), torch.ones(2, 3, 6, 6)]
    assert torch.cat(probe_inputs(bare, n=3)).shape[0] == 3
    with pytest.raises(ConfigError, match="yielded no samples"):
        probe_inputs(DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0)), batch_size=2))
    with pytest.raises(ConfigError, match="per_class needs"):
        probe_inputs(bare, per_class=1)
    with pytest.raises(ConfigError, match="n must be >= 1"):
        probe_inputs(bare, n=0)
    with pytest.raises(ConfigError, match="per_class must be >= 1"):
        probe_inputs(labelled(), per_class=0)
    with pytest.raises(ConfigError, match="probe set is empty"):
        ProbeOutputs(net(), [])


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = net()
        self.unused = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_modules_not_called_are_reported():
    model = _WithUnused()
    with pytest.raises(ConfigError, match=r"\['unused'\] produced no output"):
        ProbeOutputs(model, [torch.randn(2, 3, 6, 6)], ["body.conv", "unused"])()


def test_noise_kinds_ranges_seeds_and_batches():
    uniform = torch.cat(noise_probe((3, 4, 4), n=250, batch_size=100))
    assert uniform.shape == (250, 3, 4, 4)
    assert [t.shape[0] for t in noise_probe((3, 4, 4), n=250, batch_size=100)] == [100, 100, 50]
    assert float(uniform.min()) >= 0 and float(uniform.max()) < 1
    gauss = torch.cat(noise_probe((3, 4, 4), n=250, kind="gaussian"))
    assert float(gauss.min()) >= 0 and float(gauss.max()) <= 1
    assert abs(float(gauss.mean()) - 0.5) < 0.05
    assert 0.2 < float(gauss.std()) < float(uniform.std())  # N(0.5, 0.25²) clipped, U(0, 1)
    assert torch.equal(
        torch.cat(noise_probe((2,), n=5, seed=3)), torch.cat(noise_probe((2,), n=5, seed=3))
    )
    assert not torch.equal(
        torch.cat(noise_probe((2,), n=5, seed=3)), torch.cat(noise_probe((2,), n=5))
    )
    with pytest.raises(ConfigError, match=r"kind='normal' is unknown.*\['uniform', 'gaussian'\]"):
        noise_probe((2,), kind="normal")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n and batch_size must be >= 1"):
        noise_probe((2,), n=0)
