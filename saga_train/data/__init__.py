"""Datasets, splits and samplers for SAGA training and zero-shot retrieval evaluation."""

from .base import DatasetError, FileImageDataset, ImageLoadError
from .registry import DATASETS, load_dataset
from .samplers import ClassBalancedBatchSampler, sample_pairs
from .synthetic import ATTRIBUTES, SyntheticBirds

__all__ = ["ATTRIBUTES", "DATASETS", "ClassBalancedBatchSampler", "DatasetError", "FileImageDataset",
           "ImageLoadError", "SyntheticBirds", "load_dataset", "sample_pairs"]
