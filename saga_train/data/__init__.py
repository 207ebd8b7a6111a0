"""Datasets, splits and samplers for SAGA training and zero-shot retrieval evaluation.

The synthetic world's dataset lives in ``saga_train.synthetic``; ``load_dataset("synthetic")`` imports it on
demand, so the on-disk readers and the samplers never load it.
"""

from .aircraft import load_aircraft
from .base import DatasetError, FileImageDataset, ImageLoadError
from .cars import load_cars
from .cub import load_cub
from .folder import load_folder
from .inat import load_inat_aves
from .registry import DATASETS, load_dataset
from .samplers import ClassBalancedBatchSampler, sample_pairs

__all__ = ["DATASETS", "ClassBalancedBatchSampler", "DatasetError", "FileImageDataset", "ImageLoadError",
           "load_aircraft", "load_cars", "load_cub", "load_dataset", "load_folder", "load_inat_aves", "sample_pairs"]
