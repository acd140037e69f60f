"""Datasets in the BLIP/Karpathy JSON layout, their transforms, and the built-in ``shapes`` dataset."""
from .captions import pre_caption
from .datasets import (DATASETS, DataError, RetrievalEvalDataset, RetrievalTrainDataset, build_datasets,
                       dataset_spec, load_annotation, load_image, resolve_roots)
from .folder import FolderSplit
from .transforms import CLIP_MEAN, CLIP_STD, denormalize, test_transform, train_transform

__all__ = ["pre_caption", "DATASETS", "DataError", "RetrievalEvalDataset", "RetrievalTrainDataset",
           "build_datasets", "dataset_spec", "load_annotation", "load_image", "resolve_roots", "CLIP_MEAN",
           "CLIP_STD", "FolderSplit", "denormalize", "test_transform", "train_transform"]
