"""SyntheticBirds: a fine-grained dataset of PIL-drawn "birds", generated on the fly, needing nothing on disk.

A class is one combination of six discrete attributes (body / wing / head color with 6 values each;
wing pattern, beak shape, tail shape with 3), so there are 6^3 * 3^3 = 5,832 classes, and many class
pairs differ in a single attribute (the Indigo Bunting vs Blue Grosbeak situation). Each image draws
the class's bird with random position, scale, rotation, mirroring, background and pixel noise.

Zero-shot split: the test split is a fixed set of held-out combinations chosen by ``seed`` (built
from near-neighbour pairs, so it always contains classes one attribute apart); the train split is
either ``train_classes`` other combinations (also built from near-neighbour pairs) or ``"open"``:
every combination that is not held out. Image ``index`` of a class is a pure function of
(seed, split, class combination, index).
"""
from __future__ import annotations

import itertools
import random
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (50, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
}
# attribute name -> its values (the text the MLLM prompt and answers use)
ATTRIBUTES = {
    "body color": tuple(COLORS),
    "wing color": tuple(COLORS),
    "head color": tuple(COLORS),
    "wing pattern": ("plain", "striped", "spotted"),
    "beak shape": ("short", "long", "hooked"),
    "tail shape": ("short", "fan", "forked"),
}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
# how a value reads inside a class name: "red-body blue-wing green-head striped-wing long-beak forked-tail"
_NAME_SUFFIX = ("body", "wing", "head", "wing", "beak", "tail")
ALL_COMBINATIONS = tuple(itertools.product(*(range(len(v)) for v in ATTRIBUTES.values())))
_COMBINATION_ID = {c: i for i, c in enumerate(ALL_COMBINATIONS)}

_DARK = (40, 35, 30)
_LIGHT = (250, 250, 240)
_NEUTRAL = np.array((128, 128, 128), dtype=np.float64)
_CACHE_BYTES = 128 * 2**20  # "auto" caches rendered images when the whole split fits in this


def attributes_of(combination: Sequence[int]) -> dict[str, str]:
    """Attribute name -> value text of one combination (a tuple of value indices)."""
    return {name: ATTRIBUTES[name][v] for name, v in zip(ATTRIBUTE_NAMES, combination)}


def class_name_of(combination: Sequence[int]) -> str:
    """Readable class name, e.g. "red-body blue-wing green-head striped-wing long-beak forked-tail"."""
    values = attributes_of(combination).values()
    return " ".join(f"{v}-{s}" for v, s in zip(values, _NAME_SUFFIX))


def num_differences(a: Sequence[int], b: Sequence[int]) -> int:
    """How many attributes two combinations disagree on."""
    return sum(x != y for x, y in zip(a, b))


def _pick_with_neighbours(rng: random.Random, pool: list, count: int) -> list:
    """``count`` distinct combinations from ``pool``, drawn as (random class, a one-attribute neighbour) pairs."""
    allowed = set(pool)
    chosen: list = []
    taken: set = set()
    order = list(pool)
    rng.shuffle(order)
    for c in order:
        if len(chosen) >= count:
            break
        if c in taken:
            continue
        chosen.append(c)
        taken.add(c)
        if len(chosen) >= count:
            break
        # a neighbour: change one attribute to another value, if that class is still free
        options = [c[:a] + (v,) + c[a + 1:] for a, values in enumerate(ATTRIBUTES.values())
                   for v in range(len(values)) if v != c[a]]
        rng.shuffle(options)
        for n in options:
            if n in allowed and n not in taken:
                chosen.append(n)
                taken.add(n)
                break
    return chosen


def split_combinations(seed: int = 0, test_classes: int = 200, train_classes: int | str = 100) -> dict:
    """The held-out (test) and train combinations for a seed, each sorted by combination id.

    The test set depends only on (seed, test_classes); ``train_classes="open"`` gives every other combination.
    """
    total = len(ALL_COMBINATIONS)
    if not 2 <= test_classes < total:
        raise ValueError(f"test_classes must be in [2, {total - 1}], got {test_classes}")
    test = _pick_with_neighbours(random.Random(f"synthetic-birds-test-{seed}"), list(ALL_COMBINATIONS), test_classes)
    held = set(test)
    pool = [c for c in ALL_COMBINATIONS if c not in held]
    if train_classes == "open":
        train = pool
    elif isinstance(train_classes, int) and 2 <= train_classes <= len(pool):
        train = _pick_with_neighbours(random.Random(f"synthetic-birds-train-{seed}-{test_classes}"), pool,
                                      train_classes)
    else:
        raise ValueError(f"train_classes must be 'open' or an int in [2, {len(pool)}], got {train_classes!r}")
    key = _COMBINATION_ID.__getitem__
    return {"train": sorted(train, key=key), "test": sorted(test, key=key)}


def _mix(color, toward, amount: float) -> tuple:
    """Linear blend of two RGB colours: (1 - amount) * color + amount * toward."""
    c = np.asarray(color, dtype=np.float64) * (1 - amount) + np.asarray(toward, dtype=np.float64) * amount
    return tuple(int(round(x)) for x in c)


def render_bird(combination: Sequence[int], rng: random.Random, image_size: int = 64,
                subtle: Sequence[str] = (), noise: float = 6.0) -> Image.Image:
    """Draw one bird of ``combination`` with a random pose and background; returns a PIL RGB image.

    ``subtle`` names attributes drawn small / low-contrast (colours pulled toward grey, shape parts
    shrunk, pattern marks faint). ``noise`` is the std of the added Gaussian pixel noise (0-255 scale).
    """
    attrs = attributes_of(combination)
    subtle = set(subtle)
    big = 2 * image_size  # draw at 2x, downsample once (cheap antialiasing)
    u = big / 100.0  # the bird is designed on a 100-unit canvas, facing right

    def color(name):
        c = COLORS[attrs[name]]
        return _mix(c, _NEUTRAL, 0.6) if name in subtle else c

    def pts(points, scale=1.0, anchor=(0.0, 0.0)):
        ax, ay = anchor
        return [((ax + (x - ax) * scale) * u, (ay + (y - ay) * scale) * u) for x, y in points]

    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    body, wing, head = color("body color"), color("wing color"), color("head color")

    # tail, attached at the rear of the body (28, 56)
    tail_scale = 0.55 if "tail shape" in subtle else 1.0
    tails = {
        "short": [(30, 50), (18, 50), (18, 62), (30, 62)],
        "fan": [(30, 50), (8, 30), (0, 44), (0, 68), (8, 82), (30, 62)],
        "forked": [(30, 50), (2, 30), (20, 56), (2, 82), (30, 62)],
    }
    tail_color = body if "tail shape" in subtle else _mix(body, _DARK, 0.25)
    draw.polygon(pts(tails[attrs["tail shape"]], tail_scale, (30, 56)), fill=tail_color)
    # legs, body
    for x0, x1 in ((44, 42), (53, 55)):
        draw.line(pts([(x0, 70), (x1, 86)]), fill=_DARK, width=max(1, int(1.5 * u)))
    draw.ellipse(pts([(24, 40), (72, 72)]), fill=body)
    # wing with its pattern, clipped to the wing ellipse
    wing_box = pts([(32, 46), (64, 64)])
    wing_layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    wdraw = ImageDraw.Draw(wing_layer)
    wdraw.rectangle(wing_box, fill=wing)
    mark = _mix(wing, _DARK, 0.25 if "wing pattern" in subtle else 0.75)
    pattern = attrs["wing pattern"]
    mark_scale = 0.5 if "wing pattern" in subtle else 1.0
    if pattern == "striped":
        for x in range(34, 64, 8):
            wdraw.line(pts([(x, 44), (x + 6, 66)]), fill=mark, width=max(1, int(3 * u * mark_scale)))
    elif pattern == "spotted":
        r = 3.2 * mark_scale
        for x, y in ((39, 51), (49, 50), (59, 53), (44, 59), (54, 60)):
            wdraw.ellipse(pts([(x - r, y - r), (x + r, y + r)]), fill=mark)
    wing_mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(wing_mask).ellipse(wing_box, fill=255)
    layer.paste(wing_layer, (0, 0), wing_mask)
    # head, eye, beak (beak attached at (82, 41))
    draw.ellipse(pts([(60, 28), (84, 52)]), fill=head)
    draw.ellipse(pts([(74, 35), (79, 40)]), fill=(245, 245, 245))
    draw.ellipse(pts([(75.5, 36.5), (77.5, 38.5)]), fill=(10, 10, 10))
    beaks = {
        "short": [(82, 34), (91, 41), (82, 48)],  # a stubby cone
        "long": [(82, 38), (108, 41), (82, 44)],  # a long thin spike
        "hooked": [(82, 34), (93, 33), (100, 39), (99, 52), (94, 43), (82, 47)],  # curved down
    }
    if "beak shape" in subtle:
        draw.polygon(pts(beaks[attrs["beak shape"]], 0.66, (82, 41)), fill=_mix(_DARK, head, 0.5))
    else:  # dark with a light outline: visible on any background
        draw.polygon(pts(beaks[attrs["beak shape"]], 1.2, (82, 41)), fill=_DARK, outline=_LIGHT,
                     width=max(1, int(1.2 * u)))

    # pose: mirror, rotate, scale, translate
    if rng.random() < 0.5:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    layer = layer.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, expand=False)
    side = max(8, int(big * rng.uniform(0.85, 1.0)))
    layer = layer.resize((side, side), Image.Resampling.BILINEAR)

    # background: a tinted vertical gradient plus a few blobs of its own hue (no blob competes with a bird colour)
    base = np.array([rng.uniform(70, 190)] * 3) + np.array([rng.uniform(-30, 30) for _ in range(3)])
    top, bottom = base + rng.uniform(-35, 35), base + rng.uniform(-35, 35)
    ramp = np.linspace(0.0, 1.0, big)[:, None, None]
    bg = (top * (1 - ramp) + bottom * ramp) * np.ones((1, big, 1))
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    bdraw = ImageDraw.Draw(canvas)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(0.08, 0.25) * big
        delta = rng.uniform(-40, 40)
        shade = tuple(int(np.clip(b + delta, 0, 255)) for b in base)
        bdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=shade)
    x = int(rng.uniform(0, big - side + 1))
    y = int(rng.uniform(0, big - side + 1))
    canvas.paste(layer, (x, y), layer)

    img = canvas.resize((image_size, image_size), Image.Resampling.BILINEAR)
    if noise > 0:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + np.random.default_rng(rng.getrandbits(63)).normal(0.0, noise, arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img


class SyntheticBirds:
    """The synthetic fine-grained dataset: ``ds[i] -> (PIL RGB image, label)``.

    Args:
        split: "train" or "test" (the held-out combinations).
        seed: picks the held-out and train combinations and every image.
        images_per_class: images per class (``render`` accepts any index >= 0).
        image_size: side of the square images.
        test_classes: number of held-out combinations.
        train_classes: number of train combinations, or "open" for every combination not held out.
        subtle: attribute names drawn small / low-contrast (see ``render_bird``).
        noise: std of the Gaussian pixel noise (0-255 scale).
        cache: keep rendered images in memory: True, False, or "auto" (when the split fits in 128 MiB).
    """

    def __init__(self, split: str = "train", seed: int = 0, images_per_class: int = 8, image_size: int = 64,
                 test_classes: int = 200, train_classes: int | str = 100, subtle: Sequence[str] = (),
                 noise: float = 6.0, cache: bool | str = "auto"):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        unknown = [a for a in subtle if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"subtle names unknown attributes {unknown}; known: {list(ATTRIBUTE_NAMES)}")
        if cache not in (True, False, "auto"):
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
        self.split, self.seed, self.images_per_class, self.image_size = split, seed, images_per_class, image_size
        self.subtle, self.noise = tuple(subtle), float(noise)
        self.combinations: list[tuple] = split_combinations(seed, test_classes, train_classes)[split]
        self.attribute_names: list[str] = list(ATTRIBUTE_NAMES)
        self.attribute_values: dict[str, tuple] = dict(ATTRIBUTES)
        self.class_attributes: list[dict[str, str]] = [attributes_of(c) for c in self.combinations]
        self.class_names: list[str] = [class_name_of(c) for c in self.combinations]
        self.labels: list[int] = [c for c in range(len(self.combinations)) for _ in range(images_per_class)]
        self._label_of = {c: i for i, c in enumerate(self.combinations)}
        if cache == "auto":
            cache = len(self.labels) * image_size * image_size * 3 <= _CACHE_BYTES
        self._cache: dict | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i = i % len(self)
        if self._cache is not None and i in self._cache:
            return self._cache[i], self.labels[i]
        label = self.labels[i]
        img = self.render(label, i % self.images_per_class)
        if self._cache is not None:
            self._cache[i] = img
        return img, label

    def render(self, label: int, index: int) -> Image.Image:
        """Image ``index`` (any int >= 0) of class ``label``; a pure function of (seed, split, class, index)."""
        combo = self.combinations[label]
        rng = random.Random(f"{self.seed}-{self.split}-{_COMBINATION_ID[combo]}-{index}")
        return render_bird(combo, rng, self.image_size, self.subtle, self.noise)

    def attributes(self, label: int) -> dict[str, str]:
        """Attribute name -> value text of class ``label`` (for prompts and answer checking)."""
        return dict(self.class_attributes[label])

    def label_of(self, attributes: dict[str, str]) -> int | None:
        """The label of the class with these attribute values in this split, or None if it is not here."""
        bad = [a for a in ATTRIBUTE_NAMES if attributes.get(a) not in ATTRIBUTES[a]]
        if bad:
            raise ValueError(f"attributes: missing or unknown values for {bad}; values: "
                             + "; ".join(f"{a}: {', '.join(ATTRIBUTES[a])}" for a in bad))
        return self._label_of.get(tuple(ATTRIBUTES[a].index(attributes[a]) for a in ATTRIBUTE_NAMES))

    def neighbours(self, label: int) -> list[int]:
        """Labels of the classes in this split that differ from ``label`` in exactly one attribute."""
        c = self.combinations[label]
        out = []
        for a, values in enumerate(ATTRIBUTES.values()):
            for v in range(len(values)):
                j = self._label_of.get(c[:a] + (v,) + c[a + 1:]) if v != c[a] else None
                if j is not None:
                    out.append(j)
        return sorted(out)

    def summary(self) -> str:
        return (f"SyntheticBirds[{self.split}, seed={self.seed}]: {len(self.combinations)} classes, "
                f"{len(self)} images ({self.images_per_class} per class, {self.image_size}px)"
                + (f", subtle: {', '.join(self.subtle)}" if self.subtle else ""))

    def __repr__(self) -> str:
        return self.summary()
