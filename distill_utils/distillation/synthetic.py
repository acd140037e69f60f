"""The learnable synthetic set of one phase: images, text features, a similarity generator, step sizes.

Similarity generators hand out differentiable *blocks* S[B, B] for a mini-batch B. For the exact
constant-memory gradient the matcher works on detached per-batch leaves and scatters their
gradients back (``gather`` / ``scatter_grad``), so no full-size graph is built per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn


class FullSimilarity(nn.Module):
    """A free n x n matrix, initialised to the identity."""

    kind = "full"

    def __init__(self, n: int):
        super().__init__()
        self.matrix = nn.Parameter(torch.eye(n))

    def matrix_full(self) -> torch.Tensor:
        return self.matrix

    def gather(self, idx: torch.Tensor) -> Tuple[List[torch.Tensor], Callable[..., torch.Tensor]]:
        leaf = self.matrix.detach()[idx][:, idx].clone().requires_grad_(True)
        return [leaf], lambda block: block

    def scatter_grad(self, idx: torch.Tensor, grads: List[torch.Tensor]) -> None:
        if self.matrix.grad is None:
            self.matrix.grad = torch.zeros_like(self.matrix)
        self.matrix.grad.index_put_((idx[:, None], idx[None, :]), grads[0], accumulate=True)

    def block(self, idx: torch.Tensor) -> torch.Tensor:
        return self.matrix[idx][:, idx]


class LowRankSimilarity(nn.Module):
    """S = diag(a) + (alpha / r) L R^T with a = 1, L ~ N(0, 1), R = 0 (so S starts at the identity)."""

    kind = "lowrank"

    def __init__(self, n: int, rank: int, alpha: float = 1.0, generator: torch.Generator = None):
        super().__init__()
        self.scale = alpha / rank
        self.diag = nn.Parameter(torch.ones(n))
        self.left = nn.Parameter(torch.randn(n, rank, generator=generator))
        self.right = nn.Parameter(torch.zeros(n, rank))

    def _compose(self, diag: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return torch.diag(diag) + self.scale * left @ right.t()

    def matrix_full(self) -> torch.Tensor:
        return self._compose(self.diag, self.left, self.right)

    def gather(self, idx):
        leaves = [p.detach()[idx].clone().requires_grad_(True) for p in (self.diag, self.left, self.right)]
        return leaves, self._compose

    def scatter_grad(self, idx, grads) -> None:
        for parameter, grad in zip((self.diag, self.left, self.right), grads):
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            parameter.grad.index_add_(0, idx, grad)

    def block(self, idx: torch.Tensor) -> torch.Tensor:
        return self._compose(self.diag[idx], self.left[idx], self.right[idx])


def make_similarity(kind: str, n: int, rank: int = 10, alpha: float = 1.0,
                    generator: torch.Generator = None) -> nn.Module:
    if kind == "full":
        return FullSimilarity(n)
    if kind == "lowrank":
        return LowRankSimilarity(n, rank, alpha, generator)
    raise ValueError(f"--sim_type must be full or lowrank, got {kind!r}")


class SyntheticSet(nn.Module):
    """n synthetic pairs: ``images`` (n, 3, H, W), ``texts`` (n, d), ``similarity`` and the learned
    step sizes ``syn_lr_img`` / ``syn_lr_txt`` (scalars). With ``learn_similarity=False`` the
    similarity is a constant (MTT-VL's fixed pairing): it gets no gradient and no optimizer group."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor, similarity: nn.Module,
                 lr_img: float, lr_txt: float, learn_similarity: bool = True):
        super().__init__()
        self.images = nn.Parameter(images.clone())
        self.texts = nn.Parameter(texts.clone())
        self.similarity = similarity
        self.learn_similarity = learn_similarity
        if not learn_similarity:
            similarity.requires_grad_(False)
        self.syn_lr_img = nn.Parameter(torch.tensor(float(lr_img)))
        self.syn_lr_txt = nn.Parameter(torch.tensor(float(lr_txt)))

    def similarity_inputs(self, idx: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """The block S[idx, idx] and the detached leaves it was composed from (none when the similarity
        is not learned), for the matcher's per-batch graphs."""
        if not self.learn_similarity:
            with torch.no_grad():
                return [], self.similarity.block(idx)
        leaves, compose = self.similarity.gather(idx)
        return leaves, compose(*leaves)

    def __len__(self) -> int:
        return self.images.shape[0]

    def step_size(self, side: str) -> nn.Parameter:
        return self.syn_lr_img if side == "image" else self.syn_lr_txt

    def param_groups(self, rates: "SyntheticRates") -> List[Dict]:
        """SGD groups: images, texts, step sizes and (when learned) the similarity parameters, each
        with its lr and momentum."""
        groups = [
            {"params": [self.images], "lr": rates.lr_img, "momentum": rates.momentum_syn},
            {"params": [self.texts], "lr": rates.lr_txt, "momentum": rates.momentum_syn},
            {"params": [self.syn_lr_img, self.syn_lr_txt], "lr": rates.lr_lr, "momentum": rates.momentum_lr},
        ]
        if self.learn_similarity:
            groups.append({"params": list(self.similarity.parameters()), "lr": rates.lr_sim,
                           "momentum": rates.momentum_sim})
        return groups


@dataclass(frozen=True)
class SyntheticRates:
    """Learning rates and momenta of the synthetic set's four parameter groups."""
    lr_img: float
    lr_txt: float
    lr_lr: float
    lr_sim: float
    momentum_syn: float = 0.5
    momentum_lr: float = 0.5
    momentum_sim: float = 0.5


class ExponentialMovingAverage:
    """EMA of every learnable tensor of a module; ``copy_to`` writes the averages into another copy."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, parameter in module.named_parameters():
            self.shadow[name].lerp_(parameter.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        for name, parameter in module.named_parameters():
            parameter.copy_(self.shadow[name])
        return module

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


@dataclass
class FrozenSubset:
    """A finished phase, as the student evaluation consumes it (EMA values, detached)."""
    images: torch.Tensor
    texts: torch.Tensor
    similarity: torch.Tensor  # n x n
    lr_img: float
    lr_txt: float

    @classmethod
    def from_set(cls, synthetic: SyntheticSet) -> "FrozenSubset":
        with torch.no_grad():
            return cls(synthetic.images.detach().clone(), synthetic.texts.detach().clone(),
                       synthetic.similarity.matrix_full().detach().clone(),
                       synthetic.syn_lr_img.item(), synthetic.syn_lr_txt.item())

    def __len__(self) -> int:
        return self.images.shape[0]
