"""Every ```python block of README.md runs as written (in order, in one fresh process, in a temporary
directory, on the torch fallbacks), so the documented API cannot drift from the code."""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def training_commands() -> list[list[str]]:
    """The flags of every `-m saga_train` command in the README's ```bash blocks (continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found = re.search(r"-m saga_train(?![.\w])(.*)", line)
            if found:
                commands.append(shlex.split(found.group(1).split("#")[0].split("'")[0].split("|")[0]))
    return commands


def test_readme_training_commands_parse():
    """The shell examples (quick start, multi-GPU, the SLURM script) use flags that exist."""
    from saga_train.config import parse_args

    commands = training_commands()
    assert len(commands) >= 10 and any("--auto-resume" in argv for argv in commands)
    for argv in commands:
        parse_args(argv)


def test_readme_has_examples():
    assert len(python_blocks()) >= 10


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path):
    blocks = python_blocks()
    script = "\n".join(f"print('--- README block {i}', flush=True)\n{block}" for i, block in enumerate(blocks))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SAGA_IMPL")}
    env["PYTHONPATH"] = str(README.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    done = re.findall(r"--- README block (\d+)", run.stdout)
    failed_at = done[-1] if done else "?"
    assert run.returncode == 0, f"README block {failed_at} failed:\n{run.stderr[-4000:]}"
    assert len(done) == len(blocks)
