"""saga_train.atomic: where the writers put their temporaries, what they clean, what they raise, and the gallery's
files that vouch for each other. (A real SIGKILL inside safetensors' writer: tests/test_crash_consistency.py.)"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

from saga_train.atomic import atomic_path, atomic_replace_dir, atomic_write_text, remove_stale_temporaries
from saga_train.errors import UserError, WriteError
from saga_train.retrieve import Gallery, GalleryError, build_index, load_gallery, save_gallery


def _entries(directory):
    return sorted(os.listdir(directory))


def test_atomic_path_keeps_the_name_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        assert os.path.basename(tmp) == "plot.png"  # writers that go by the extension (savefig, PIL, faiss) work
        assert os.path.dirname(os.path.dirname(tmp)) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert target.read_bytes() == b"new" and _entries(tmp_path) == ["plot.png"]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("the writer failed")  # not an I/O error: passes through unchanged
    assert target.read_bytes() == b"new" and _entries(tmp_path) == ["plot.png"]  # the old file, no temporary


@pytest.mark.parametrize("case", ["missing directory", "parent is a file", "a directory in the way", "no space",
                                  "safetensors io"])
def test_write_failures_are_write_errors_naming_the_file(tmp_path, case):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.png").mkdir()
    target = {"missing directory": tmp_path / "missing" / "x.png", "parent is a file": tmp_path / "file" / "x.png",
              "a directory in the way": tmp_path / "dir.png"}.get(case, tmp_path / "x.safetensors")
    with pytest.raises(WriteError) as info, atomic_path(target) as tmp:
        open(tmp, "wb").close()
        if case == "no space":
            raise OSError(28, "No space left on device")
        if case == "safetensors io":
            raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    message = str(info.value)
    assert message.startswith(f"cannot write {target}: ") and ".tmp" not in message, message
    assert isinstance(info.value, UserError)  # the CLIs print `error: ...` and exit 2
    assert sorted(os.listdir(tmp_path)) == ["dir.png", "file"]  # nothing left behind


def test_only_our_temporaries_are_removed_and_a_live_writers_are_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    from saga_train import atomic

    ours = f".x.png.saga-{atomic._HOST}-{dead_pid}-abcdefgh.tmp"
    live = f".x.png.saga-{atomic._HOST}-{os.getpid()}-abcdefgh.tmp"
    other_host = f".x.png.saga-elsewhere-{dead_pid}-abcdefgh.tmp"
    users = [".notes.tmp", ".cache.old", ".x.png.tmp", ".tmpK1LLed"]
    for name in [ours, live, other_host, *users]:
        (tmp_path / name).mkdir()
    with atomic_path(tmp_path / "x.png") as tmp:  # the next write of x.png removes a dead writer's, on this host
        open(tmp, "wb").close()
    assert _entries(tmp_path) == sorted([live, other_host, *users, "x.png"])
    # a training start removes every one of ours in its run directory, never the user's
    assert remove_stale_temporaries(str(tmp_path)) == sorted(str(tmp_path / n) for n in (live, other_host))
    assert _entries(tmp_path) == sorted([*users, "x.png"])


def test_symlinks_are_written_through(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real" / "target.json", tmp_path / "link.json")
    atomic_write_text(tmp_path / "link.json", "{}")
    assert os.path.islink(tmp_path / "link.json") and (tmp_path / "real" / "target.json").read_text() == "{}"


def test_a_replaced_directory_gets_the_umasks_mode(tmp_path):
    def write(directory):
        with open(os.path.join(directory, "a.txt"), "w") as f:
            f.write("a")

    old = os.umask(0o022)
    try:
        atomic_replace_dir(tmp_path / "embedder", write)
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "embedder").st_mode & 0o777) == oct(0o755)
    assert _entries(tmp_path) == ["embedder"]


def _gallery(seed, n=6, d=4):
    g = torch.Generator().manual_seed(seed)
    e = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    return Gallery(e, [f"{seed}/{i}.png" for i in range(n)], [i % 2 for i in range(n)], ["a", "b"], build_index(e))


@pytest.mark.parametrize("mixed", ["embeddings.safetensors", "index.faiss"])
def test_gallery_files_from_another_embed_are_refused(tmp_path, mixed):
    """What a kill between the gallery's writes leaves (one file new, the others old), or a file copied in from
    another gallery of the same size: counts and shapes agree, the sha256 in gallery.json does not."""
    save_gallery(str(tmp_path / "a"), _gallery(0))
    save_gallery(str(tmp_path / "b"), _gallery(1))
    assert load_gallery(str(tmp_path / "a")).paths[0] == "0/0.png"
    shutil.copy(tmp_path / "b" / mixed, tmp_path / "a" / mixed)
    with pytest.raises(GalleryError, match=f"{mixed}: does not match gallery.json"):
        load_gallery(str(tmp_path / "a"))


def test_a_gallery_saved_before_the_digests_still_loads(tmp_path):
    save_gallery(str(tmp_path), _gallery(0))
    meta = json.loads((tmp_path / "gallery.json").read_text())
    del meta["embeddings_sha256"], meta["index_sha256"]
    (tmp_path / "gallery.json").write_text(json.dumps(meta))
    assert torch.equal(load_gallery(str(tmp_path)).embeddings, _gallery(0).embeddings)


def test_plot_out_is_the_file_written(tmp_path):
    """matplotlib adds ".png" to a name without an extension unless told the format: the file asked for is the file
    written. A name that names no file is refused."""
    from saga_train.errors import ConfigError
    from saga_train.experiments.plot import plot_run

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 0, "loss_dml": 1.0}) + "\n")
    assert plot_run(tmp_path, tmp_path / "noext") == tmp_path / "noext"
    assert (tmp_path / "noext").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="names no file"):
        plot_run(tmp_path, "")


@pytest.mark.usefixtures("torch_kernels")
def test_a_signal_while_the_finished_run_writes_its_plot_waits_for_it(tmp_path, monkeypatch):
    """SIGTERM after the last step, while the CLI writes training.png: the plot is written whole, nothing is left
    behind, and the exit is 0 (the run is complete)."""
    from test_preemption import TINY, flags

    from saga_train import __main__ as cli
    from saga_train.experiments import plot

    import fakes

    monkeypatch.setenv("SAGA_CACHE", str(tmp_path / "cache"))
    fakes.install(monkeypatch)
    real = plot.plot_run

    def signalled(run_dir, out=None):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(run_dir, out)
    monkeypatch.setattr(plot, "plot_run", signalled)
    run_dir = tmp_path / "run"
    assert cli.main([*flags(dict(TINY, epochs=1)), "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert not [n for n in os.listdir(run_dir) if n.startswith(".")]
