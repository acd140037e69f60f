#!/usr/bin/env bash
# Evaluate a finished recipe's run beside a random real subset of the same size: the data and model
# flags and the last checkpoint of every phase come from the run's args.json (eval.py --run).
# Usage: bash sh/eval.sh GPU [RECIPE [eval.py flags...]]   (RECIPE default: flickr500)
#   RECIPE   flickr500 ... cc3m100, stamps20 stamps50 stamps100 (stamps: val protocol, random, split-random and full-data rows)
#   flags    override, e.g. --eval_protocol val --phase_lr own (choose on val, report test),
#            --baseline random herding kcenter forgetting full (coresets of the run's experts),
#            --student_image_encoder convnet (cross-architecture students), --num_eval 3
# Paper protocol by default (the authors'; what the paper tables report).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
positional sh/eval.sh flickr500 "$@"
export CUDA_VISIBLE_DEVICES="$GPU"
RECIPE="$NAME"
DATASET="$(dataset_of_recipe "$RECIPE")"

if is_stamps "$RECIPE"; then  # the ablation's protocol on the stamps: val protocol, 3 students, full-data row
  exec ${PYTHON:-python} eval.py --run "$LOGGED_DIR/$DATASET/$RECIPE" --num_eval 3 --epoch_eval_train 50 \
      --eval_protocol val --baseline random random_split full --num_workers 0 --disabled_wandb true "${REST[@]}"
fi

${PYTHON:-python} eval.py --run "$LOGGED_DIR/$DATASET/$RECIPE" --num_eval 5 --epoch_eval_train 100 \
    --baseline random --disabled_wandb true "${REST[@]}"
