#!/usr/bin/env bash
# Evaluate a finished run against a random real subset of the same size. Usage: bash sh/eval.sh GPU_ID [RUN]
set -euo pipefail
export CUDA_VISIBLE_DEVICES="${1:?usage: bash sh/eval.sh GPU_ID [RUN]}"
RUN="${2:-flickr500}"
DATASET=flickr
RUN_DIR="./logged_files/${DATASET}/${RUN}"
ITERATION=2000

# Paper protocol (the reference's; what the paper tables report):
python eval.py --dataset "$DATASET" --image_encoder nfnet --text_encoder bert --image_trainable \
    --ckpt_path "$RUN_DIR/distilled_0_${ITERATION}.pt" "$RUN_DIR/distilled_1_${ITERATION}.pt" \
    --loss_type WBCE --num_eval 5 --epoch_eval_train 100 --baseline random --disabled_wandb true

# Held-out selection (choose the epoch on val, report test), each phase at its own step sizes:
# python eval.py --dataset "$DATASET" --image_encoder nfnet --text_encoder bert --image_trainable \
#     --ckpt_path "$RUN_DIR/distilled_0_${ITERATION}.pt" "$RUN_DIR/distilled_1_${ITERATION}.pt" \
#     --eval_protocol val --phase_lr own --baseline random full --disabled_wandb true
