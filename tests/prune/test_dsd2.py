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
