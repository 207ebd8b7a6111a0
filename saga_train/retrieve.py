"""The retrieval tool: embed a gallery folder, save it with a faiss index, and search it with query images.

    python -m saga_train.retrieve embed GALLERY_DIR --out OUT_DIR --checkpoint EMBEDDER_DIR
    python -m saga_train.retrieve query IMG [IMG ...] --gallery OUT_DIR --checkpoint EMBEDDER_DIR -k 5 --grid grid.png
    python -m saga_train.retrieve index --gallery OUT_DIR        (rebuild index.faiss from the saved embeddings)

The embedder is a checkpoint saved by the trainer (``saga_train.model.load_embedder``), or, with
``--embedder module:attr``, any callable ``list[PIL.Image] -> Tensor[B, D]``. A gallery folder's
images are found recursively; an image's label is its top-level subfolder (class) when it has one.
Embeddings are L2-normalized and searched by cosine similarity (faiss inner product).

A missing, empty, truncated or garbage file (embedder, gallery, image), or one without a key it needs, stops the
command line with ``error: <the file and what is wrong>`` and exit status 2 (``cli``); ``main`` raises the
``UserError``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from saga_train.atomic import atomic_path, atomic_save_file, atomic_write_text
from saga_train.data.base import ImageLoadError
from saga_train.data.folder import list_images
from saga_train.errors import ConfigError, DamagedFileError, MissingFileError, UserError
from saga_train.files import damaged, list_field, read_faiss_index, read_json, read_safetensors
from saga_train.files import open_image as open_rgb_image

EMBEDDINGS_FILE = "embeddings.safetensors"
META_FILE = "gallery.json"
INDEX_FILE = "index.faiss"
UNLABELED = -1

EmbedFn = Callable[[list], torch.Tensor]


class GalleryError(DamagedFileError):
    """A saved gallery's file (embeddings, gallery.json, index.faiss) that is damaged or does not match the others;
    the message names the file."""


@dataclass
class Gallery:
    """Saved gallery: unit embeddings [N, D], image paths, labels (-1 = none) and class names."""

    embeddings: torch.Tensor
    paths: list[str]
    labels: list[int]
    class_names: list[str]
    index: object = None  # faiss index over ``embeddings``


def scan_gallery(root: str) -> tuple[list[str], list[int], list[str]]:
    """Images under ``root`` (recursive, sorted); label = index of the top-level subfolder in the sorted
    class names, -1 for images directly in ``root``."""
    if not os.path.isdir(root):
        raise MissingFileError(f"gallery folder {root} does not exist")
    paths = [os.path.abspath(p) for p in list_images(root)]
    if not paths:
        raise MissingFileError(f"gallery folder {root} holds no image")
    root = os.path.abspath(root)
    tops = [os.path.relpath(p, root).split(os.sep) for p in paths]
    class_names = sorted({t[0] for t in tops if len(t) > 1})
    label_of = {c: i for i, c in enumerate(class_names)}
    labels = [label_of[t[0]] if len(t) > 1 else UNLABELED for t in tops]
    return paths, labels, class_names


def open_image(path: str) -> Image.Image:
    """The image at ``path`` (RGB); ``ImageLoadError`` naming it when missing, empty, truncated or garbage."""
    return open_rgb_image(path, error=ImageLoadError)


def embed_paths(embed_fn: EmbedFn, paths: Sequence[str], batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """Unit embeddings [N, D] (fp32, CPU) of the images at ``paths``, ``batch_size`` at a time."""
    from tqdm import tqdm

    out = []
    with torch.no_grad(), tqdm(total=len(paths), desc="embedding", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch = list(paths[start:start + batch_size])
            z = embed_fn([open_image(p) for p in batch])
            if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != len(batch):
                raise ConfigError(f"the embedder must return a Tensor [{len(batch)}, D] for {len(batch)} images, "
                                 f"got {getattr(z, 'shape', type(z).__name__)}")
            out.append(torch.nn.functional.normalize(z.detach().float().cpu(), dim=1))
            bar.update(len(batch))
    return torch.cat(out)


def build_index(embeddings: torch.Tensor):
    """A faiss exact inner-product index over unit embeddings."""
    import faiss

    x = np.ascontiguousarray(embeddings.float().numpy())
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def embeddings_sha256(embeddings: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (what ``gallery.json`` records of ``embeddings.safetensors``)."""
    digest = hashlib.sha256(f"{embeddings.dtype} {list(embeddings.shape)}".encode())
    digest.update(embeddings.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_gallery(out_dir: str, gallery: Gallery) -> None:
    """``embeddings.safetensors``, ``index.faiss``, then ``gallery.json`` (paths, labels, class names and the sha256
    of the other two), each written atomically. ``gallery.json`` comes last and vouches for the others, so files left
    by a kill between two of the writes, or copied in from another gallery, do not match it and ``load_gallery``
    refuses them."""
    import faiss

    os.makedirs(out_dir, exist_ok=True)
    embeddings = gallery.embeddings.contiguous()
    atomic_save_file({"embeddings": embeddings}, os.path.join(out_dir, EMBEDDINGS_FILE))
    with atomic_path(os.path.join(out_dir, INDEX_FILE)) as tmp:
        faiss.write_index(gallery.index if gallery.index is not None else build_index(embeddings), tmp)
        index_sha256 = file_sha256(tmp)
    atomic_write_text(os.path.join(out_dir, META_FILE), json.dumps(
        {"paths": gallery.paths, "labels": gallery.labels, "class_names": gallery.class_names,
         "embeddings_sha256": embeddings_sha256(embeddings), "index_sha256": index_sha256}))


def _recorded_sha256(meta: dict, key: str, meta_path: str) -> str | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise damaged(meta_path, f"{key!r} must be a hex string, got {type(value).__name__}", error=GalleryError)
    return value


def load_gallery(out_dir: str, rebuild_index: bool = False) -> Gallery:
    """The gallery saved by ``save_gallery`` in ``out_dir`` (its index rebuilt when asked or when index.faiss is
    missing). A missing file raises ``MissingFileError``; a damaged one, or files that do not match each other (counts,
    shapes, and the sha256 that ``gallery.json`` records; galleries saved before it recorded them are checked without),
    ``GalleryError`` naming the file and what is wrong."""
    for name in (EMBEDDINGS_FILE, META_FILE):
        if not os.path.isfile(os.path.join(out_dir, name)):
            raise MissingFileError(f"{out_dir} is not a saved gallery: {name} is missing (run `embed` first)")
    embeddings_path = os.path.join(out_dir, EMBEDDINGS_FILE)
    embeddings = read_safetensors(embeddings_path, error=GalleryError, keys=("embeddings",))["embeddings"]
    if embeddings.dim() != 2 or not embeddings.is_floating_point() or 0 in embeddings.shape:
        raise damaged(embeddings_path, f"'embeddings' must be a float tensor [N, D] with N, D >= 1, got "
                                       f"{embeddings.dtype} {list(embeddings.shape)}", error=GalleryError)
    meta_path = os.path.join(out_dir, META_FILE)
    meta = read_json(meta_path, error=GalleryError)
    paths = list_field(meta, "paths", str, path=meta_path, error=GalleryError)
    labels = list_field(meta, "labels", int, path=meta_path, error=GalleryError)
    class_names = list_field(meta, "class_names", str, path=meta_path, error=GalleryError)
    if len(paths) != len(embeddings):
        raise damaged(meta_path, f"lists {len(paths)} images but {EMBEDDINGS_FILE} holds {len(embeddings)} "
                                 "embeddings", error=GalleryError)
    if len(labels) != len(paths):
        raise damaged(meta_path, f"has {len(labels)} labels for {len(paths)} paths", error=GalleryError)
    for i, label in enumerate(labels):
        if not UNLABELED <= label < len(class_names):
            raise damaged(meta_path, f"'labels'[{i}] is {label}: neither {UNLABELED} (no class) nor one of the "
                                     f"{len(class_names)} class_names", error=GalleryError)
    recorded = _recorded_sha256(meta, "embeddings_sha256", meta_path)
    if recorded is not None and recorded != embeddings_sha256(embeddings):
        raise damaged(embeddings_path, f"does not match {META_FILE} (not the embeddings it records: written by another "
                                       "`embed`, or an `embed` killed between its files); run `embed` again",
                      error=GalleryError)
    index_path = os.path.join(out_dir, INDEX_FILE)
    if rebuild_index or not os.path.isfile(index_path):
        index = build_index(embeddings)
    else:
        rebuild = f" (rebuild it: python -m saga_train.retrieve index --gallery {out_dir})"
        try:
            index = read_faiss_index(index_path, error=GalleryError)
        except GalleryError as e:
            raise GalleryError(f"{e}{rebuild}") from e
        recorded = _recorded_sha256(meta, "index_sha256", meta_path)
        if recorded is not None and recorded != file_sha256(index_path):
            raise damaged(index_path, f"does not match {META_FILE} (not the index it records: written by another "
                                      f"`embed`, or an `embed` killed between its files){rebuild}", error=GalleryError)
        if (index.ntotal, index.d) != tuple(embeddings.shape):
            raise damaged(index_path, f"indexes {index.ntotal} vectors of {index.d} dims but {EMBEDDINGS_FILE} "
                                      f"holds {len(embeddings)} of {embeddings.shape[1]}{rebuild}", error=GalleryError)
    return Gallery(embeddings, paths, labels, class_names, index)


def search(gallery: Gallery, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine scores, gallery ids), each [Q, k'] with k' = min(k, gallery size), best first."""
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    k = min(k, len(gallery.paths))
    q = np.ascontiguousarray(torch.nn.functional.normalize(queries.float(), dim=1).numpy())
    if q.shape[1] != gallery.embeddings.shape[1]:
        raise ConfigError(f"query embeddings have {q.shape[1]} dims, the gallery {gallery.embeddings.shape[1]}: "
                         "use the embedder the gallery was built with")
    return gallery.index.search(q, k)


def query_label(path: str, class_names: Sequence[str]) -> int:
    """A query's label: its parent folder's name when that is a gallery class, else -1."""
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return list(class_names).index(name) if name in class_names else UNLABELED


def format_table(query_paths, scores, ids, gallery: Gallery, query_labels: Sequence[int]) -> str:
    """One block per query: rank, score, match (when labels exist), class, gallery path."""
    lines = []
    for qp, row_s, row_i, ql in zip(query_paths, scores, ids, query_labels):
        lines.append(f"query: {qp}" + (f"  [{gallery.class_names[ql]}]" if ql != UNLABELED else ""))
        lines.append(f"{'rank':>4}  {'score':>7}  {'match':>5}  {'class':<24}  path")
        for rank, (s, i) in enumerate(zip(row_s, row_i), 1):
            gl = gallery.labels[i]
            match = "-" if ql == UNLABELED or gl == UNLABELED else ("yes" if gl == ql else "no")
            name = gallery.class_names[gl] if gl != UNLABELED else "-"
            lines.append(f"{rank:>4}  {s:7.4f}  {match:>5}  {name[:24]:<24}  {gallery.paths[i]}")
        lines.append("")
    return "\n".join(lines)


GREEN, RED, GREY, BLUE = (30, 170, 60), (210, 40, 40), (150, 150, 150), (40, 90, 220)


def render_grid(query_paths, ids, scores, gallery: Gallery, query_labels: Sequence[int],
                thumb: int = 128) -> Image.Image:
    """One row per query: the query (blue frame) then its top-K, framed green (same class) / red (other
    class) / grey (no labels), each captioned with rank and score."""
    border, caption = max(2, thumb // 32), 14
    cell = thumb + 2 * border
    cols = 1 + max(len(r) for r in ids)
    grid = Image.new("RGB", (cols * cell, len(query_paths) * (cell + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)

    def put(path, row, col, frame, text):
        x, y = col * cell, row * (cell + caption)
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=frame)
        grid.paste(open_image(path).resize((thumb, thumb), Image.Resampling.BICUBIC), (x + border, y + border))
        draw.text((x + border, y + cell), text, fill=(0, 0, 0))

    for row, (qp, row_i, row_s, ql) in enumerate(zip(query_paths, ids, scores, query_labels)):
        put(qp, row, 0, BLUE, "query")
        for col, (i, s) in enumerate(zip(row_i, row_s), 1):
            gl = gallery.labels[i]
            frame = GREY if ql == UNLABELED or gl == UNLABELED else (GREEN if gl == ql else RED)
            put(gallery.paths[i], row, col, frame, f"#{col} {s:.3f}")
    return grid


def load_embed_fn(checkpoint: str | None = None, embedder: str | None = None, device: str = "cpu") -> EmbedFn:
    """The image -> embedding callable: a trainer checkpoint directory, or ``module:attr`` naming a callable."""
    if (checkpoint is None) == (embedder is None):
        raise ConfigError("give exactly one of --checkpoint DIR or --embedder module:attr")
    if checkpoint is not None:
        from saga_train.model import load_embedder  # the trainer's module, imported only when needed

        return load_embedder(checkpoint, device=device).embed_images
    module_name, sep, attr = embedder.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--embedder must look like module:attr, got {embedder!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--embedder {embedder!r}: cannot import {module_name} ({type(e).__name__}: {e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"--embedder {embedder!r}: {module_name} has no callable {attr!r}")
    return fn


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saga_train.retrieve", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add_embedder(sp):
        g = sp.add_mutually_exclusive_group(required=True)
        g.add_argument("--checkpoint", help="embedder directory saved by the trainer")
        g.add_argument("--embedder", help="module:attr, a callable list[PIL.Image] -> Tensor[B, D]")
        sp.add_argument("--device", default="cpu", help="device for --checkpoint (default: cpu)")
        sp.add_argument("--batch-size", type=int, default=32)
        sp.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("embed", help="embed a gallery folder and save embeddings + index")
    e.add_argument("folder")
    e.add_argument("--out", required=True, help="directory for embeddings.safetensors, gallery.json, index.faiss")
    add_embedder(e)
    q = sub.add_parser("query", help="top-K gallery images for query images")
    q.add_argument("images", nargs="+")
    q.add_argument("--gallery", required=True, help="directory written by `embed`")
    q.add_argument("-k", type=int, default=5)
    q.add_argument("--grid", help="write a PNG grid of the queries and their top-K here")
    q.add_argument("--thumb", type=int, default=128, help="grid thumbnail size in pixels")
    add_embedder(q)
    i = sub.add_parser("index", help="rebuild index.faiss from a gallery's saved embeddings")
    i.add_argument("--gallery", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "index":
        gallery = load_gallery(args.gallery, rebuild_index=True)
        save_gallery(args.gallery, gallery)
        print(f"rebuilt {os.path.join(args.gallery, INDEX_FILE)} over {len(gallery.paths)} images")
        return 0
    embed_fn = load_embed_fn(args.checkpoint, args.embedder, args.device)
    if args.command == "embed":
        paths, labels, class_names = scan_gallery(args.folder)
        embeddings = embed_paths(embed_fn, paths, args.batch_size, progress=not args.no_progress)
        gallery = Gallery(embeddings, paths, labels, class_names, build_index(embeddings))
        save_gallery(args.out, gallery)
        print(f"embedded {len(paths)} images ({len(class_names)} classes, dim {embeddings.shape[1]}) into {args.out}")
        return 0
    gallery = load_gallery(args.gallery)
    queries = embed_paths(embed_fn, args.images, args.batch_size, progress=False)
    scores, ids = search(gallery, queries, args.k)
    labels = [query_label(p, gallery.class_names) for p in args.images]
    print(format_table(args.images, scores, ids, gallery, labels))
    if args.grid:
        grid = render_grid(args.images, ids, scores, gallery, labels, args.thumb)
        try:
            with atomic_path(args.grid) as tmp:
                grid.save(tmp)
        except ValueError as e:  # PIL: an extension it cannot write
            raise ConfigError(f"--grid {args.grid}: {e}") from e
        print(f"wrote {args.grid}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """``main`` for the command line: a ``UserError`` (a bad argument, a missing or damaged file) or an OS error on a
    path prints ``error: <message>`` and returns 2; anything else is a bug and keeps its traceback."""
    try:
        return main(argv)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
