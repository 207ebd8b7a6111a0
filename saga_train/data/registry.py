"""``load_dataset(name, root, split, **kw)``: one entry point for every reader."""
from __future__ import annotations

DATASETS = ("cub", "cars", "aircraft", "inat_aves", "folder", "synthetic")
ALIASES = {"inat": "inat_aves"}


def load_dataset(name: str, root: str = "", split: str = "train", **kw):
    """The ``split`` ("train" | "test"; on-disk readers also take "all") of dataset ``name`` under ``root``.

    Names: cub, cars, aircraft, inat_aves (alias inat), folder, synthetic (``saga_train.synthetic.SyntheticBirds``;
    ``root`` unused). Extra keyword arguments go to the reader (e.g. ``image_size=224``, ``ratio=0.5`` for folder,
    ``seed`` for synthetic).
    """
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (alias: inat)")
    if key == "synthetic":
        from ..synthetic import SyntheticBirds
        return SyntheticBirds(split=split, **kw)
    if not root:
        raise ValueError(f"dataset {name!r} needs root= (its directory on disk)")
    if key == "cub":
        from .cub import load_cub
        return load_cub(root, split, **kw)
    if key == "cars":
        from .cars import load_cars
        return load_cars(root, split, **kw)
    if key == "aircraft":
        from .aircraft import load_aircraft
        return load_aircraft(root, split, **kw)
    if key == "inat_aves":
        from .inat import load_inat_aves
        return load_inat_aves(root, split, **kw)
    from .folder import load_folder
    return load_folder(root, split, **kw)
