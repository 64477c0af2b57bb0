"""Tests of sobre.core.measure: exact counts on tiny models, depth rules, model left unchanged."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sobre.core.errors import ConfigError
from sobre.core.measure import (
    DEFAULT_NONLINEAR,
    SOFTMAX_OPS,
    Measurement,
    SavedBytes,
    count_params,
    depth,
    flops,
    latency_ms,
    measure,
    model_device,
    peak_memory_bytes,
    saved_activation_bytes,
)


class RowMask(nn.Module):
    """Zeroes the first half of a weight's rows (a fixed mask buffer)."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        mask = torch.ones(rows, cols)
        mask[: rows // 2] = 0
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def mlp(*sizes: int) -> nn.Sequential:
    """Linear layers of the given widths with a ReLU between consecutive ones."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.ReLU()] if i else []
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


# --- count_params --------------------------------------------------------------------------------


def test_count_params_dense_counts_weights_and_biases() -> None:
    assert count_params(mlp(4, 8, 3)) == (4 * 8 + 8 + 8 * 3 + 3, 4 * 8 + 8 + 8 * 3 + 3)


def test_count_params_counts_masked_weight_once_not_original_nor_mask() -> None:
    layer = nn.Linear(4, 6)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(1.0)
    parametrize.register_parametrization(layer, "weight", RowMask(6, 4))
    assert "parametrizations.weight.original" in dict(layer.named_parameters())
    # 24 weights of which the mask zeroes 3 rows of 4; 6 biases all non-zero.
    assert count_params(layer) == (24 + 6, 12 + 6)


def test_count_params_counts_tied_parameters_once() -> None:
    model = nn.Sequential(nn.Linear(5, 5, bias=False), nn.Linear(5, 5, bias=False))
    model[1].weight = model[0].weight
    assert count_params(model) == (25, 25)


def test_count_params_tied_weight_counted_in_its_masked_form() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(2.0)
    model[1].weight = model[0].weight
    parametrize.register_parametrization(model[1], "weight", RowMask(4, 4))
    assert count_params(model) == (16, 8)


# --- flops ---------------------------------------------------------------------------------------


def test_flops_single_linear_forward_is_exact() -> None:
    assert flops(nn.Linear(10, 5), torch.randn(3, 10)) == 2 * 3 * 10 * 5


def test_flops_train_step_of_linear_stack_is_exact() -> None:
    model, batch = mlp(4, 8, 3), 2
    forward = 2 * batch * (4 * 8 + 8 * 3)
    # Backward: every weight gradient, plus input gradients except the first layer's (the input
    # does not require grad); biases are not counted by FlopCounterMode.
    backward = 2 * batch * (4 * 8 + 8 * 3) + 2 * batch * (8 * 3)
    x = torch.randn(batch, 4)
    assert flops(model, x) == forward == 224
    assert flops(model, x, train_step=True) == forward + backward == 544
    x.requires_grad_(True)  # a training step wants parameter gradients only
    assert flops(model, x, train_step=True) == 544
    assert x.grad is None


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), fan_in=st.integers(1, 16), fan_out=st.integers(1, 16))
def test_flops_linear_matches_formula(batch: int, fan_in: int, fan_out: int) -> None:
    assert flops(nn.Linear(fan_in, fan_out), torch.randn(batch, fan_in)) == (
        2 * batch * fan_in * fan_out
    )


def test_flops_accepts_tuple_inputs() -> None:
    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            return self.a(x) + self.b(y)

    assert flops(Bilinear(), (torch.randn(4, 3), torch.randn(4, 5))) == 2 * 4 * (3 * 2 + 5 * 2)


def test_flops_sees_through_transformer_fast_path() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    layer.requires_grad_(False)  # eval + frozen: the fused fast path would count 0 FLOPs
    x = torch.randn(2, 3, 8)
    projections = 2 * (2 * 3) * (8 * 24 + 8 * 8 + 8 * 16 + 16 * 8)  # qkv, out, two FFN layers
    attention = 2 * (2 * 2) * (3 * 4 * 3) * 2  # QK^T and AV: batch*heads of 3x4 @ 4x3 (and back)
    assert flops(layer, x) == projections + attention == 6720


def test_flops_train_step_of_frozen_model_explains_fix() -> None:
    model = mlp(3, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="train_step=False"):
        flops(model, torch.randn(1, 3), train_step=True)


def test_bad_inputs_type_explains_fix() -> None:
    with pytest.raises(ConfigError, match="tuple"):
        flops(nn.Linear(2, 2), {"x": torch.randn(1, 2)})  # type: ignore[arg-type]


# --- saved activations, peak memory, latency -----------------------------------------------------


def test_saved_bytes_of_linear_relu_linear_match_analytic_count() -> None:
    model, x = mlp(4, 8, 3), torch.randn(2, 4)
    # Linear1 saves its input x (2x4 floats); ReLU saves its output h (2x8), which Linear2 also
    # saves: one storage. Linear2 saves W2 (3x8), a parameter; W1 is not needed (x needs no grad).
    assert saved_activation_bytes(model, x) == SavedBytes(
        activations=4 * (2 * 4 + 2 * 8), parameters=4 * 3 * 8
    )
    x.requires_grad_(True)
    assert saved_activation_bytes(model, x).parameters == 4 * (3 * 8 + 8 * 4)


def test_saved_bytes_count_views_of_one_storage_once() -> None:
    class Halves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            return h[:, :4].sigmoid() + h[:, 4:].sigmoid() + h.sigmoid().sum()

    # fc saves x; the three sigmoid outputs are distinct storages: 2x4, 2x4 and 2x8 floats.
    assert saved_activation_bytes(Halves(), torch.randn(2, 4)).activations == 4 * (8 + 8 + 8 + 16)


def test_peak_memory_is_none_on_cpu() -> None:
    assert peak_memory_bytes(mlp(4, 3), torch.randn(2, 4)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_on_cuda_covers_weights_and_grads() -> None:
    model = nn.Linear(1024, 1024).cuda()
    x = torch.randn(64, 1024, device="cuda")
    weights = 4 * (1024 * 1024 + 1024)
    peak = peak_memory_bytes(model, x)
    assert peak is not None
    assert peak >= 2 * weights  # weights and their gradients
    forward = peak_memory_bytes(model, x, train_step=False)
    assert forward is not None
    assert weights <= forward < peak


def test_latency_is_positive_and_finite() -> None:
    model = mlp(4, 3).train()
    ms = latency_ms(model, torch.randn(2, 4), runs=3, warmup=1)
    assert 0 < ms < math.inf
    assert model.training


def test_latency_rejects_zero_runs() -> None:
    with pytest.raises(ConfigError, match="runs >= 1"):
        latency_ms(mlp(4, 3), torch.randn(2, 4), runs=0)


# --- depth ---------------------------------------------------------------------------------------


def test_depth_of_mlp_counts_relus() -> None:
    model, x = mlp(4, 8, 8, 3), torch.randn(2, 4)
    assert depth(model, x) == 2
    model[1] = nn.Identity()
    assert depth(model, x) == 1


def test_depth_of_residual_block_takes_longest_branch() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return x + F.relu(self.c2(F.relu(self.c1(x))))

    assert depth(Residual(), torch.randn(1, 2, 5, 5)) == 2


def test_depth_counts_functional_inplace_and_aliases() -> None:
    class Tricky(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            h = x * 2
            flat = h.view(-1)
            h.relu_()  # in place: the view `flat` now holds a ReLU output too
            out = torch.zeros(2, 8)
            out[:, :4] = torch.tanh(flat.view(2, 4))  # written into a slice of a fresh buffer
            return out

    assert depth(Tricky(), torch.randn(2, 4)) == 2


def test_depth_ignores_paths_that_do_not_start_at_the_input() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Parameter(torch.zeros(4))

        def forward(self, x: Tensor) -> Tensor:
            shape_only = torch.zeros_like(torch.relu(torch.relu(x)))  # reads only the shape
            return torch.sigmoid(torch.sigmoid(self.gate)) * x + shape_only

    assert depth(Gated(), torch.randn(2, 4)) == 0


def test_depth_of_resnet18_is_stem_plus_two_per_basic_block() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    assert depth(model, torch.randn(1, 3, 32, 32)) == 1 + 8 * 2


def test_depth_of_transformer_layer_and_softmax_option() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    x = torch.randn(2, 3, 8)
    assert depth(layer, x) == 1  # the feed-forward ReLU
    assert depth(layer, x, nonlinear=DEFAULT_NONLINEAR | SOFTMAX_OPS) == 2  # + attention softmax
    layer.eval().requires_grad_(False)  # the fused fast path must not hide the layer
    assert depth(layer, x) == 1
    stack = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    assert depth(stack, x) == 3


def test_depth_nonlinear_set_is_configurable() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 3), nn.ReLU6(), nn.Sigmoid())
    x = torch.randn(2, 3)
    assert depth(model, x) == 3
    assert depth(model, x, nonlinear={"gelu"}) == 1
    assert depth(model, x, nonlinear=frozenset()) == 0


def test_depth_unknown_op_name_suggests_close_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'gelu'"):
        depth(mlp(2, 2), torch.randn(1, 2), nonlinear={"gelux"})


def test_depth_of_output_unrelated_to_input_explains_fix() -> None:
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, x: Tensor) -> Tensor:
            return self.w.relu()

    with pytest.raises(ConfigError, match="computed from the inputs"):
        depth(Constant(), torch.randn(1, 2))


# --- measure and Measurement ---------------------------------------------------------------------


def small_cnn() -> nn.Sequential:
    """A conv net with batch norm and dropout, one block frozen in eval mode."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 4 * 4, 3),
    )
    model.train()
    model[1].eval()
    return model


def test_measure_leaves_model_unchanged() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    model[1].train()  # batch norm in training mode would update its statistics
    model[5].weight.grad = torch.full_like(model[5].weight, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    x = torch.randn(2, 3, 6, 6)
    rng = torch.get_rng_state()
    result = measure(model, x, runs=2)
    assert result.params == 3 * 4 * 9 + 4 + 4 + 4 + 64 * 3 + 3
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[5].weight.grad, torch.full_like(model[5].weight, 7.0))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "5.weight")
    assert torch.equal(torch.get_rng_state(), rng)


def test_measure_of_masked_mlp_reports_every_field() -> None:
    model = mlp(4, 8, 3)
    parametrize.register_parametrization(model[0], "weight", RowMask(8, 4))
    result = measure(model, torch.randn(2, 4), runs=2)
    assert result.params == 67
    assert result.nonzero_params == 67 - 16
    assert (result.flops_forward, result.macs_forward, result.flops_train_step) == (224, 112, 544)
    assert result.latency_ms is not None
    assert 0 < result.latency_ms < math.inf
    # The masked weight W1*mask is computed in the forward but saved by nobody (x needs no grad);
    # the mask multiply saves the mask buffer (a model buffer) for W1's gradient.
    assert result.saved_activation_bytes == 4 * (2 * 4 + 2 * 8)
    assert result.saved_param_bytes == 4 * (3 * 8 + 8 * 4)
    assert result.peak_memory_bytes is None
    assert result.depth == 1
    assert result.input_shape == ((2, 4),)
    assert result.device == "cpu"


def test_measure_without_latency_or_train_step() -> None:
    result = measure(mlp(4, 3), torch.randn(2, 4), latency=False, train_step=False)
    assert result.latency_ms is None
    assert result.flops_train_step is None
    assert result.saved_activation_bytes is None
    assert result.flops_forward == 2 * 2 * 4 * 3


def sample(**changes: object) -> Measurement:
    values: dict[str, object] = {
        "params": 1_500_000,
        "nonzero_params": 750_000,
        "flops_forward": 2_000_000_000,
        "macs_forward": 1_000_000_000,
        "flops_train_step": 6_000_000_000,
        "latency_ms": 12.5,
        "saved_activation_bytes": 3_000_000,
        "saved_param_bytes": 6_000_000,
        "peak_memory_bytes": None,
        "depth": 17,
        "input_shape": ((8, 3, 32, 32),),
        "device": "cpu",
    }
    values.update(changes)
    return Measurement(**values)  # type: ignore[arg-type]


def test_measurement_dict_round_trip_through_json() -> None:
    m = sample(input_shape=((8, 3, 32, 32), (8,)))
    text = json.dumps(m.to_dict())
    assert Measurement.from_dict(json.loads(text)) == m


def test_measurement_from_dict_names_missing_and_unknown_keys() -> None:
    d = sample().to_dict()
    del d["depth"]
    d["speed"] = 1
    with pytest.raises(ConfigError, match=r"missing \['depth'\], unknown \['speed'\]"):
        Measurement.from_dict(d)


def test_table_shows_human_units() -> None:
    lines = sample().table().splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["metric", "value", "unit"]
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in lines}
    assert rows["parameters"] == ["1.50", "M"]
    assert rows["non-zero parameters"] == ["750.00", "K"]
    assert rows["forward FLOPs"] == ["2.00", "GFLOPs"]
    assert rows["latency"] == ["12.50", "ms"]
    assert rows["saved activations"] == ["3.00", "MB"]
    assert rows["peak memory"] == ["n/a", ""]
    assert rows["depth"] == ["17", "non-linear"]
    assert rows["input shape"] == ["8x3x32x32", ""]
    assert str(sample()) == sample().table()
    bars = {tuple(i for i, c in enumerate(line) if c in "|+") for line in lines}
    assert len(bars) == 1  # every column separator (and the rule's "+") lines up


def test_table_ratio_vs_baseline() -> None:
    pruned = sample(nonzero_params=150_000, latency_ms=6.25, depth=9)
    lines = pruned.table(baseline=sample()).splitlines()
    assert lines[0].endswith("ratio vs baseline")
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in lines}
    assert rows["parameters"][2] == "1.00x"
    assert rows["non-zero parameters"] == ["150.00", "K", "0.20x"]
    assert rows["latency"][2] == "0.50x"
    assert rows["depth"][2] == "0.53x"
    assert rows["peak memory"][2] == "n/a"


def test_model_device_reads_parameters_then_buffers_then_defaults_to_the_cpu() -> None:
    assert model_device(nn.Linear(2, 2).to(torch.float64)) == torch.device("cpu")
    buffers_only = nn.BatchNorm1d(3, affine=False).to("meta")
    assert model_device(buffers_only) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.Sequential(nn.ReLU(), nn.Linear(2, 2).to("meta"))).type == "meta"
