"""CUB-200-2011 (official layout: images.txt, image_class_labels.txt, classes.txt, images/); classes 1-100 / 101-200."""
from __future__ import annotations

import os

from .base import DatasetError, FileImageDataset, half_split, read_table

NAME = "CUB-200-2011"


def readable_class_name(raw: str) -> str:
    """"001.Black_footed_Albatross" -> "Black footed Albatross"."""
    return raw.split(".", 1)[-1].replace("_", " ")


def load_cub(root: str, split: str = "train", image_size: int | None = None, check_files: bool = True):
    """The zero-shot split of CUB: first half of the class ids (sorted) train, second half test."""
    images = read_table(os.path.join(root, "images.txt"), NAME, 2)
    image_labels = dict(read_table(os.path.join(root, "image_class_labels.txt"), NAME, 2, int_columns=(0, 1)))
    classes = dict(read_table(os.path.join(root, "classes.txt"), NAME, 2, rest=True))
    keep = half_split(classes, split, NAME)
    label_of = {cid: i for i, cid in enumerate(keep)}
    paths, labels = [], []
    for image_id, rel in images:
        if image_id not in image_labels:
            raise DatasetError(f"{NAME}: image id {image_id} ({rel}) has no line in "
                               f"{os.path.join(root, 'image_class_labels.txt')}")
        cid = image_labels[image_id]
        if cid not in classes:
            raise DatasetError(f"{NAME}: image id {image_id} has class {cid}, which "
                               f"{os.path.join(root, 'classes.txt')} does not list")
        if cid in label_of:
            paths.append(os.path.join(root, "images", rel))
            labels.append(label_of[cid])
    return FileImageDataset(NAME, split, paths, labels, [readable_class_name(classes[c]) for c in keep],
                            image_size=image_size, check_files=check_files)
