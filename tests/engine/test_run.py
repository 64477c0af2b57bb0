"""End to end on a tiny recipe: run folder, checkpoints, load, report, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import toys
from toys import Crash

import sobre
from sobre.core.edits import edit_log
from sobre.core.errors import CheckpointError, ConfigError
from sobre.core.masks import get_mask
from sobre.core.serialization import load_tree, read_info
from sobre.engine.report import read_run


def test_fit_writes_a_complete_run_folder(tiny_recipe, runs_dir):
    result = sobre.fit(tiny_recipe)
    run = result.run_dir
    assert run.parent == runs_dir / "tiny"
    for name in (
        "config.yaml",
        "env.json",
        "run.json",
        "metrics.json",
        "measure.json",
        "report.md",
        "figures/learning_curves.png",
        "logs/train/metrics.csv",
        "checkpoints/train/best.safetensors",
        "checkpoints/train/best.json",
        "checkpoints/train/last.safetensors",
        "checkpoints/train/final.safetensors",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/loss"] > 0
    assert set(metrics["stages"]["train"]) >= {"val/acc", "train/loss_epoch"}
    assert json.loads((run / "run.json").read_text())["status"] == "done"
    measured = json.loads((run / "measure.json").read_text())
    assert measured["params"] == sum(p.numel() for p in result.routine.net.parameters())
    report = (run / "report.md").read_text()
    assert "test/acc" in report and "learning_curves.png" in report
    assert f"{metrics['test/acc']:.4f}" in report
    # a second run never overwrites the first
    again = sobre.fit(tiny_recipe)
    assert again.run_dir != run and (run / "metrics.json").is_file()


def test_checkpoint_loads_into_a_fresh_model(tiny_recipe, runs_dir):
    result = sobre.fit(tiny_recipe, overrides={"evaluate.measure": False, "evaluate.report": False})
    best = result.run_dir / "checkpoints/train/best.safetensors"
    routine = sobre.load(best)
    x = result.datamodule.example_input(4)
    result.routine.eval()
    assert torch.allclose(routine(x), result.routine(x), atol=1e-6)  # tested = best weights
    info = routine.checkpoint_info
    assert info["num_classes"] == 3 and info["input_shape"] == [1, 8, 8]
    assert info["recipe"]["name"] == "tiny" and "val/acc" in info["metrics"]
    tree, _ = load_tree(best)
    assert (
        tree["optimizer_states"][0]["state"][0]["exp_avg"].shape
        == routine.net.features.conv1.weight.shape
    )
    data = bytearray(best.read_bytes())
    data[-16:] = bytes(b ^ 0xFF for b in data[-16:])  # same size, readable header
    best.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        sobre.load(best)
    best.write_bytes(bytes(data[:-16]))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        sobre.load(best)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_recipe, runs_dir):
    tiny_recipe["trainer"]["max_epochs"] = 3
    tiny_recipe["evaluate"] = {"measure": False, "report": False}
    full = sobre.fit(tiny_recipe)
    with pytest.raises(RuntimeError, match="killed"):
        sobre.fit(tiny_recipe, callbacks=[Crash(at=1)])
    crashed = sorted((runs_dir / "tiny").iterdir())[-1]
    state = json.loads((crashed / "run.json").read_text())
    assert state["status"] == "failed" and "killed" in state["error"]
    resumed = sobre.fit(resume=crashed)
    assert resumed.run_dir == crashed
    history = read_run(crashed).history["train"]  # the curve before the crash is kept
    assert [row["epoch"] for row in history] == [0, 1, 2]
    assert all("val/acc" in row for row in history)
    assert resumed.metrics["test/acc"] == full.metrics["test/acc"]
    assert resumed.metrics["test/loss"] == pytest.approx(full.metrics["test/loss"], abs=1e-6)
    a = load_tree(full.run_dir / "checkpoints/train/final.safetensors")[0]["state_dict"]
    b = load_tree(crashed / "checkpoints/train/final.safetensors")[0]["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_stages_run_in_order_with_a_transform_between(tiny_recipe, runs_dir):
    tiny_recipe["stages"] = [
        {"name": "train", "max_epochs": 1},
        {
            "name": "finetune",
            "max_epochs": 1,
            "lr": 0.001,
            "transforms": [{"class_path": "toys.ZeroHalfClassifier"}],
        },
    ]
    result = sobre.fit(tiny_recipe)
    assert json.loads((result.run_dir / "run.json").read_text())["stages_done"] == [
        "train",
        "finetune",
    ]
    assert set(result.metrics["stages"]) == {"train", "finetune"}
    assert (result.run_dir / "checkpoints/finetune/final.safetensors").is_file()
    assert result.routine.lr == 0.001
    mask = get_mask(result.routine.net.classifier)
    assert mask.sum().item() == mask.numel() // 2
    loaded = sobre.load(result.run_dir / "checkpoints/finetune/final.safetensors")  # masks restored
    x = result.datamodule.example_input(2)
    assert torch.allclose(loaded(x), result.routine.eval()(x), atol=1e-6)


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="not a sobre run folder"):
        sobre.fit(resume=tmp_path)


def test_recipe_callbacks_are_lightning_callbacks(tiny_recipe, runs_dir):
    tiny_recipe["trainer"]["max_epochs"] = 6
    tiny_recipe["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.EarlyStopping",
            "init_args": {"monitor": "val/acc", "mode": "max", "min_delta": 1.0, "patience": 0},
        }
    ]
    tiny_recipe["evaluate"] = {"measure": False, "report": False}
    result = sobre.fit(tiny_recipe)
    assert len(read_run(result.run_dir).history["train"]) == 2  # stopped long before 6 epochs


def test_a_finished_run_folder_is_never_reused(tiny_recipe, runs_dir, monkeypatch):
    tiny_recipe["trainer"]["max_epochs"] = 1
    tiny_recipe["evaluate"] = {"measure": False, "report": False}
    done = sobre.fit(tiny_recipe).run_dir
    before = (done / "metrics.json").read_text()
    monkeypatch.setenv("SOBRE_RUN_DIR", str(done))
    with pytest.raises(ConfigError, match="finished run"):
        sobre.fit(tiny_recipe)
    assert (done / "metrics.json").read_text() == before


def test_structure_edits_survive_a_crash_in_a_later_stage_and_reload(tiny_recipe, runs_dir):
    tiny_recipe["stages"] = [
        {"name": "train", "max_epochs": 1},
        {
            "name": "shallow",
            "max_epochs": 2,
            "transforms": [
                {"class_path": "toys.Linearize", "init_args": {"site": "features.relu4"}}
            ],
        },
    ]
    tiny_recipe["evaluate"] = {"measure": False, "report": False}
    full = sobre.fit(tiny_recipe)
    assert isinstance(full.routine.net.features.relu4, torch.nn.Identity)
    with pytest.raises(RuntimeError, match="killed"):
        sobre.fit(tiny_recipe, callbacks=[Crash(at=1)])  # epoch 1 of stage "shallow"
    crashed = sorted((runs_dir / "tiny").iterdir())[-1]
    resumed = sobre.fit(resume=crashed)
    assert resumed.metrics["test/acc"] == full.metrics["test/acc"]
    a = load_tree(full.run_dir / "checkpoints/shallow/final.safetensors")[0]["state_dict"]
    b = load_tree(crashed / "checkpoints/shallow/final.safetensors")[0]["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    loaded = sobre.load(crashed / "checkpoints/shallow/final.safetensors")
    assert isinstance(loaded.net.features.relu4, torch.nn.Identity)
    assert loaded.checkpoint_info["edits"][0]["op"] == "toy_identity"
    x = resumed.datamodule.example_input(3)
    assert torch.allclose(loaded(x), resumed.routine.eval()(x), atol=1e-6)


def test_repeated_stages_with_data_dependent_transforms(tiny_recipe, runs_dir):
    tiny_recipe["stages"] = [
        {"name": "train", "max_epochs": 1},
        {
            "name": "prune",
            "max_epochs": 1,
            "repeat": 2,
            "transforms": [{"class_path": "toys.ProbeAndMask"}],
        },
    ]
    result = sobre.fit(tiny_recipe)
    stages = result.metrics["stages"]
    assert list(stages) == ["train", "prune_1", "prune_2"]
    on_disk = json.loads((result.run_dir / "metrics.json").read_text())["stages"]
    assert list(on_disk) == ["train", "prune_1", "prune_2"]  # run order, not sorted
    assert stages["prune_2"]["transforms"] == [
        {"transform": "ProbeAndMask", "batches": 5, "calls": 2}  # 80 train samples / 16
    ]
    dense, pruned = stages["train"]["measure"], stages["prune_1"]["measure"]
    assert dense["nonzero_params"] - pruned["nonzero_params"] == pytest.approx(
        result.routine.net.classifier.weight.numel() // 2, abs=2
    )
    assert (result.run_dir / "figures/stage_curves.png").is_file()


def test_bad_stages_are_refused(tiny_recipe, runs_dir):
    tiny_recipe["stages"] = [{"name": "a"}, {"name": "a"}]
    with pytest.raises(ConfigError, match="unique"):
        sobre.fit(tiny_recipe)
    tiny_recipe["stages"] = [{"name": "a", "transforms": [{"class_path": "torch.nn.ReLU"}]}]
    with pytest.raises(ConfigError, match="ModelTransform"):
        sobre.fit(tiny_recipe)


def test_evaluate_final_weights_instead_of_best(tiny_recipe, runs_dir):
    tiny_recipe["evaluate"] = {"checkpoint": "final", "measure": False, "report": False}
    result = sobre.fit(tiny_recipe)
    final = load_tree(result.run_dir / "checkpoints/train/final.safetensors")[0]["state_dict"]
    assert all(torch.equal(final[k], v) for k, v in result.routine.state_dict().items())
    dm, net = result.datamodule, result.routine.net.eval()
    correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in dm.test_dataloader())
    assert result.metrics["test/acc"] == pytest.approx(correct / len(dm.test_dataset))


def test_best_checkpoint_is_tested_in_its_own_structure(tiny_recipe, runs_dir):
    tiny_recipe["model"]["lr"] = 1e-12  # val/acc never improves after epoch 0: best = epoch 0
    tiny_recipe["evaluate"] = {"measure": False, "report": False}
    result = sobre.fit(tiny_recipe, callbacks=[toys.EditAtLastEpoch("features.relu4")])
    best = result.run_dir / "checkpoints/train/best.safetensors"
    assert read_info(best)["edits"] == []  # the best epoch came before the edit
    assert edit_log(result.routine.net) == []  # the tested model is the best one, unedited
    dm, net = result.datamodule, sobre.load(best).net
    correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in dm.test_dataloader())
    assert result.metrics["test/acc"] == pytest.approx(correct / len(dm.test_dataset))
