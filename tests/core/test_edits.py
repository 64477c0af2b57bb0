"""Structure edits: atomic (the caller's model is untouched on failure), recorded, replayable."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sobre.core.edits import EDITS, edit_log, replay, structural_edit
from sobre.core.errors import CheckpointError, ConfigError


@structural_edit("test_shrink_hidden")
def shrink_hidden(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only ``keep`` hidden units of a Linear-ReLU-Linear model."""
    first, last = model[0], model[2]
    if max(keep) >= first.out_features:
        raise ConfigError(f"unit {max(keep)} does not exist")
    new_first = nn.Linear(first.in_features, len(keep))
    new_first.weight.data = first.weight.data[keep].clone()
    new_first.bias.data = first.bias.data[keep].clone()
    model[0] = new_first
    new_last = nn.Linear(len(keep), last.out_features)
    new_last.weight.data = last.weight.data[:, keep].clone()
    new_last.bias.data = last.bias.data.clone()
    model[2] = new_last
    return model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_edit_returns_a_copy_and_records_itself():
    model = _mlp()
    out = shrink_hidden(model, keep=[0, 2, 5])
    assert out is not model and model[0].out_features == 6 and out[0].out_features == 3
    assert edit_log(model) == []
    log = edit_log(out)
    assert log == [{"op": "test_shrink_hidden", "module": __name__, "params": {"keep": [0, 2, 5]}}]
    assert json.loads(json.dumps(log)) == log
    again = shrink_hidden(out, keep=[1])
    assert [e["params"]["keep"] for e in edit_log(again)] == [[0, 2, 5], [1]]
    assert "test_shrink_hidden" in EDITS


def test_failed_edit_leaves_the_model_untouched():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="does not exist"):
        shrink_hidden(model, keep=[0, 9])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert edit_log(model) == []
    with pytest.raises(ConfigError, match="JSON-able"):
        shrink_hidden(model, keep=torch.tensor([0]))


def test_replay_rebuilds_the_structure_so_weights_load_strictly():
    edited = shrink_hidden(shrink_hidden(_mlp(), keep=[0, 2, 5]), keep=[1, 2])
    rebuilt = replay(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), edit_log(edited))
    rebuilt.load_state_dict(edited.state_dict(), strict=True)
    x = torch.randn(5, 4)
    assert torch.equal(rebuilt(x), edited(x))
    assert edit_log(rebuilt) == edit_log(edited)


def test_replay_errors_name_the_entry():
    with pytest.raises(CheckpointError, match="malformed"):
        replay(_mlp(), [{"nope": 1}])
    with pytest.raises(CheckpointError, match=r"entry 0 \(test_shrink_hidden"):
        replay(
            nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3)),
            [{"op": "test_shrink_hidden", "module": __name__, "params": {"keep": [5]}}],
        )
    with pytest.raises(CheckpointError, match="cannot be imported"):
        replay(_mlp(), [{"op": "x", "module": "no_such_module_xyz", "params": {}}])
    with pytest.raises(ConfigError, match="did you mean 'test_shrink_hidden'"):
        replay(_mlp(), [{"op": "test_shrink_hiden", "params": {}}])


@structural_edit("test_scale_first", runtime=("probe",))
def scale_first(model: nn.Module, factor: float, probe: torch.Tensor | None = None) -> nn.Module:
    """Scale the first layer; ``probe`` is only used to check the output stays finite."""
    model[0].weight.data *= factor
    if probe is not None and not torch.isfinite(model(probe)).all():
        raise ConfigError("the scaled model is not finite on the probe")
    return model


def test_runtime_arguments_are_used_but_not_recorded():
    out = scale_first(_mlp(), factor=2.0, probe=torch.randn(2, 4))
    assert edit_log(out) == [
        {"op": "test_scale_first", "module": __name__, "params": {"factor": 2.0}}
    ]
    rebuilt = replay(_mlp(), edit_log(out))
    assert torch.equal(rebuilt[0].weight, out[0].weight)
