"""Tests of sobre.models.weights: strict loading from safetensors or weights-only .pt files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sobre.core.errors import CheckpointError, ConfigError
from sobre.models import create, load_weights


def test_safetensors_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create("resnet20", num_classes=10, in_channels=1).eval()
    with torch.no_grad():  # fresh running stats are 0/1: make them differ from a new model's
        for name, buffer in source.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), path)
    loaded = create("resnet20", in_channels=1, pretrained=True, weights_path=path).eval()
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_pt_state_dict_round_trip(tmp_path: Path) -> None:
    source = create("lenet5", num_classes=4, in_channels=1)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = create("lenet5", num_classes=4, in_channels=1, weights_path=path)
    for (name, a), (_, b) in zip(
        source.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(create("resnet20").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing keys \(72\)") as info:
        create("resnet32", weights_path=path)
    assert "features.layer1.3.conv1.weight" in str(info.value)
    assert "unexpected keys" not in str(info.value)


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(create("lenet5", num_classes=10, in_channels=1).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"classifier\.fc3\.weight \(10, 84\) != \(5, 84\)"):
        create("lenet5", num_classes=5, in_channels=1, weights_path=path)


def test_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = create("lenet5", in_channels=1).state_dict()
    path = tmp_path / "w.pth"
    torch.save({f"model.{k}": v for k, v in state.items()}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(10\): model\.features"):
        create("lenet5", in_channels=1, weights_path=path)


class Payload:
    """An arbitrary object that weights-only loading must refuse."""


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"weight": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(create("lenet5"), path)


def test_non_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_weights(create("lenet5"), path)


def test_missing_file_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(create("lenet5"), tmp_path / "nope.safetensors")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="unsupported suffix"):
        load_weights(create("lenet5"), tmp_path / "w.ckpt")


def test_corrupted_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(create("lenet5"), path)
