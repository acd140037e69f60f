#!/usr/bin/env bash
# One paper row from nothing to an evaluated table: data -> experts -> shortcut trajectories ->
# distillation -> evaluation. Every stage that is already done is skipped, and an interrupted one
# continues, so calling it again after an interruption picks up where it stopped:
#   data          sh/prepare_data.sh DATASET (idempotent)
#   experts       sh/buffer.sh, only for the experts missing from the folder (NUM_EXPERTS, default 20)
#   shortcuts     sh/convexify.sh (skips converted files)
#   distillation  sh/distill.sh, with --resume when the run has a checkpoint (a finished run returns at
#                 once; one made with other flags is refused, never reused)
#   evaluation    sh/eval.sh, every time (mean ± std over fresh students)
# Usage: bash sh/reproduce.sh GPU [RECIPE]   (RECIPE default: flickr500; GPU cpu: no GPU)
#   RECIPE   flickr500 flickr200 flickr100 coco500 coco200 coco100 cc3m500 cc3m200 cc3m100
#            stamps20 stamps50 stamps100: real photographs (Tux Paint stamps) through a frozen ImageNet
#            EfficientNet-Lite0 and MiniLM, on a CPU in minutes: bash sh/reproduce.sh cpu stamps50
# Extra flags per stage: BUFFER_FLAGS, CONVEXIFY_FLAGS, DISTILL_FLAGS, EVAL_FLAGS (space-separated),
# e.g. DISTILL_FLAGS="--keep_graphs 0" bash sh/reproduce.sh 0 flickr500. SKIP_DATA=1 skips the download
# step (data already in place).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
positional sh/reproduce.sh flickr500 "$@"
RECIPE="$NAME"
DATASET="$(dataset_of_recipe "$RECIPE")"
if is_stamps "$DATASET"; then NUM_EXPERTS="${NUM_EXPERTS:-5}"; else NUM_EXPERTS="${NUM_EXPERTS:-20}"; fi
read -r -a BUFFER_EXTRA <<< "${BUFFER_FLAGS:-}"
read -r -a CONVEXIFY_EXTRA <<< "${CONVEXIFY_FLAGS:-}"
read -r -a DISTILL_EXTRA <<< "${DISTILL_FLAGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_FLAGS:-}"
stage() { echo "== reproduce $RECIPE: $*" >&2; }

if [[ -z "${SKIP_DATA:-}" ]]; then
  stage "data"
  bash sh/prepare_data.sh "$DATASET"
fi

HAVE="$(${PYTHON:-python} -c "import sys; from pathlib import Path; from distill_utils.experts.trajectories import twin_indices
p = Path(sys.argv[1]); print(len(twin_indices(p)) if p.is_dir() else 0)" "$(normal_dir_of "$DATASET")")"
if (( HAVE < NUM_EXPERTS )); then
  stage "experts: $HAVE of $NUM_EXPERTS in $(normal_dir_of "$DATASET"), training $((NUM_EXPERTS - HAVE))"
  bash sh/buffer.sh "$GPU_ARG" "$DATASET" "${BUFFER_EXTRA[@]}" --num_experts "$((NUM_EXPERTS - HAVE))"
else
  stage "experts: $HAVE of $NUM_EXPERTS already there"
fi

stage "shortcut trajectories"
bash sh/convexify.sh "$DATASET" "${CONVEXIFY_EXTRA[@]}"

RUN="$LOGGED_DIR/$DATASET/$RECIPE"
FINISHED="$(${PYTHON:-python} -c "import sys; from distill_utils.runtime.runs import RunFolder
print(int(RunFolder(sys.argv[1]).finished()))" "$RUN")"
if [[ -f "$RUN/latest.pt" ]]; then
  # a finished run returns at once; one made with other flags is refused by the distiller, never reused
  if [[ "$FINISHED" == 1 ]]; then stage "distillation: $RUN is finished (its flags are checked)"
  else stage "distillation: resuming $RUN"; fi
  bash sh/distill.sh "$GPU_ARG" "$RECIPE" "${DISTILL_EXTRA[@]}" --resume
else
  stage "distillation -> $RUN"
  bash sh/distill.sh "$GPU_ARG" "$RECIPE" "${DISTILL_EXTRA[@]}"
fi

stage "evaluation"
bash sh/eval.sh "$GPU_ARG" "$RECIPE" "${EVAL_EXTRA[@]}"
