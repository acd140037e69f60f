#!/usr/bin/env bash
# Methods side by side (MTT-VL, LoRS, PTM-ST, AMD, RepBlend) on the built-in shapes data, or with --dataset stamps
# (or --dataset folder --image_root DIR) on real photographs through the frozen ImageNet EfficientNet-Lite0 with
# budgets 20 50 100 and a full-data row: shared experts, equal budgets and iterations, val protocol (paper
# protocol beside it), mean ± std over seeds, a report folder; random, herding, k-center and forgetting subsets
# as reference rows, and with --students a cross-architecture table.
# Usage: bash sh/ablation.sh [--workdir DIR] [--preset default|quick] [--seeds 0 1 2] [--budgets 20 40]
#                            [--methods mttvl lors ptmst amd repblend] [--coresets herding kcenter forgetting]
#                            [--students convnet ...] [--launcher local|slurm|submitit_local --slurm_partition P
#                            --slurm_gpus N --slurm_time MIN --slurm_max_parallel N --slurm_param KEY=VALUE ...]
#                            [any distill_ptm-st.py flag, e.g. --syn_steps 4]
# --launcher slurm runs every distillation and every set's students as submitit job arrays (docs/usage.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-disabled}"
python -m distill_utils.app.ablation "$@"
