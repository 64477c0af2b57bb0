"""DSD²: the distillation objective and label noise."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from sobre.core.errors import ConfigError
from sobre.core.methods import StepContext, task_weight
from sobre.prune.dsd2 import DistillationLoss, inject_label_noise
from sobre.prune.imp import MagnitudePruner, Reinitialize


def test_objective_is_alpha_t2_kl_plus_weighted_ce():
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    kd = DistillationLoss(teacher, T=4.0, alpha=0.8)
    out = student(x)
    loss = task_weight([kd]) * F.cross_entropy(out, y) + kd(StepContext(student, x, y, out))
    p_t = F.softmax(teacher(x) / 4, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(out / 4, dim=1))).sum(1).mean()
    expected = 0.8 * 16 * kl + 0.2 * F.cross_entropy(out, y)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None


def test_teacher_is_not_part_of_the_student():
    teacher = torch.nn.Linear(5, 3)
    kd = DistillationLoss(teacher)
    assert list(kd.parameters()) == [] and kd.state_dict() == {}
    assert teacher.training and teacher.weight.requires_grad  # the caller's model is untouched
    same = DistillationLoss(copy.deepcopy(teacher), alpha=1.0)
    x = torch.randn(4, 5)
    assert float(same(StepContext(teacher, x, None, teacher(x)))) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="alpha"):
        DistillationLoss(teacher, alpha=1.5)


def test_label_noise_changes_exactly_the_first_eps_fraction():
    labels = torch.arange(100) % 10
    data = TensorDataset(torch.zeros(100, 2), labels)
    noisy = inject_label_noise(data, eps=0.2, num_classes=10, seed=3)
    assert len(noisy) == 100 and noisy.noisy.tolist() == list(range(20))
    changed = noisy.labels != labels
    assert changed[:20].all() and not changed[20:].any()
    assert ((noisy.labels >= 0) & (noisy.labels < 10)).all()
    assert torch.equal(noisy[5][1], noisy.labels[5])
    again = inject_label_noise(data, eps=0.2, num_classes=10, seed=3)
    assert torch.equal(again.labels, noisy.labels)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        inject_label_noise(data, eps=1.0, num_classes=10)


def test_shuffled_label_noise_hits_a_seeded_random_subset():
    labels = torch.arange(200) // 20  # sorted by class, as mnist5k's train split
    data = TensorDataset(torch.zeros(200, 2), labels)
    noisy = inject_label_noise(data, eps=0.25, num_classes=10, seed=1, shuffle=True)
    changed = torch.nonzero(noisy.labels != labels).flatten()
    assert changed.tolist() == noisy.noisy.tolist() and len(changed) == 50
    assert len(set(labels[changed].tolist())) >= 8  # not only the first classes
    other = inject_label_noise(data, eps=0.25, num_classes=10, seed=2, shuffle=True)
    assert not torch.equal(other.noisy, noisy.noisy)


def test_from_stage_teacher_is_bound_later_and_required_before_use():
    x = torch.randn(4, 5)
    kd = DistillationLoss(from_stage="teacher")
    ctx = StepContext(torch.nn.Linear(5, 3), x, None, torch.randn(4, 3))
    with pytest.raises(ConfigError, match="no teacher yet"):
        kd(ctx)
    teacher = torch.nn.Linear(5, 3)
    kd.bind_stage_model(teacher)
    assert kd(ctx) >= 0 and kd.teacher is not teacher and not kd.teacher.training
    assert not list(kd.parameters())  # the teacher is not part of the student's checkpoint
    with pytest.raises(ConfigError, match="exactly one"):
        DistillationLoss()
    with pytest.raises(ConfigError, match="exactly one"):
        DistillationLoss(teacher, from_stage="teacher")


def test_pruner_and_reinitialize_as_stage_transforms():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    pruner = MagnitudePruner(amount=0.5)
    assert pruner.report() == {}
    assert pruner.apply(net) is net
    report = pruner.report()
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01) and "layers" not in report
    before = net[0].weight.detach().clone()
    assert Reinitialize(seed=3).apply(net) is net
    after = net[0].weight.detach()
    assert not torch.equal(before[before != 0], after[before != 0])  # fresh weights ...
    assert (after[before == 0] == 0).all()  # ... under the same masks
