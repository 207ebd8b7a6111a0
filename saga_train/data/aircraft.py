"""FGVC-Aircraft 2013b (data/variants.txt, data/images_variant_{trainval,test}.txt, data/images/).

Zero-shot split: the 100 variants sorted alphabetically, first 50 train, last 50 test, trainval and
test images pooled; the 20-pixel copyright banner at the bottom of every image is cropped.
"""
from __future__ import annotations

import os

from .base import DatasetError, FileImageDataset, half_split, read_table

NAME = "FGVC-Aircraft"
BANNER_PX = 20


def _data_dir(root: str) -> str:
    """Accept the dataset root (holding data/) or the data/ directory itself."""
    inner = os.path.join(root, "data")
    return inner if os.path.isdir(inner) else root


def load_aircraft(root: str, split: str = "train", image_size: int | None = None, check_files: bool = True,
                  crop_banner: bool = True):
    data = _data_dir(root)
    variants_path = os.path.join(data, "variants.txt")
    variants = [row[0] for row in read_table(variants_path, NAME, 1, int_columns=(), rest=True)]
    if len(set(variants)) != len(variants):
        raise DatasetError(f"{NAME}: {variants_path} lists a variant twice")
    keep = half_split(variants, split, NAME)
    label_of = {v: i for i, v in enumerate(keep)}
    paths, labels = [], []
    for part in ("trainval", "test"):
        path = os.path.join(data, f"images_variant_{part}.txt")
        for image_id, variant in read_table(path, NAME, 2, int_columns=(), rest=True):
            if variant not in variants:
                raise DatasetError(f"{NAME}: {path}: image {image_id} has variant {variant!r}, "
                                   f"which {variants_path} does not list")
            if variant in label_of:
                paths.append(os.path.join(data, "images", f"{image_id}.jpg"))
                labels.append(label_of[variant])
    return FileImageDataset(NAME, split, paths, labels, keep, crop_bottom=BANNER_PX if crop_banner else 0,
                            image_size=image_size, check_files=check_files)
