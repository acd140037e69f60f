"""Image transforms: CLIP normalisation; augmentation only for expert training."""
from __future__ import annotations

from torchvision import transforms
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_transform(image_size: int):
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def train_transform(image_size: int, augment: bool = True):
    if not augment:
        return test_transform(image_size)
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.RandAugment(num_ops=2, magnitude=5),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def denormalize(images):
    """Undo the CLIP normalisation of a (B, 3, H, W) tensor, for pictures."""
    import torch
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)
