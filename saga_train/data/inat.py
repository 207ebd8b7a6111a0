"""iNaturalist-2021 birds (train_mini.json, COCO-style, + its image tree).

Zero-shot split: the species whose class is Aves (``"class": "Aves"``, or a supercategory named
"Aves" / "Birds"), sorted by category id; first half train, second half test (743 / 743 in 2021).
"""
from __future__ import annotations

import json
import os

from .base import DatasetError, FileImageDataset, half_split, require_file

NAME = "iNaturalist-2021 Aves"


def is_bird(category: dict) -> bool:
    return category.get("class") == "Aves" or category.get("supercategory") in ("Aves", "Birds")


def load_inat_aves(root: str, split: str = "train", image_size: int | None = None, check_files: bool = True,
                   annotation_file: str = "train_mini.json"):
    path = require_file(os.path.join(root, annotation_file), NAME)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{NAME}: {path}:{e.lineno}: malformed JSON: {e.msg}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(meta.get(key) if isinstance(meta, dict) else None, list):
            raise DatasetError(f"{NAME}: {path} has no list {key!r} (expected COCO-style train_mini.json)")

    def field(entry, key, where):
        if not isinstance(entry, dict) or key not in entry:
            raise DatasetError(f"{NAME}: {path}: {where} entry without {key!r}: {str(entry)[:200]}")
        return entry[key]

    birds = {field(c, "id", "categories"): c for c in meta["categories"] if is_bird(c)}
    if not birds:
        raise DatasetError(f"{NAME}: {path} has no category of class Aves")
    keep = half_split(birds, split, NAME)
    label_of = {cid: i for i, cid in enumerate(keep)}
    file_of = {field(im, "id", "images"): field(im, "file_name", "images") for im in meta["images"]}
    paths, labels = [], []
    for ann in meta["annotations"]:
        cid = field(ann, "category_id", "annotations")
        if cid not in label_of:
            continue
        image_id = field(ann, "image_id", "annotations")
        if image_id not in file_of:
            raise DatasetError(f"{NAME}: {path}: annotation for image id {image_id}, which 'images' does not list")
        paths.append(os.path.join(root, file_of[image_id]))
        labels.append(label_of[cid])
    names = [birds[c].get("common_name") or birds[c].get("name") or str(c) for c in keep]
    return FileImageDataset(NAME, split, paths, labels, names, image_size=image_size, check_files=check_files)
