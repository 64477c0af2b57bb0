"""Recipes: overrides, short names, and errors that name the key and the closest valid name."""

from __future__ import annotations

import pytest

import sobre
from sobre.core.errors import ConfigError
from sobre.engine.recipes import (
    DEFAULT_ROUTINE,
    apply_overrides,
    load_yaml,
    normalize,
    parse_overrides,
)


def test_parse_overrides_types_values():
    out = parse_overrides(
        ["--trainer.max_epochs", "3", "--model.lr=0.01", "--x.flag", "true", "--x.shape", "[1, 2]"]
    )
    assert out == {"trainer.max_epochs": 3, "model.lr": 0.01, "x.flag": True, "x.shape": [1, 2]}
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--trainer.max_epochs"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["max_epochs=3"])


def test_overrides_reach_init_args_without_spelling_them():
    recipe = {"model": {"class_path": "a.B", "init_args": {"lr": 1}}, "trainer": {}}
    out = apply_overrides(recipe, {"model.lr": 2, "trainer.max_epochs": 4, "data.name": "digits"})
    assert out["model"]["init_args"]["lr"] == 2
    assert out["trainer"]["max_epochs"] == 4 and out["data"] == {"name": "digits"}
    assert recipe["model"]["init_args"]["lr"] == 1  # the input is not modified


def test_normalize_expands_short_names(tiny_recipe):
    out = normalize(tiny_recipe)
    assert out["model"]["class_path"] == DEFAULT_ROUTINE
    assert out["model"]["init_args"]["arch"] == "small_cnn"
    assert out["data"]["class_path"].startswith("sobre.data")
    assert out["data"]["init_args"]["num_classes"] == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trainer.max_epoch": 1}, r"trainer\.max_epoch; did you mean 'max_epochs'"),
        ({"model.lrr": 0.1}, r"model\.init_args\.lrr; did you mean 'lr'"),
        ({"data.batch_sise": 8}, r"data\.init_args\.batch_sise; did you mean 'batch_size'"),
        ({"data.name": "mnsit5k"}, r"did you mean 'mnist5k'"),
        ({"trainr.max_epochs": 1}, r"recipe\.trainr; did you mean 'trainer'"),
        ({"model.num_classes": 4}, r"set from the data section"),
        ({"evaluate.mesure": False}, r"evaluate\.mesure; did you mean 'measure'"),
        ({"evaluate.checkpoint": "last"}, r"'best' .* or 'final'"),
    ],
)
def test_unknown_keys_suggest_the_closest(tiny_recipe, change, message):
    with pytest.raises(ConfigError, match=message):
        normalize(apply_overrides(tiny_recipe, change))


def test_wrong_types_are_reported_before_training(tiny_recipe, runs_dir):
    with pytest.raises(ConfigError, match=r"model.*lr.*float"):
        sobre.fit(tiny_recipe, overrides={"model.lr": "big"})
    with pytest.raises(ConfigError, match=r"max_epochs: expected int \(got 'abc'\)"):
        sobre.fit(tiny_recipe, overrides={"trainer.max_epochs": "abc"})
    with pytest.raises(ConfigError, match=r"one of 'adam', 'adamw', 'sgd'.*did you mean 'adam'"):
        sobre.fit(tiny_recipe, overrides={"model.optimizer": "adamm"})
    assert not runs_dir.exists()  # nothing was created


def test_bad_class_path_names_the_key(tiny_recipe):
    tiny_recipe["methods"] = [{"class_path": "torch.nn.Lineer", "init_args": {}}]
    with pytest.raises(ConfigError, match=r"methods\.0\.class_path.*did you mean 'Linear'"):
        normalize(tiny_recipe)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  name: [mnist5k\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_yaml(bad)
    (tmp_path / "quickstart.yaml").write_text("data: {name: mnist5k}\n")
    with pytest.raises(ConfigError, match=r"did you mean 'quickstart\.yaml'"):
        load_yaml(tmp_path / "quikstart.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(lst)
    assert load_yaml(tmp_path / "quickstart.yaml")["name"] == "quickstart"
