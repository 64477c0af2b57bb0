"""The shared Lightning mechanism of the selection callbacks (ChannelFreezing): frozen channels
stay bit-identical through the trainer's own optimizer step, the masked layers run channel-sparse
during the fit and plain afterwards, and counted and measured costs are logged per epoch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sobre.core.errors import ConfigError
from sobre.data import create
from sobre.efficient.callbacks import ChannelFreezing
from sobre.efficient.masks import NeuronMask
from sobre.efficient.sparse import ChannelSparseConv2d
from sobre.engine.routine import ClassificationRoutine
from sobre.engine.trainer import make_trainer


class HalfFrozen(ChannelFreezing):
    """Freezes the first half of every conv's output channels from epoch 1 on."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.seen_sparse: list[bool] = []

    def build(self, trainer, pl_module) -> None:
        self.mask = NeuronMask.from_model(pl_module.net, nn.Conv2d)

    def mask_for_epoch(self, trainer, pl_module, epoch):
        if epoch == 0:
            return None
        masks = {}
        for name, m in self.mask.items():
            keep = torch.ones_like(m)
            keep[: m.numel() // 2] = False
            masks[name] = keep
        return self.mask.replace(masks)

    def after_epoch(self, trainer, pl_module, epoch):
        convs = [m for m in pl_module.net.modules() if isinstance(m, nn.Conv2d)]
        self.seen_sparse.append(all(isinstance(m, ChannelSparseConv2d) for m in convs))
        return {"toy/epoch": float(epoch)}


def _fit(tmp_path, callback, epochs=2):
    dm = create("synthetic", input_shape=[1, 8, 8], num_classes=3, num_samples=96, batch_size=16)
    routine = ClassificationRoutine(
        arch="small_cnn",
        arch_kwargs={"width": 4},
        num_classes=3,
        optimizer="sgd",
        lr=0.1,
        weight_decay=0.01,
        scheduler="none",
    )
    trainer = make_trainer(
        tmp_path,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        callbacks=[callback],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return routine, trainer, dm


def test_frozen_rows_do_not_move_and_costs_are_logged(tmp_path):
    callback = HalfFrozen(sparse=True)
    routine, trainer, dm = _fit(tmp_path, callback, epochs=1)
    trainer.fit(routine, datamodule=dm)
    after_dense = copy.deepcopy(routine.net.state_dict())
    assert "efficient/trainable" not in trainer.callback_metrics  # epoch 0 trained everything
    assert "efficient/step_ms" in trainer.callback_metrics

    callback2 = HalfFrozen(sparse=True)
    callback2.mask_for_epoch = lambda t, p, e: HalfFrozen.mask_for_epoch(callback2, t, p, 1)
    routine.net.load_state_dict(after_dense)
    trainer2 = _fit(tmp_path, callback2, epochs=2)[1]
    trainer2.fit(routine, datamodule=dm)
    moved = False
    for name, m in routine.net.named_modules():
        if isinstance(m, nn.Conv2d):
            half = m.out_channels // 2
            before = after_dense[f"{name}.weight"]
            assert torch.equal(m.weight[:half], before[:half]), name
            moved |= not torch.equal(m.weight[half:], before[half:])
    assert moved
    assert callback2.seen_sparse == [True, True]  # channel-sparse during the fit ...
    assert all(type(m) is nn.Conv2d for m in routine.net.modules() if isinstance(m, nn.Conv2d))
    metrics = trainer2.callback_metrics
    assert float(metrics["efficient/trainable"]) == pytest.approx(0.5, abs=0.05)
    assert 0.1 < float(metrics["efficient/backward_saving"]) < 0.5
    assert float(metrics["efficient/saved_mb"]) > 0
    assert float(metrics["toy/epoch"]) == 1.0
    conv_layers = [k for k in metrics if k.startswith("efficient/trainable/")]
    assert conv_layers and all(float(metrics[k]) <= 0.5 for k in conv_layers)


def test_bad_settings_are_refused():
    with pytest.raises(
        ConfigError, match=r"sparse='yes' is unknown; choose one of \[True, False, 'auto'\]"
    ):
        HalfFrozen(sparse="yes")
    with pytest.raises(ConfigError, match="measure_batch must be >= 0"):
        HalfFrozen(measure_batch=-1)
