"""iNaturalist-2021 birds (train_mini.json, COCO-style, + its image tree).

Zero-shot split: the species whose class is Aves (``"class": "Aves"``, or a supercategory named
"Aves" / "Birds"), sorted by category id; first half train, second half test (743 / 743 in 2021).
"""
from __future__ import annotations

import os

from ..files import field, list_field, read_json
from .base import DatasetError, FileImageDataset, half_split, require_file

NAME = "iNaturalist-2021 Aves"


def is_bird(category: dict) -> bool:
    return category.get("class") == "Aves" or category.get("supercategory") in ("Aves", "Birds")


def load_inat_aves(root: str, split: str = "train", image_size: int | None = None, check_files: bool = True,
                   annotation_file: str = "train_mini.json"):
    """A missing, empty, truncated or garbage annotation file, or an entry without a key it needs (or with a value
    of another type), raises DatasetError naming the file (and the entry)."""
    path = require_file(os.path.join(root, annotation_file), NAME)
    meta = read_json(path, error=DatasetError, what=NAME)
    sections = {key: list_field(meta, key, dict, path=path, error=DatasetError, what=NAME)
                for key in ("images", "annotations", "categories")}

    def entries(section: str, *keys):
        """``(entry, its values of keys)`` of every entry of ``section``, each value checked (ids: ints, file names:
        strings)."""
        for i, entry in enumerate(sections[section]):
            where = f"{section!r}[{i}]: "
            yield entry, [field(entry, key, str if key == "file_name" else int, path=path, error=DatasetError,
                                what=NAME, where=where) for key in keys]

    birds = {cid: c for c, (cid,) in entries("categories", "id") if is_bird(c)}
    if not birds:
        raise DatasetError(f"{NAME}: {path} has no category of class Aves")
    keep = half_split(birds, split, NAME)
    label_of = {cid: i for i, cid in enumerate(keep)}
    file_of = {image_id: file_name for _, (image_id, file_name) in entries("images", "id", "file_name")}
    paths, labels = [], []
    for _, (cid, image_id) in entries("annotations", "category_id", "image_id"):
        if cid not in label_of:
            continue
        if image_id not in file_of:
            raise DatasetError(f"{NAME}: {path}: annotation for image id {image_id}, which 'images' does not list")
        paths.append(os.path.join(root, file_of[image_id]))
        labels.append(label_of[cid])
    names = [str(birds[c].get("common_name") or birds[c].get("name") or c) for c in keep]
    return FileImageDataset(NAME, split, paths, labels, names, image_size=image_size, check_files=check_files)
