#!/usr/bin/env bash
# Every check that needs a CUDA GPU: the gpu-marked tests and the GPU benchmarks of
# benchmarks/README.md. Each step is its own command, so the steps can be split across short sessions.
# Usage: bash sh/gpu_checks.sh [STEP ...]     (default: every step, in this order)
#   tests            pytest -m gpu (CUDA gradients equal the CPU's, dropout replay, speed switches, cache)
#   distill          benchmarks.distill_step, flickr500 config, default --keep_graphs auto (as many graphs
#                    as the GPU's memory allows)
#   distill_keep0    the same with --keep_graphs 0 (memory constant in the student steps)
#   distill_keep8    the same with --keep_graphs 8
#   distill_timm_ws  distill with NFNet's weight standardisation left inside the graphs, as timm's
#                    layers compute it (what factoring it out saves; see networks/weight_standardization.py)
#   profile          benchmarks.distill_profile, flickr500, --keep_graphs auto: busy vs wall time, top operators
#   expert           benchmarks.expert_step, nfnet224 config (TF32, channels-last, fused SGD, bf16)
#   read             benchmarks.trajectory_read on the GPU (snapshot fetch incl. the host-to-device copy)
#   segments         benchmarks.segments, nfnet_small config: seconds per iteration for 1, 2, 4 segments on
#                    one GPU, one after another and batched (vmap), the image encoder trainable then
#                    frozen (with 2+ GPUs visible, also 2 NCCL processes)
# Results: benchmarks/results/*.json plus gpu_checks.log; when $OUT is set they are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' sh/gpu_checks.sh | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # the test suite hides GPUs unless this is set

all_steps=(tests distill distill_keep0 distill_keep8 distill_timm_ws profile expert read segments)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=("${all_steps[@]}")
for step in "${steps[@]}"; do
  if [[ ! " ${all_steps[*]} " =~ " ${step} " ]]; then
    echo "sh/gpu_checks.sh: unknown step '${step}'; the steps are: ${all_steps[*]}" >&2
    exit 2
  fi
done

python3 - <<'EOF'
import os
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("sh/gpu_checks.sh: no CUDA device is visible (CUDA_VISIBLE_DEVICES="
             f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); these checks need one. "
             "On a machine without a GPU run the CPU commands of the README instead.")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, Python {sys.version.split()[0]}")
EOF

mkdir -p benchmarks/results
log=benchmarks/results/gpu_checks.log
started=$(mktemp)
run_step() {
  echo "== $1 =="
  case $1 in
    tests) python3 -m pytest -q -m gpu -p no:cacheprovider ;;
    distill) python3 -m benchmarks.distill_step --device cuda --config flickr500 ;;
    distill_keep0) python3 -m benchmarks.distill_step --device cuda --config flickr500 --keep_graphs 0 ;;
    distill_keep8) python3 -m benchmarks.distill_step --device cuda --config flickr500 --keep_graphs 8 ;;
    distill_timm_ws) python3 -m benchmarks.distill_step --device cuda --config flickr500 --standardization timm ;;
    profile) python3 -m benchmarks.distill_profile --device cuda --config flickr500 --keep_graphs auto ;;
    expert) python3 -m benchmarks.expert_step --device cuda --config nfnet224 ;;
    read) python3 -m benchmarks.trajectory_read --device cuda ;;
    segments) local gpus; gpus="$(python3 -c 'import torch; print(min(2, torch.cuda.device_count()))')"
              python3 -m benchmarks.segments --device cuda --config nfnet_small --processes "$gpus"
              python3 -m benchmarks.segments --device cuda --config nfnet_small --processes "$gpus" \
                --encoder frozen ;;
    *) echo "sh/gpu_checks.sh: step '$1' is in all_steps but has no command in run_step" >&2; return 2 ;;
  esac
}
copy_results_out() {  # after every step, so a run stopped at a time limit keeps what finished
  if [ -n "${OUT:-}" ]; then
    cp "$log" "$OUT"/
    find benchmarks/results -name '*.json' -newer "$started" -exec cp {} "$OUT"/ \;
  fi
}
status=0
for step in "${steps[@]}"; do
  SECONDS=0
  run_step "$step" 2>&1 | tee -a "$log" || status=1
  echo "== $step: ${SECONDS} s ==" | tee -a "$log"
  copy_results_out
done
rm -f "$started"
exit "$status"
