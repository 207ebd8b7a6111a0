"""Every file the project reads, damaged: empty, truncated, garbage bytes, or in its format but without a key it needs
("keys") or with a value of another type ("types"). Each gives the reader's ``UserError`` subclass with a message
naming the file and what is wrong, and each command line reading it prints ``error: ...`` (one line, no traceback)
and exits with status 2. The models are tiny and built from configs (no network); the supervisor is the shipped one.
"""
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from scipy.io import savemat
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from saga_train import __main__ as train_cli
from saga_train.config import load_config_file
from saga_train.data import DatasetError, ImageLoadError, load_dataset
from saga_train.data.stream import data_loader
from saga_train.errors import ConfigError, DamagedFileError, UserError
from saga_train.experiments import ablation, plot
from saga_train.model import Embedder, ModelLoadError, load_embedder
from saga_train.pooler import build_pooler
from saga_train.retrieve import EMBEDDINGS_FILE, GalleryError, build_index, load_gallery
from saga_train.retrieve import cli as retrieve_cli
from saga_train.synthetic import __main__ as synthetic_cli
from saga_train.synthetic import store
from saga_train.synthetic import supervisor as sup

GARBAGE = bytes(b for b in range(255, -1, -1) if b not in b"\r\n") * 2  # not UTF-8, no format's header, one line
DAMAGES = ("empty", "truncated", "garbage", "keys", "types")
SHIPPED = store.shipped_dir(sup.SupervisorConfig())


def toy_embed(images):
    """Mean RGB, centred (the retrieval tests' toy embedder), as ``--embedder test_damaged_files:toy_embed``."""
    return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) - 127.5 for im in images]))


TOY = f"{__name__}:toy_embed"


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """A test here never trains a supervisor (a damaged directory must be refused before)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a damaged supervisor directory must be refused, not retrained")

    monkeypatch.setattr(sup, "train_supervisor", refuse)


# ---------------------------------------------------------------- writing and damaging files
def write_image(path, seed: int = 0, size: int = 48) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


def write_lines(path, lines) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


def write_bytes(data: bytes):
    return lambda path: Path(path).write_bytes(data)


def halve(path) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


def cut_last_field(path) -> None:
    """A text table cut inside its last line: the line keeps its first field only."""
    data = Path(path).read_bytes().rstrip()
    Path(path).write_bytes(data[:data.rindex(b" ")])


def edit_json(change):
    """Rewrite a JSON file with ``change(data)`` applied (in place)."""
    def edit(path):
        data = json.loads(Path(path).read_text())
        change(data)
        Path(path).write_text(json.dumps(data))
    return edit


def edit_tensors(change):
    """Rewrite a safetensors file with the tensors ``change(tensors)`` returns."""
    return lambda path: save_file(change(load_file(path)), path)


def edit_lines(change):
    """Rewrite a text file with the lines ``change(lines)`` returns."""
    def edit(path):
        lines = change(Path(path).read_text().splitlines())
        Path(path).write_text("\n".join(lines) + "\n")
    return edit


def first_tensor(change):
    """``change(tensor)`` in place of the (alphabetically) first tensor; None drops it."""
    def edit(tensors):
        key = sorted(tensors)[0]
        value = change(tensors.pop(key))
        return tensors if value is None else {**tensors, key: value}
    return edit


# ---------------------------------------------------------------- the file kinds
@dataclasses.dataclass
class Case:
    file: str  # the file to damage
    load: Callable  # () -> reads it (the reader under test)
    cli: Callable = None  # () -> exit status of the command line reading it


@dataclasses.dataclass
class Kind:
    setup: Callable  # tmp_path -> Case, the files written intact
    error: type  # the UserError subclass the reader raises (None: only its command line is checked)
    keys: Callable = None  # path -> None: in its format, without a key it needs
    types: Callable = None  # path -> None: in its format, a value of another type
    truncated: Callable = halve
    empty: Callable = write_bytes(b"")
    garbage: Callable = write_bytes(GARBAGE)


def save_tiny_embedder(root) -> str:
    vision = Qwen3VLVisionConfig(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, patch_size=8,
                                 spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=16,
                                 num_position_embeddings=16, deepstack_visual_indexes=[])
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32}, patch_size=8,
                                         merge_size=2, temporal_patch_size=2)
    path = str(root / "embedder")
    Embedder(Qwen3VLVisionModel(vision), build_pooler("attention", 16, 8), processor, 32, "attention").save(path)
    return path


def embedder(name):
    def setup(tmp_path):
        path = save_tiny_embedder(tmp_path)
        write_image(str(tmp_path / "images" / "a" / "0.png"))
        argv = ["embed", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--checkpoint", path,
                "--no-progress"]
        return Case(os.path.join(path, name), lambda: load_embedder(path), lambda: retrieve_cli(argv))
    return setup


def gallery(name):
    def setup(tmp_path):
        for n, cls in enumerate(("red", "blue")):
            for k in range(2):
                write_image(str(tmp_path / "images" / cls / f"{k}.png"), seed=10 * n + k)
        out = str(tmp_path / "gallery")
        assert retrieve_cli(["embed", str(tmp_path / "images"), "--out", out, "--embedder", TOY, "--no-progress"]) == 0
        query = str(tmp_path / "images" / "red" / "0.png")
        return Case(os.path.join(out, name), lambda: load_gallery(out),
                    lambda: retrieve_cli(["query", query, "--gallery", out, "--embedder", TOY]))
    return setup


def index_of(rows=None, dims=None):
    """Replace index.faiss by a valid index over the gallery's first ``rows`` embeddings, or over ``dims``-dim ones."""
    def edit(path):
        z = load_file(os.path.join(os.path.dirname(path), EMBEDDINGS_FILE))["embeddings"]
        faiss.write_index(build_index(z[:rows] if rows else torch.ones(len(z), dims)), path)
    return edit


def image(tmp_path):
    root = tmp_path / "images"
    for n, cls in enumerate("ab"):
        for k in range(2):
            write_image(str(root / cls / f"{k}.png"), seed=10 * n + k)
    victim = str(root / "a" / "0.png")

    def load():
        ds = load_dataset("folder", str(root), "all")
        return ds[ds.paths.index(victim)]

    argv = ["embed", str(root), "--out", str(tmp_path / "out"), "--embedder", TOY, "--no-progress"]
    return Case(victim, load, lambda: retrieve_cli(argv))


def marker(tmp_path):
    out = tmp_path / "supervisor"
    out.mkdir()
    shutil.copy(SHIPPED / store.MARKER, out / store.MARKER)
    return Case(str(out / store.MARKER), lambda: store.read_marker(out),
                lambda: synthetic_cli.main(["--out", str(out)]))


def supervisor(name):
    def setup(tmp_path):
        out = tmp_path / "supervisor"
        shutil.copytree(SHIPPED, out)
        return Case(str(out / name), lambda: store.load_supervisor(out),
                    lambda: synthetic_cli.main(["--out", str(out)]))
    return setup


def config_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": 2, "lr_encoder": 1e-4, "run_dir": str(tmp_path / "run")}))
    return Case(str(path), lambda: load_config_file(str(path)), lambda: train_cli.main(["--config", str(path)]))


METRICS = [{"eval": "before", "step": 0, "R@1": 0.4}, {"step": 1, "loss_dml": 2.0, "completions": 8, "rewarded": 3},
           {"step": 2, "loss_dml": 1.5, "completions": 8, "rewarded": 5}, {"eval": "epoch 0", "step": 2, "R@1": 0.5}]


def metrics(tmp_path):
    path = write_lines(tmp_path / "metrics.jsonl", [json.dumps(r) for r in METRICS])
    return Case(path, lambda: plot.read_curves(path), lambda: plot.main([str(tmp_path)]))


def in_the_middle(line: bytes):
    """Put ``line`` between the 2nd and 3rd records of a metrics file (a torn or garbage line that is not the last)."""
    def edit(path):
        lines = Path(path).read_bytes().splitlines()
        Path(path).write_bytes(b"\n".join(lines[:2] + [line] + lines[2:]) + b"\n")
    return edit


def ablation_record(tmp_path):
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps({"meta": {"base_config": {}, "seed_list": [0], "note": "", "arms": []}, "runs": {}}))
    return Case(str(path), lambda: ablation.read_record(path),
                lambda: ablation.main(["--merge", str(path), "--out", str(tmp_path / "merged")]))


def dataset_cli(name, root, tmp_path):
    """The trainer's command line on dataset ``name`` at ``root`` (it stops at the dataset, before any model)."""
    return lambda: train_cli.main(["--dataset", name, "--data-root", str(root), "--model", "tiny-random",
                                   "--run-dir", str(tmp_path / "run"), "--no-progress"])


def cub(name):
    def setup(tmp_path):
        root = tmp_path / "cub"
        classes = {1: "001.Albatross", 2: "002.Auklet", 3: "003.Blackbird", 4: "004.Bobolink"}
        images, labels = [], []
        for n, cid in enumerate((1, 2, 3, 4, 1, 2, 3, 4), 1):
            rel = f"{classes[cid]}/{n}.jpg"
            write_image(str(root / "images" / rel), seed=n, size=8)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {cid}")
        write_lines(root / "images.txt", images)
        write_lines(root / "image_class_labels.txt", labels)
        write_lines(root / "classes.txt", [f"{k} {v}" for k, v in classes.items()])
        return Case(str(root / name), lambda: load_dataset("cub", str(root), "train"),
                    dataset_cli("cub", root, tmp_path))
    return setup


def aircraft(name):
    def setup(tmp_path):
        root = tmp_path / "aircraft"
        data = root / "data"
        write_lines(data / "variants.txt", ["707-320", "737-200", "A340-300", "Falcon 2000"])
        write_lines(data / "images_variant_trainval.txt", ["1 707-320", "2 737-200", "3 A340-300", "4 Falcon 2000"])
        write_lines(data / "images_variant_test.txt", ["5 707-320"])
        for i in range(1, 6):
            write_image(str(data / "images" / f"{i}.jpg"), seed=i, size=40)
        return Case(str(data / name), lambda: load_dataset("aircraft", str(root), "train"),
                    dataset_cli("aircraft", root, tmp_path))
    return setup


def _struct_array(rows):
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in rows[0]])
    for i, row in enumerate(rows):
        for f, v in row.items():
            arr[0, i][f] = v
    return arr


CAR_NAMES = np.array(["Hummer SUV 2000", "Acura RL 2012", "Audi R8 2012", "BMW M3 2012"], dtype=object).reshape(1, -1)


def car_rows(cls=lambda c: np.uint8(c)):
    return [{"relative_im_path": f"car_ims/{n:06d}.jpg", "class": cls(c)} for n, c in enumerate((1, 2, 3, 4), 1)]


def cars(tmp_path):
    root = tmp_path / "cars"
    for row in car_rows():
        write_image(str(root / row["relative_im_path"]), size=8)
    path = str(root / "cars_annos.mat")
    savemat(path, {"annotations": _struct_array(car_rows()), "class_names": CAR_NAMES})
    return Case(path, lambda: load_dataset("cars", str(root), "train"), dataset_cli("cars", root, tmp_path))


def inat(tmp_path):
    root = tmp_path / "inat"
    cats = [{"id": i, "name": f"bird {i}", "class": "Aves"} for i in (1, 2)]
    images = [{"id": 100 + n, "file_name": f"train_mini/{n}.jpg"} for n in range(4)]
    for im in images:
        write_image(str(root / im["file_name"]), seed=im["id"], size=8)
    anns = [{"id": n, "image_id": 100 + n, "category_id": 1 + n % 2} for n in range(4)]
    path = root / "train_mini.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return Case(str(path), lambda: load_dataset("inat", str(root), "train"), dataset_cli("inat", root, tmp_path))


KINDS = {
    "embedder.json": Kind(embedder("embedder.json"), ModelLoadError, keys=edit_json(lambda d: d.pop("pooler")),
                          types=edit_json(lambda d: d.update(image_size="32"))),
    "embedder.safetensors": Kind(embedder("embedder.safetensors"), ModelLoadError,
                                 keys=edit_tensors(first_tensor(lambda t: None)),
                                 types=edit_tensors(first_tensor(lambda t: t.to(torch.int64)))),
    "embedder preprocessor_config.json": Kind(embedder("preprocessor_config.json"), ModelLoadError,
                                              keys=edit_json(lambda d: d.pop("patch_size")),
                                              types=edit_json(lambda d: d.update(patch_size="8"))),
    "gallery embeddings.safetensors": Kind(gallery("embeddings.safetensors"), GalleryError,
                                           keys=edit_tensors(lambda t: {"vectors": t["embeddings"]}),
                                           types=edit_tensors(lambda t: {"embeddings": t["embeddings"].flatten()})),
    "gallery.json": Kind(gallery("gallery.json"), GalleryError, keys=edit_json(lambda d: d.pop("labels")),
                         types=edit_json(lambda d: d.update(paths="red/0.png"))),
    "index.faiss": Kind(gallery("index.faiss"), GalleryError, keys=index_of(rows=1), types=index_of(dims=5)),
    "image": Kind(image, ImageLoadError),
    "supervisor SUPERVISOR.json": Kind(marker, store.SupervisorCacheError, keys=edit_json(lambda d: d.pop("hash")),
                                       types=edit_json(lambda d: d.update(complete="yes"))),
    "supervisor model.safetensors": Kind(supervisor("model.safetensors"), store.SupervisorCacheError,
                                         keys=edit_tensors(first_tensor(lambda t: None)),
                                         types=edit_tensors(first_tensor(lambda t: t[:1]))),
    "supervisor config.json": Kind(supervisor("config.json"), store.SupervisorCacheError,
                                   keys=edit_json(lambda d: d.pop("model_type")),
                                   types=edit_json(lambda d: d.update(text_config=5))),
    "--config": Kind(config_file, ConfigError, keys=edit_json(lambda d: d.update(no_such_key=1)),
                     types=edit_json(lambda d: d.update(epochs="two"))),
    "metrics.jsonl": Kind(metrics, DamagedFileError, truncated=in_the_middle(b'{"step": 3, "loss_d'),
                          garbage=in_the_middle(GARBAGE), keys=in_the_middle(b'{"loss_dml": 1.0}'),
                          types=in_the_middle(b'{"step": 3, "loss_dml": "low"}')),
    "ablation.json": Kind(ablation_record, None, keys=edit_json(lambda d: d.pop("runs")),
                          types=edit_json(lambda d: d.update(meta=5))),
    "cub images.txt": Kind(cub("images.txt"), DatasetError, truncated=cut_last_field,
                           keys=edit_lines(lambda ls: [ls[0].split()[0]] + ls[1:]),
                           types=edit_lines(lambda ls: ["x " + ls[0].split()[1]] + ls[1:])),
    "cub image_class_labels.txt": Kind(cub("image_class_labels.txt"), DatasetError, truncated=cut_last_field,
                                       keys=edit_lines(lambda ls: ls[1:]),
                                       types=edit_lines(lambda ls: ["1 first"] + ls[1:])),
    "cub classes.txt": Kind(cub("classes.txt"), DatasetError, truncated=cut_last_field,
                            keys=edit_lines(lambda ls: ls[1:]), types=edit_lines(lambda ls: ["one 001.X"] + ls[1:])),
    "aircraft variants.txt": Kind(aircraft("variants.txt"), DatasetError, truncated=cut_last_field,
                                  keys=edit_lines(lambda ls: ls[1:])),
    "aircraft images_variant_trainval.txt": Kind(aircraft("images_variant_trainval.txt"), DatasetError,
                                                 truncated=cut_last_field,
                                                 keys=edit_lines(lambda ls: [ls[0].split()[0]] + ls[1:])),
    "cars_annos.mat": Kind(cars, DatasetError,
                           keys=lambda path: savemat(path, {"class_names": CAR_NAMES}),
                           types=lambda path: savemat(path, {"annotations": _struct_array(car_rows(lambda c: "x")),
                                                             "class_names": CAR_NAMES})),
    "inat train_mini.json": Kind(inat, DatasetError, keys=edit_json(lambda d: d.pop("categories")),
                                 types=edit_json(lambda d: d["categories"][0].update(id="one"))),
}
CASES = [(name, damage) for name, kind in KINDS.items() for damage in DAMAGES if getattr(kind, damage) is not None]


def test_every_kind_has_every_damage_it_can_have():
    """Keys and types are left out only where a file has none (an image; plain lists of names)."""
    assert len(CASES) >= 95
    lacking = sorted(name for name, kind in KINDS.items() if kind.keys is None or kind.types is None)
    assert lacking == ["aircraft images_variant_trainval.txt", "aircraft variants.txt", "image"]


@pytest.mark.parametrize("name, damage", CASES)
def test_a_damaged_file_is_named(name, damage, tmp_path, capsys):
    kind = KINDS[name]
    case = kind.setup(tmp_path)
    case.load()  # intact, it reads
    getattr(kind, damage)(case.file)
    if kind.error is not None:
        with pytest.raises(kind.error) as caught:
            case.load()
        assert isinstance(caught.value, UserError)
        message = str(caught.value)
        assert case.file in message and "\n" not in message, message
    if case.cli is not None:
        capsys.readouterr()
        assert case.cli() == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # what a reader may have logged before comes first
        assert last.startswith("error: ") and "Traceback" not in err, err
        folder, file = os.path.split(case.file)
        assert folder in last and file in last, last


def test_a_torn_last_metrics_line_is_skipped(tmp_path, capsys):
    """A run killed while writing its last record: plotted without it; only a file without any record is refused."""
    case = metrics(tmp_path)
    lines = Path(case.file).read_bytes().splitlines()
    Path(case.file).write_bytes(b"\n".join(lines[:2] + [lines[2][:12]]))  # killed while writing the 3rd record
    curves = plot.read_curves(case.file)
    assert curves["losses"]["loss_dml"]["steps"] == [1] and "incomplete last line skipped" in capsys.readouterr().err
    assert plot.main([str(tmp_path)]) == 0
    Path(case.file).write_text('{"step": 1, "loss_d')
    with pytest.raises(DamagedFileError, match=r"metrics.jsonl: no complete record"):
        plot.read_curves(case.file)


def test_a_torn_metrics_line_names_its_line_number(tmp_path):
    case = metrics(tmp_path)
    in_the_middle(b'{"step": 3, "loss_d')(case.file)
    with pytest.raises(DamagedFileError, match=r"metrics.jsonl:3 is not a JSON record"):
        plot.read_curves(case.file)


def test_a_damaged_image_read_by_a_worker_keeps_its_one_line_message(tmp_path):
    """An image a DataLoader worker cannot read raises its ImageLoadError in the trainer's process as it is, not
    torch's "Caught ImageLoadError in DataLoader worker" with the worker's traceback in the message."""
    case = image(tmp_path)
    Path(case.file).write_bytes(b"")
    dataset = load_dataset("folder", str(tmp_path / "images"), "all")
    with pytest.raises(ImageLoadError) as caught:
        for _ in data_loader(dataset, 1, batch_size=2):
            pass
    assert str(caught.value) == f"image folder: cannot read image {case.file}: the file is empty"
    assert [len(batch.images) for batch in data_loader(load_dataset("folder", str(tmp_path / "images"), "test",
                                                                    ratio=0.5), 1, batch_size=2)] == [2]


def test_missing_files_are_missing_file_errors(tmp_path):
    from saga_train.errors import MissingFileError

    path = save_tiny_embedder(tmp_path)
    for name in ("embedder.safetensors", "preprocessor_config.json"):
        shutil.copy(os.path.join(path, name), tmp_path / name)
        os.remove(os.path.join(path, name))
        with pytest.raises(MissingFileError, match=name):
            load_embedder(path)
        shutil.copy(tmp_path / name, os.path.join(path, name))
    out = tmp_path / "supervisor"
    shutil.copytree(SHIPPED, out)
    os.remove(out / "config.json")
    with pytest.raises(MissingFileError, match="config.json"):
        store.load_supervisor(out)
    with pytest.raises(MissingFileError, match="metrics.jsonl"):
        plot.plot_run(tmp_path / "no-run")
