"""The retrieval tool end to end with a toy embedder (mean colour), in-process and as ``python -m``."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from saga_train.data import ImageLoadError
from saga_train.retrieve import (
    GREEN,
    GREY,
    RED,
    Gallery,
    build_index,
    cli,
    embed_paths,
    load_embed_fn,
    load_gallery,
    main,
    render_grid,
    scan_gallery,
    search,
)

TOY = '''
import numpy as np, torch
def embed(images):
    """Mean RGB, centred: same-colour images point the same way."""
    return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) - 127.5 for im in images]))
'''
COLORS = {"blue": (20, 40, 230), "green": (30, 220, 40), "red": (230, 30, 20)}


def _img(path, rgb, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    noise = np.random.default_rng(seed).integers(-15, 16, (16, 16, 3))
    Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    (tmp_path / "toy_embed.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    gallery = tmp_path / "gallery"
    for n, (name, rgb) in enumerate(COLORS.items()):
        for k in range(3):
            _img(str(gallery / name / f"{k}.png"), rgb, 10 * n + k)
    _img(str(tmp_path / "queries" / "red" / "q.png"), COLORS["red"], 99)
    _img(str(tmp_path / "queries" / "green" / "q.png"), COLORS["green"], 98)
    return tmp_path


def test_embed_query_grid(setup, capsys):
    out = str(setup / "out")
    assert main(["embed", str(setup / "gallery"), "--out", out, "--embedder", "toy_embed:embed", "--no-progress",
                 "--batch-size", "4"]) == 0
    assert sorted(os.listdir(out)) == ["embeddings.safetensors", "gallery.json", "index.faiss"]
    g = load_gallery(out)
    assert g.class_names == ["blue", "green", "red"] and g.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.allclose(g.embeddings.norm(dim=1), torch.ones(9))

    queries = [str(setup / "queries" / "red" / "q.png"), str(setup / "queries" / "green" / "q.png")]
    grid = str(setup / "grid.png")
    capsys.readouterr()
    assert main(["query", *queries, "--gallery", out, "--embedder", "toy_embed:embed", "-k", "4", "--grid", grid,
                 "--thumb", "32"]) == 0
    text = capsys.readouterr().out
    red_block = text.split("query: ")[1].splitlines()
    assert red_block[0].endswith("[red]")
    assert [line.split()[2] for line in red_block[2:6]] == ["yes", "yes", "yes", "no"]
    assert all(os.sep + "red" + os.sep in line for line in red_block[2:5])

    img = np.asarray(Image.open(grid))
    cell = 32 + 2 * 2
    assert img.shape == (2 * (cell + 14), 5 * cell, 3)
    for row in range(2):
        y = row * (cell + 14)
        frames = [tuple(img[y, col * cell + 1]) for col in range(1, 5)]  # top border pixel of each result
        assert frames == [GREEN, GREEN, GREEN, RED]

    # the index subcommand rebuilds the index file; searches give the same neighbours
    q = g.embeddings[[0, 4, 8]]
    before = search(g, q, 5)[1]
    os.remove(os.path.join(out, "index.faiss"))
    assert main(["index", "--gallery", out]) == 0
    assert np.array_equal(search(load_gallery(out), q, 5)[1], before)
    assert [g.labels[i] for i in before[:, 0]] == [0, 1, 2]


def test_unlabeled_gallery_grey_frames(setup):
    for k, rgb in enumerate(COLORS.values()):
        _img(str(setup / "flat" / f"{k}.png"), rgb, k)
    paths, labels, names = scan_gallery(str(setup / "flat"))
    assert labels == [-1, -1, -1] and names == []
    fn = load_embed_fn(embedder="toy_embed:embed")
    z = embed_paths(fn, paths, progress=False)
    g = Gallery(z, paths, labels, names, build_index(z))
    scores, ids = search(g, z[:1], 2)
    assert ids[0, 0] == 0 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    img = np.asarray(render_grid(paths[:1], ids, scores, g, [-1], thumb=16))
    assert tuple(img[0, 20 + 1]) == GREY


def test_errors(setup):
    with pytest.raises(ValueError, match="module:attr"):
        load_embed_fn(embedder="toy_embed")
    with pytest.raises(ValueError, match="no callable 'nothing'"):
        load_embed_fn(embedder="toy_embed:nothing")
    with pytest.raises(ValueError, match="exactly one"):
        load_embed_fn()
    bad = setup / "gallery" / "red" / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(ImageLoadError, match="broken.png"):
        main(["embed", str(setup / "gallery"), "--out", str(setup / "o"), "--embedder", "toy_embed:embed",
              "--no-progress"])
    with pytest.raises(FileNotFoundError, match="not a saved gallery"):
        load_gallery(str(setup))


def test_python_m_entry_point(setup, capsys):
    out = str(setup / "out")
    assert main(["embed", str(setup / "gallery"), "--out", out, "--embedder", "toy_embed:embed", "--no-progress"]) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(setup), os.environ.get("PYTHONPATH", "")]))
    query = str(setup / "queries" / "green" / "q.png")
    res = subprocess.run([sys.executable, "-m", "saga_train.retrieve", "query", query, "--gallery", out,
                          "--embedder", "toy_embed:embed", "-k", "2"],
                         check=True, env=env, capture_output=True, text=True)
    rows = res.stdout.splitlines()
    assert rows[0].endswith("[green]") and [r.split()[2] for r in rows[2:4]] == ["yes", "yes"]
    # the command line reports a bad path in one line, with the exit status of every UserError
    capsys.readouterr()
    assert cli(["query", str(setup / "nope.png"), "--gallery", out, "--embedder", "toy_embed:embed"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read image") and "nope.png" in err
