"""saga_kernels.integrations.verl: verl's linear_cross_entropy contract against the float64 reference (every token
scored, gradients through the log-probs and the entropy), its refusals, and the swap into verl's module."""
import importlib
import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from saga_kernels.integrations import verl as saga_verl
from saga_kernels.integrations.verl import linear_cross_entropy
from saga_kernels.reference import linear_logprobs_reference

from utils import assert_rule

B, T, H, V = 2, 13, 40, 517


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, labels


def _run(fn, hidden, weight, labels, train_head, **kw):
    """Forward + backward of sum(g1 * log_probs) + sum(g2 * entropy): outputs and gradients."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(train_head)
    lp, ent = fn(h, w, labels, **kw)
    g = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(lp.shape, generator=g), torch.randn(ent.shape, generator=g)
    ((lp.double() * g1).sum() + (ent.double() * g2).sum()).backward()
    return [lp.detach(), ent.detach(), h.grad] + ([w.grad] if train_head else [])


def _reference(h, w, labels, temperature=1.0):
    return linear_logprobs_reference(h, w, labels, temperature=temperature, return_entropy=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("flat", [False, True])
def test_matches_float64_through_both_outputs(impl, dtype, train_head, flat):
    hidden, weight, labels = _inputs(dtype)
    if flat:  # verl's remove-padding layout: [total_tokens, H]
        hidden, labels = hidden.reshape(-1, H), labels.reshape(-1)
    ours = _run(linear_cross_entropy, hidden, weight, labels, train_head, temperature=0.7, impl=impl)
    gold = _run(lambda h, w, y: _reference(h, w, y, 0.7), hidden.double(), weight.double(), labels, train_head)
    peer = _run(lambda h, w, y: _reference(h, w, y, 0.7), hidden, weight, labels, train_head)
    assert ours[0].dtype == ours[1].dtype == torch.float32 and ours[0].shape == labels.shape
    slack = 2e-5 if dtype == torch.float32 else 1e-3
    for what, o, g, p in zip(("log_probs", "entropy", "d_hidden", "d_weight"), ours, gold, peer):
        assert_rule(o, g, p, slack=slack if what in ("log_probs", "entropy") else 0.0,
                    rel_slack=0.0 if what in ("log_probs", "entropy") else slack, what=what)


@pytest.mark.parametrize("reduction", ["sum", "mean", "SUM"])
def test_reductions_reduce_the_log_probs(reduction):
    hidden, weight, labels = _inputs(torch.float32, seed=2)
    per_token, ent = linear_cross_entropy(hidden, weight, labels, impl="torch")
    reduced, ent2 = linear_cross_entropy(hidden, weight, labels, reduction=reduction, impl="torch")
    want = per_token.sum() if reduction.lower() == "sum" else per_token.mean()
    torch.testing.assert_close(reduced, want)
    torch.testing.assert_close(ent2, ent)


@pytest.mark.parametrize("train_head,floor", [(False, 6), (True, 8)])
def test_flops_per_call(train_head, floor):
    """Every token scored, gradients through both outputs: 6NHV with a frozen head, 8NHV trained."""
    hidden, weight, labels = _inputs(torch.float32, seed=3)
    with FlopCounterMode(display=False) as counter:
        _run(linear_cross_entropy, hidden, weight, labels, train_head, impl="torch")
    assert counter.get_total_flops() == floor * B * T * H * V


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(dist_process_group="two ranks"), NotImplementedError, "over 2 processes"),
    (dict(reduction="max"), ValueError, "reduction"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(labels=torch.full((B, T), -100)), ValueError, "labels must lie in"),
    (dict(labels=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "labels must have shape"),
    (dict(labels=torch.zeros(B, T)), TypeError, "labels must have dtype"),
    (dict(hidden=torch.randn(H)), ValueError, "hidden must have 2 or 3 dims"),
])
def test_refusals(kwargs, exc, match, monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    hidden, weight, labels = _inputs(torch.float32)
    args = dict(hidden=hidden, weight=weight, labels=labels)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def _fake_verl(monkeypatch):
    """verl's module tree as far as the swap sees it: the module holding linear_cross_entropy."""
    def verl_own(*args, **kwargs):
        raise AssertionError("verl's kernel was called")

    for name in ("verl", "verl.utils", "verl.utils.kernel"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = types.ModuleType(saga_verl.VERL_MODULE)
    module.linear_cross_entropy = verl_own
    monkeypatch.setitem(sys.modules, saga_verl.VERL_MODULE, module)
    return module, verl_own


def test_install_swaps_verls_function_and_the_plugin_does_it_on_import(monkeypatch):
    module, verl_own = _fake_verl(monkeypatch)
    assert saga_verl.install() is verl_own
    assert module.linear_cross_entropy is linear_cross_entropy
    module.linear_cross_entropy = verl_own
    monkeypatch.delitem(sys.modules, "saga_kernels.integrations.verl_plugin", raising=False)
    plugin = importlib.import_module("saga_kernels.integrations.verl_plugin")
    assert plugin.REPLACED is verl_own and module.linear_cross_entropy is linear_cross_entropy
    # what verl's forward does at call time
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy as called
    hidden, weight, labels = _inputs(torch.float32)
    log_probs, entropy = called(hidden, weight, labels, 1.0, "none")
    assert log_probs.shape == entropy.shape == labels.shape


def test_install_without_verl_names_the_module(monkeypatch):
    monkeypatch.setitem(sys.modules, saga_verl.VERL_MODULE, None)  # import of it raises ImportError
    with pytest.raises(ImportError, match="verl.utils.kernel.linear_cross_entropy"):
        saga_verl.install()


def test_a_process_group_of_one_and_flat_labels_are_verls_tp1_call(tmp_path):
    """Megatron's fused path passes its tensor-parallel group even at TP = 1, and verl flattens the labels."""
    import torch.distributed as dist

    hidden, weight, labels = _inputs(torch.float32, seed=4)
    want = linear_cross_entropy(hidden, weight, labels, impl="torch")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        got = linear_cross_entropy(hidden, weight, labels.reshape(-1), 1.0, "none", dist.group.WORLD, impl="torch")
    finally:
        dist.destroy_process_group()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
