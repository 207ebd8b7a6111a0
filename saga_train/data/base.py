"""What every on-disk reader shares: the dataset object, clear errors, and line-numbered table parsing."""
from __future__ import annotations

import os
from collections import Counter
from typing import Sequence

from PIL import Image

from ..errors import UserError
from ..files import open_image, read_lines


class DatasetError(UserError, ValueError):
    """A dataset on disk is missing a file or has a malformed entry; the message names the file."""


class ImageLoadError(DatasetError):
    """An image file cannot be opened or decoded; the message names the file."""


def require_file(path: str, what: str) -> str:
    """Return ``path`` if it is a file, else raise DatasetError naming it and what it should be."""
    if not os.path.isfile(path):
        raise DatasetError(f"{what}: missing file {path}")
    return path


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DatasetError(f"{what}: missing directory {path}")
    return path


def read_table(path: str, what: str, columns: int, int_columns: Sequence[int] = (0,), rest: bool = False) -> list:
    """Rows of a whitespace-separated text file (blank lines skipped).

    ``columns`` fields per row (``rest=True``: the last field takes the rest of the line, spaces included);
    fields listed in ``int_columns`` are parsed as ints. A bad line (too few or many fields, not an integer, not
    UTF-8 text) raises DatasetError "file:line: ..."; an empty file (or one of blank lines) raises DatasetError.
    """
    require_file(path, what)
    rows = []
    for lineno, line in read_lines(path, error=DatasetError, what=what):
        line = line.strip()
        if not line:
            continue
        fields = line.split(maxsplit=columns - 1) if rest else line.split()
        if len(fields) != columns:
            raise DatasetError(f"{what}: {path}:{lineno}: expected {columns} fields, got {len(fields)}: {line!r}")
        try:
            row = [int(v) if k in int_columns else v for k, v in enumerate(fields)]
        except ValueError:
            raise DatasetError(f"{what}: {path}:{lineno}: expected an integer in column(s) "
                               f"{[k + 1 for k in int_columns]}: {line!r}") from None
        rows.append(row)
    if not rows:
        raise DatasetError(f"{what}: {path} is empty")
    return rows


def half_split(class_keys: Sequence, split: str, what: str) -> list:
    """The zero-shot split of METHOD.md: the first half of the sorted class keys is "train", the rest "test"."""
    keys = sorted(class_keys)
    if split not in ("train", "test", "all"):
        raise ValueError(f"{what}: split must be 'train', 'test' or 'all', got {split!r}")
    if split == "all":
        return keys
    half = len(keys) // 2
    return keys[:half] if split == "train" else keys[half:]


class FileImageDataset:
    """Images on disk with integer labels 0..C-1: ``ds[i] -> (PIL RGB image, label)``.

    ``crop_bottom`` pixels are cut from the bottom of each image (Aircraft's banner); ``image_size``
    (optional) resizes to a square. An unreadable image raises ImageLoadError naming the file.
    """

    def __init__(self, name: str, split: str, paths: list[str], labels: list[int], class_names: list[str],
                 crop_bottom: int = 0, image_size: int | None = None, check_files: bool = True,
                 attribute_names: list[str] | None = None, class_attributes: list[dict] | None = None):
        if len(paths) != len(labels):
            raise ValueError(f"paths and labels differ in length: {len(paths)} vs {len(labels)}")
        if not paths:
            raise DatasetError(f"{name} [{split}]: no images found")
        if check_files:
            for p in paths:
                if not os.path.isfile(p):
                    raise DatasetError(f"{name}: missing image file {p}")
        self.name, self.split = name, split
        self.paths, self.labels, self.class_names = list(paths), list(labels), list(class_names)
        self.crop_bottom, self.image_size = crop_bottom, image_size
        self.attribute_names, self.class_attributes = attribute_names, class_attributes

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, path: str) -> Image.Image:
        """Open one image as RGB (cropped / resized as configured); a missing, empty, truncated or garbage file
        raises ImageLoadError naming it."""
        img = open_image(path, error=ImageLoadError, what=self.name)
        if self.crop_bottom:
            w, h = img.size
            if h <= self.crop_bottom:
                raise ImageLoadError(f"{self.name}: image {path} is {h} px tall, cannot crop {self.crop_bottom} px")
            img = img.crop((0, 0, w, h - self.crop_bottom))
        if self.image_size:
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return img

    def __getitem__(self, i: int):
        return self.load(self.paths[i]), self.labels[i]

    def summary(self) -> str:
        counts = Counter(self.labels)
        return (f"{self.name} [{self.split}]: {len(self.class_names)} classes, {len(self)} images "
                f"({min(counts.values())}-{max(counts.values())} per class)")

    def __repr__(self) -> str:
        return self.summary()
