#!/usr/bin/env bash
# The whole pipeline on the built-in shapes dataset: data -> experts -> shortcuts -> 2-phase distillation
# -> evaluation against a random real subset -> report. CPU is fine (GPU used when present).
# Usage: bash sh/quickstart.sh [--workdir DIR] [--seed N] [--preset default|smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-disabled}"
python -m distill_utils.app.quickstart "$@"
