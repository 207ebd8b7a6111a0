"""Datasets, splits and samplers for SAGA training and zero-shot retrieval evaluation."""

from .aircraft import load_aircraft
from .base import DatasetError, FileImageDataset, ImageLoadError
from .cars import load_cars
from .cub import load_cub
from .folder import load_folder
from .inat import load_inat_aves
from .registry import DATASETS, load_dataset
from .samplers import ClassBalancedBatchSampler, sample_pairs
from .synthetic import ATTRIBUTES, SyntheticBirds

__all__ = ["ATTRIBUTES", "DATASETS", "ClassBalancedBatchSampler", "DatasetError", "FileImageDataset",
           "ImageLoadError", "SyntheticBirds", "load_aircraft", "load_cars", "load_cub", "load_dataset", "load_folder",
           "load_inat_aves", "sample_pairs"]
