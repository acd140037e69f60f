#!/usr/bin/env bash
# Expert trajectories of the paper (NFNet-L0 trained + frozen BERT features, 20 experts x 10 epochs,
# InfoNCE) for one dataset, into $BUFFER_ROOT/DATASET/nfnet_bert/InfoNCE/normal/.
# Usage: bash sh/buffer.sh GPU [DATASET [buffer.py flags...]]   (DATASET default: flickr)
#   GPU       CUDA_VISIBLE_DEVICES, e.g. 0 or 0,1,2,3
#   DATASET   flickr, coco, cc3m or stamps (stamps: EfficientNet-Lite0 ImageNet weights frozen + MiniLM, 5 experts)
#   flags     passed to buffer.py after the recipe's own, so they override them (e.g. --num_experts 5)
# Several GPUs: NPROC=4 bash sh/buffer.sh 0,1,2,3 flickr   (torchrun; each rank trains its own experts)
# Reruns add experts (new indices and seeds); they never overwrite or repeat one.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
positional sh/buffer.sh flickr "$@"
export CUDA_VISIBLE_DEVICES="$GPU"
DATASET="$NAME"
IMAGE_ROOT="$(image_root_of "$DATASET")"

if is_stamps "$DATASET"; then  # 5 experts x 10 epochs of the projection heads over a frozen ImageNet encoder (SGD 0.02: see docs/real_data.md)
  $(launcher) buffer.py --dataset stamps --image_root "$IMAGE_ROOT" --ann_root "$(ann_root_of stamps)" \
      "${STAMPS_MODEL[@]}" --num_experts 5 --train_epochs 10 --batch_size_train 32 --no_aug \
      --lr_teacher_img 0.02 --lr_teacher_txt 0.02 --loss_type InfoNCE --eval_freq 10 --buffer_path "$BUFFER_ROOT" \
      --disabled_wandb true "${REST[@]}"
  exit 0
fi

# the authors' cc3m runs keep the image encoder frozen (projection heads on both sides); flickr and coco train it
IMAGE_SIDE=(--image_trainable); [ "$DATASET" = cc3m ] && IMAGE_SIDE=(--image_trainable false)
$(launcher) buffer.py --dataset "$DATASET" --image_root "$IMAGE_ROOT" --ann_root "$ANN_ROOT" \
    --image_encoder nfnet --text_encoder bert --image_pretrained true "${IMAGE_SIDE[@]}" \
    --image_size 224 --num_experts 20 --train_epochs 10 \
    --lr_teacher_img 0.1 --lr_teacher_txt 0.1 --batch_size_train 128 --loss_type InfoNCE \
    --eval_freq 5 --buffer_path "$BUFFER_ROOT" --disabled_wandb true "${REST[@]}"

# DINOv2 + BGE (frozen image encoder, 768-d projections), as in the authors' buffer.sh:
#   bash sh/buffer.sh 0 coco --image_encoder vit_base_patch14_dinov2 --text_encoder bge \
#       --image_trainable false --out_embedding 768 --num_experts 5
