"""Safetensors + JSON trees: exact round trips, atomic writes, corruption detected on load."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sobre.core.errors import CheckpointError
from sobre.core.serialization import load_tree, read_info, save_tree, sidecar_path


def _adam_state() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt.state_dict()


def test_optimizer_state_round_trips_with_int_keys_and_tuples(tmp_path):
    model, state = _adam_state()
    save_tree({"opt": state, "sd": model.state_dict()}, tmp_path / "c.safetensors")
    tree, _ = load_tree(tmp_path / "c.safetensors")
    assert sorted(tree["opt"]["state"]) == [0, 1, 2, 3]  # int keys, not "0"
    assert tree["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    for k, v in state["state"].items():
        assert torch.equal(tree["opt"]["state"][k]["exp_avg"], v["exp_avg"])
    fresh = torch.optim.Adam(model.parameters(), lr=0.1)
    fresh.load_state_dict(tree["opt"])
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg_sq"], state["state"][0]["exp_avg_sq"]
    )


def test_rng_states_round_trip(tmp_path):
    tree = {"np": np.random.get_state(), "py": random.getstate(), "torch": torch.get_rng_state()}
    save_tree(tree, tmp_path / "r.safetensors")
    back, _ = load_tree(tmp_path / "r.safetensors")
    np.random.set_state(back["np"])
    random.setstate(back["py"])
    a = (np.random.rand(), random.random())
    np.random.set_state(tree["np"])
    random.setstate(tree["py"])
    assert a == (np.random.rand(), random.random())
    assert torch.equal(back["torch"], tree["torch"])


def test_tied_and_non_contiguous_tensors(tmp_path):
    w = torch.randn(4, 6)
    tree = {"a": w, "b": w, "t": w.t(), "empty": torch.zeros(0)}
    save_tree(tree, tmp_path / "t.safetensors")
    back, _ = load_tree(tmp_path / "t.safetensors")
    assert torch.equal(back["a"], w) and torch.equal(back["b"], w) and torch.equal(back["t"], w.t())
    assert back["empty"].shape == (0,)


@settings(max_examples=25, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(10**6), 10**6)
        | st.text(max_size=5)
        | st.floats(allow_nan=False, width=32),
        lambda kids: (
            st.lists(kids, max_size=3)
            | st.tuples(kids, kids)
            | st.dictionaries(st.text(max_size=4) | st.integers(0, 9), kids, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_plain_values_round_trip(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("h") / "v.safetensors"
    save_tree({"v": value}, path)
    assert load_tree(path)[0]["v"] == value


def test_sidecar_holds_info_and_sha(tmp_path):
    path = save_tree({"x": torch.ones(2)}, tmp_path / "c.safetensors", info={"recipe": {"a": 1}})
    side = json.loads(sidecar_path(path).read_text())
    assert side["info"] == {"recipe": {"a": 1}} and len(side["tensors"]["sha256"]) == 64
    assert read_info(path) == {"recipe": {"a": 1}}


def test_unsupported_object_names_its_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"hparams/net"):
        save_tree({"hparams": {"net": torch.nn.Linear(2, 2)}}, tmp_path / "c.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_corrupted_and_replaced_files_are_detected(tmp_path):
    path = save_tree({"x": torch.arange(100.0)}, tmp_path / "c.safetensors")
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_tree(path)
    sidecar_path(path).unlink()
    assert load_tree(path)[0]["x"].shape == (100,)  # the tensor file alone still loads
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_tree(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tree(tmp_path / "missing.safetensors")


def test_failed_write_keeps_the_earlier_file(tmp_path, monkeypatch):
    path = save_tree({"x": torch.ones(3)}, tmp_path / "c.safetensors")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sobre.core.serialization.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_tree({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_tree(path)[0]["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.safetensors"]
