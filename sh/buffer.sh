#!/usr/bin/env bash
# Expert trajectories for the paper's settings. Usage: bash sh/buffer.sh GPU_ID
# Several GPUs: replace "python" by "torchrun --nproc_per_node N" (each rank trains its own experts).
set -euo pipefail
export CUDA_VISIBLE_DEVICES="${1:?usage: bash sh/buffer.sh GPU_ID}"

BUFFER_PATH=./buffer
ANN_ROOT=./data/Annotation/
NUM_EXPERTS=20
TRAIN_EPOCHS=10

# Flickr30k: NFNet-L0 (trained) + BERT -> ./buffer/flickr/nfnet_bert/InfoNCE/normal
python buffer.py --dataset flickr --image_root ./distill_utils/data/Flickr30k/ --ann_root "$ANN_ROOT" \
    --image_encoder nfnet --text_encoder bert --image_pretrained true --image_trainable \
    --image_size 224 --num_experts "$NUM_EXPERTS" --train_epochs "$TRAIN_EPOCHS" \
    --lr_teacher_img 0.1 --lr_teacher_txt 0.1 --batch_size_train 128 --loss_type InfoNCE \
    --eval_freq 5 --buffer_path "$BUFFER_PATH" --disabled_wandb true

# COCO: -> ./buffer/coco/nfnet_bert/InfoNCE/normal
python buffer.py --dataset coco --image_root ./distill_utils/data/COCO/ --ann_root "$ANN_ROOT" \
    --image_encoder nfnet --text_encoder bert --image_pretrained true --image_trainable \
    --image_size 224 --num_experts "$NUM_EXPERTS" --train_epochs "$TRAIN_EPOCHS" \
    --lr_teacher_img 0.1 --lr_teacher_txt 0.1 --batch_size_train 128 --loss_type InfoNCE \
    --eval_freq 5 --buffer_path "$BUFFER_PATH" --disabled_wandb true

# CC3M: -> ./buffer/cc3m/nfnet_bert/InfoNCE/normal
python buffer.py --dataset cc3m --image_root ./distill_utils/data/CC3M/ --ann_root "$ANN_ROOT" \
    --image_encoder nfnet --text_encoder bert --image_pretrained true --image_trainable \
    --image_size 224 --num_experts "$NUM_EXPERTS" --train_epochs "$TRAIN_EPOCHS" \
    --lr_teacher_img 0.1 --lr_teacher_txt 0.1 --batch_size_train 128 --loss_type InfoNCE \
    --eval_freq 5 --buffer_path "$BUFFER_PATH" --disabled_wandb true

# DINOv2 + BGE (frozen image encoder, 768-d projections), as in the authors' buffer.sh:
# python buffer.py --dataset coco --image_root ./distill_utils/data/COCO/ --ann_root "$ANN_ROOT" \
#     --image_encoder vit_base_patch14_dinov2 --text_encoder bge --image_pretrained true \
#     --image_size 224 --out_embedding 768 --num_experts 5 --train_epochs "$TRAIN_EPOCHS" \
#     --buffer_path "$BUFFER_PATH" --disabled_wandb true
