"""Each loss against a formula written out entry by entry."""
import math

import pytest
import torch

from distill_utils import MultilabelContrastiveLoss


def _softmax_row(z, i):
    m = max(z[i])
    exps = [math.exp(v - m) for v in z[i]]
    total = sum(exps)
    return [e / total for e in exps]


def _transpose(m):
    return [list(col) for col in zip(*m)]


def _soft_ce(z, s, normalise_rows=False):
    n = len(z)
    total = 0.0
    for i in range(n):
        p = _softmax_row(z, i)
        row_sum = sum(s[i]) + 1e-6 if normalise_rows else 1.0  # the reference's + 1e-6
        total += -sum(s[i][j] / row_sum * math.log(p[j]) for j in range(n))
    return total / n


def reference(loss_type, z, s):
    n = len(z)
    sig = [[1 / (1 + math.exp(-v)) for v in row] for row in z]
    if loss_type in ("InfoNCE", "NCE"):
        return 0.5 * (_soft_ce(z, s) + _soft_ce(_transpose(z), _transpose(s)))
    if loss_type == "CWCL":
        return 0.5 * (_soft_ce(z, s, True) + _soft_ce(_transpose(z), _transpose(s), True))
    if loss_type in ("WBCE", "BalanceBCE"):
        pos, neg = [], []
        for i in range(n):
            for j in range(n):
                p, t = sig[i][j], s[i][j]
                value = -(t * math.log(p + 1e-6) + (1 - t) * math.log(1 - p + 1e-6))
                (pos if t > 0.5 else neg).append(value)
        return 0.5 * (sum(pos) / (len(pos) + 1e-6) + sum(neg) / (len(neg) + 1e-6))  # the reference's counts
    if loss_type == "BCE":
        return sum(-(s[i][j] * math.log(sig[i][j]) + (1 - s[i][j]) * math.log(1 - sig[i][j]))
                   for i in range(n) for j in range(n)) / n ** 2
    if loss_type == "MSE":
        return sum((sig[i][j] - s[i][j]) ** 2 for i in range(n) for j in range(n)) / n ** 2
    if loss_type == "KL":
        def one(z_, s_):
            total = 0.0
            for i in range(n):
                target = _softmax_row([[10 * v for v in row] for row in s_], i)
                q = _softmax_row(z_, i)
                total += sum(target[j] * (math.log(target[j]) - math.log(q[j])) for j in range(n))
            return total / n ** 2
        return 0.5 * (one(z, s) + one(_transpose(z), _transpose(s)))
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", ["InfoNCE", "NCE", "WBCE", "BalanceBCE", "BCE", "KL", "MSE", "CWCL"])
def test_loss_matches_written_out_formula(loss_type):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 5, generator=generator, dtype=torch.float64) * 3
    target = torch.eye(5, dtype=torch.float64) * 0.8 + torch.rand(5, 5, generator=generator, dtype=torch.float64) * 0.3
    got = MultilabelContrastiveLoss(loss_type)(logits, target).item()
    want = reference(loss_type, logits.tolist(), target.tolist())
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_infonce_with_identity_is_plain_cross_entropy():
    logits = torch.randn(6, 6, dtype=torch.float64)
    labels = torch.arange(6)
    plain = 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels))
    assert MultilabelContrastiveLoss("InfoNCE")(logits, torch.eye(6, dtype=torch.float64)).item() == pytest.approx(plain.item())


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss_type"):
        MultilabelContrastiveLoss("Hinge")
