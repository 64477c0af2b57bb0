"""The contract: a plain PyTorch loop and the Lightning adapter give the same weights."""

from __future__ import annotations

import copy

import torch
from toys import L2, ActivationL1, HalfFrozen

from sobre.core.methods import StepContext, total
from sobre.core.taps import FeatureTap
from sobre.data import create as create_data
from sobre.engine import ClassificationRoutine, MethodCallback, make_trainer
from sobre.models import create

STEPS = 5


def _plain_loop(net, loader, regularizers, method):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    criterion = torch.nn.CrossEntropyLoss()
    method.setup(net)
    net.train()
    for step, (x, y) in enumerate(loader):
        if step == STEPS:
            break
        selectors = [s for r in regularizers for s in r.needs_features]
        with FeatureTap(net, selectors, detach=False) as tap:
            out = net(x)
        ctx = StepContext(net, x, y, out, tap.features, step=step)
        terms = {"task": criterion(out, y)}
        for reg in regularizers:
            terms.update(reg.terms(ctx))
        opt.zero_grad()
        total(terms).backward()
        method.after_backward(net, ctx)
        opt.step()
        method.after_step(net, ctx)
    return net


def test_plain_loop_and_lightning_callback_give_the_same_weights(tmp_path):
    torch.manual_seed(0)
    dm = create_data(
        "synthetic", input_shape=(1, 8, 8), num_classes=3, num_samples=160, batch_size=16, seed=1
    )
    dm.setup("fit")
    net0 = create("small_cnn", num_classes=3, in_channels=1, width=4)
    first = net0.features.conv1.weight.detach().clone()

    plain = _plain_loop(
        copy.deepcopy(net0), dm.train_dataloader(), [L2(), ActivationL1()], HalfFrozen()
    )

    routine = ClassificationRoutine(
        net=copy.deepcopy(net0),
        num_classes=3,
        optimizer="sgd",
        lr=0.05,
        scheduler="none",
        regularizers=[L2(), ActivationL1()],
    )
    trainer = make_trainer(
        tmp_path,
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        callbacks=[MethodCallback(HalfFrozen())],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(routine, datamodule=dm)
    lit = routine.net

    for (name, a), (_, b) in zip(plain.state_dict().items(), lit.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    # and the method really acted: frozen channels kept their initial weights
    w = lit.features.conv1.weight.detach()
    assert torch.equal(w[::2], first[::2]) and not torch.equal(w[1::2], first[1::2])
