"""Properties every kernel file of saga_kernels shares (issue 11's "one shape for every op").

* Triton comes from the one import guard, ``saga_kernels._triton``; without Triton the library imports,
  the torch fallbacks run and forcing the Triton path raises ImplUnavailableError.
* Every kernel launch runs inside ``with on_device(...)`` (Triton launches on torch's *current* device).
* No kernel is switched by a loss-selecting literal; tile matmuls go through ``_tl_utils.tile_dot``.
"""
import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "saga_kernels"
# files with Triton kernels or device helpers, and those that launch kernels (metric_common's large-D driver)
KERNEL_FILES = sorted(p for p in PACKAGE.glob("*.py") if "triton.jit" in p.read_text() or "on_device" in p.read_text())


def _launches(tree):
    """(line, kernel name, inside with-on_device) for every ``kernel[grid](...)`` call in a module."""
    found = []

    def visit(node, guarded):
        if isinstance(node, ast.With):
            guarded = guarded or any(isinstance(item.context_expr, ast.Call)
                                     and getattr(item.context_expr.func, "id", None) == "on_device"
                                     for item in node.items)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            target = node.func.value
            name = target.id if isinstance(target, ast.Name) else ast.unparse(target)
            found.append((node.lineno, name, guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def test_kernel_files_exist():
    names = {p.name for p in KERNEL_FILES}
    assert {"logprob.py", "attention.py", "attention_kl.py", "supcon.py", "multi_similarity.py", "proxy_anchor.py",
            "potential_field.py", "_tl_utils.py"} <= names, names


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_every_launch_runs_under_the_inputs_device(path):
    tree = ast.parse(path.read_text())
    launches = [launch for launch in _launches(tree) if not launch[1].startswith(("self", "cls"))]
    unguarded = [f"{path.name}:{line} {name}" for line, name, guarded in launches if not guarded]
    assert not unguarded, f"kernel launches outside `with on_device(...)`: {unguarded}"


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_one_triton_import_and_no_loss_literals(path):
    def imports_triton(node):
        if isinstance(node, ast.Import):
            return any(alias.name.split(".")[0] == "triton" for alias in node.names)
        return isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "triton"

    tree = ast.parse(path.read_text())
    direct = [node.lineno for node in ast.walk(tree) if imports_triton(node)] if path.name != "_triton.py" else []
    assert not direct, f"{path.name} imports triton directly at lines {direct}: use `from ._triton import triton, tl`"
    assert "LOSS ==" not in path.read_text(), f"{path.name} switches kernels by a loss literal"


def test_imports_and_falls_back_without_triton():
    """With triton unimportable: import works, the torch path computes, forcing triton raises clearly."""
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        sys.modules["triton.language"] = None
        import torch, saga_kernels
        from saga_kernels import ImplUnavailableError
        from saga_kernels._triton import HAS_TRITON
        assert not HAS_TRITON
        x = torch.randn(8, 5)
        y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        print(float(saga_kernels.supcon_loss(x, y)))
        lp = saga_kernels.linear_logprobs(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([1, 2, 3]))
        assert lp.shape == (3,)
        try:
            saga_kernels.supcon_loss(x, y, impl="triton")
        except ImplUnavailableError as exc:
            assert "triton" in str(exc).lower()
            print("forced-triton-raises")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "forced-triton-raises" in run.stdout


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_run_on_the_inputs_device_not_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current (a model spread by device_map="auto"): every op computes
    on cuda:1 and agrees with the same call made with cuda:1 current."""
    import saga_kernels as sk

    def calls(dev):
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(300, 64, device=dev, generator=g, requires_grad=True)
        y = torch.randint(0, 9, (300,), device=dev, generator=g)
        h = torch.randn(70, 64, device=dev, generator=g, requires_grad=True)
        w = torch.randn(500, 64, device=dev, generator=g)
        t = torch.randint(0, 500, (70,), device=dev, generator=g)
        p = torch.randn(9, 64, device=dev, generator=g, requires_grad=True)
        outs = [sk.supcon_loss(x, y), sk.multi_similarity_loss(x, y), sk.proxy_anchor_loss(x, y, p),
                sk.potential_field_loss(x, y, p, torch.arange(9, device=dev)), sk.linear_logprobs(h, w, t).sum()]
        torch.stack(outs).sum().backward()
        return [o.detach() for o in outs] + [x.grad, h.grad, p.grad]

    with torch.cuda.device(0):
        elsewhere = calls(torch.device("cuda:1"))
    with torch.cuda.device(1):
        home = calls(torch.device("cuda:1"))
    for a, b in zip(elsewhere, home):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a, b)
