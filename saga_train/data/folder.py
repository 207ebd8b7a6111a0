"""A folder of images, ``root/<class>/<image>`` (searched recursively inside each class folder).

Zero-shot split by sorted class-folder name: the first ``round(ratio * C)`` classes train, the rest test.
"""
from __future__ import annotations

import os

from .base import DatasetError, FileImageDataset, require_dir

NAME = "image folder"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def list_images(directory: str) -> list[str]:
    """Image files under ``directory``, recursively, sorted (by extension, case-insensitive)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def load_folder(root: str, split: str = "train", ratio: float = 0.5, image_size: int | None = None):
    require_dir(root, NAME)
    if not 0.0 < ratio < 1.0 and split != "all":
        raise ValueError(f"{NAME}: ratio must be in (0, 1), got {ratio}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if len(classes) < 2:
        raise DatasetError(f"{NAME}: {root} needs at least two class subfolders, found {len(classes)}")
    n_train = min(len(classes) - 1, max(1, round(ratio * len(classes))))
    keep = {"train": classes[:n_train], "test": classes[n_train:], "all": classes}.get(split)
    if keep is None:
        raise ValueError(f"{NAME}: split must be 'train', 'test' or 'all', got {split!r}")
    paths, labels = [], []
    for label, c in enumerate(keep):
        files = list_images(os.path.join(root, c))
        if not files:
            raise DatasetError(f"{NAME}: class folder {os.path.join(root, c)} holds no image "
                               f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(files)
        labels.extend([label] * len(files))
    return FileImageDataset(NAME, split, paths, labels, keep, image_size=image_size, check_files=False)
