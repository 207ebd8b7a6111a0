"""Stanford Cars-196: ``cars_annos.mat`` + ``car_ims/``, or the devkit layout; classes 1-98 / 99-196, all 16,185 images.

Devkit layout: ``devkit/cars_meta.mat``, ``devkit/cars_train_annos.mat``, ``cars_test_annos_withlabels.mat``
(in ``devkit/`` or the root), ``cars_train/``, ``cars_test/``. The official train/test flags are ignored:
the zero-shot split pools both and splits by class.
"""
from __future__ import annotations

import os

import numpy as np

from .base import DatasetError, FileImageDataset, half_split, require_file

NAME = "Stanford Cars-196"


def _loadmat(path: str) -> dict:
    from scipy.io import loadmat

    require_file(path, NAME)
    try:
        return loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises ValueError / TypeError / MatReadError for damaged files
        raise DatasetError(f"{NAME}: cannot read {path}: {type(e).__name__}: {e}") from e


def _variable(mat: dict, key: str, path: str):
    if key not in mat:
        raise DatasetError(f"{NAME}: {path} has no variable {key!r}")
    return np.atleast_1d(mat[key])


def _annotations(path: str, fields: tuple) -> list[tuple]:
    """(field values...) per entry of the ``annotations`` struct array, erroring on a missing/bad field."""
    rows = []
    entries = _variable(_loadmat(path), "annotations", path)
    if not len(entries):
        raise DatasetError(f"{NAME}: {path}: 'annotations' is empty")
    for n, entry in enumerate(entries, 1):
        values = []
        for f in fields:
            if not hasattr(entry, f):
                raise DatasetError(f"{NAME}: {path}: annotation {n} has no field {f!r}")
            v = getattr(entry, f)
            try:
                values.append(str(v) if f in ("relative_im_path", "fname") else int(v))
            except (TypeError, ValueError):
                raise DatasetError(f"{NAME}: {path}: annotation {n} has a malformed {f!r}: {v!r}") from None
        rows.append(tuple(values))
    return rows


def _class_names(path: str) -> list[str]:
    names = [str(v) for v in _variable(_loadmat(path), "class_names", path)]
    if not names:
        raise DatasetError(f"{NAME}: {path}: 'class_names' is empty")
    return names


def _find(root: str, name: str) -> str:
    for candidate in (os.path.join(root, "devkit", name), os.path.join(root, name)):
        if os.path.isfile(candidate):
            return candidate
    raise DatasetError(f"{NAME}: missing file {os.path.join(root, 'devkit', name)} (also looked in {root})")


def load_cars(root: str, split: str = "train", image_size: int | None = None, check_files: bool = True):
    """Reads ``cars_annos.mat`` when present, else the devkit layout."""
    combined = os.path.join(root, "cars_annos.mat")
    if os.path.isfile(combined):
        names = _class_names(combined)
        items = [(os.path.join(root, rel), cls) for rel, cls in _annotations(combined, ("relative_im_path", "class"))]
        source = combined
    elif os.path.isdir(os.path.join(root, "devkit")) or os.path.isdir(os.path.join(root, "cars_train")):
        names = _class_names(_find(root, "cars_meta.mat"))
        items = []
        for annos, folder in (("cars_train_annos.mat", "cars_train"), ("cars_test_annos_withlabels.mat", "cars_test")):
            items += [(os.path.join(root, folder, fname), cls)
                      for fname, cls in _annotations(_find(root, annos), ("fname", "class"))]
        source = _find(root, "cars_meta.mat")
    else:
        raise DatasetError(f"{NAME}: missing file {combined} (or the devkit layout: devkit/cars_meta.mat, "
                           f"devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/)")
    for path, cls in items:
        if not 1 <= cls <= len(names):
            raise DatasetError(f"{NAME}: image {path} has class {cls}, outside 1..{len(names)} ({source})")
    keep = half_split(range(1, len(names) + 1), split, NAME)
    label_of = {c: i for i, c in enumerate(keep)}
    paths = [p for p, c in items if c in label_of]
    labels = [label_of[c] for p, c in items if c in label_of]
    return FileImageDataset(NAME, split, paths, labels, [names[c - 1] for c in keep], image_size=image_size,
                            check_files=check_files)
