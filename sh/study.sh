#!/usr/bin/env bash
# Where phased teachers and shortcut trajectories help, on ten-epoch experts (docs/findings.md has what each shows):
#   teacher_stage  one-phase distillation with its start window slid along the experts' epochs (paper Fig. 2a)
#   gradients      norm and cosine similarity of the matching gradient across start epochs, normal vs shortcut
#                  trajectories (Figs. 2b, 4)
#   components     BASE, +EMA, +PTM, +ST, PTM+ST at equal and at per-phase iterations (the ablation table)
#   schedule       the student schedules (--student_schedule, --phase_lr own) on PTM-ST's and random split sets
#   scale          MTT-VL, LoRS, PTM-ST (the authors' phases) and random pairs at 50-500 pairs of 10,000 shapes
#                  pairs: where the phases pay off (--preset quick: seed 0, budgets 50 and 500)
# Usage: bash sh/study.sh STUDY [--workdir DIR] [--seeds ...] [--budgets ...] [--iterations N] [study flags, see
#                               --help] [--launcher local|slurm|submitit_local, --slurm_* flags: docs/usage.md]
#                               [any distill_ptm-st.py or buffer.py flag, e.g. --dataset stamps]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-disabled}"
python -m distill_utils.app.study "$@"
