"""Attention maps of chosen query rows over chosen key columns from inside a transformers model.

    probe = AttentionProbe(model, layers=[26])
    with probe.capture(query_positions=qpos, key_index={"a": idx_a, "b": idx_b}):
        out = model(**inputs)
    probe.maps[26]["a"]   # fp32 [B, Lq, n_a], detached

How: for the duration of ``capture`` the text config's ``_attn_implementation`` names a wrapper,
registered in transformers' ``AttentionInterface`` as ``"saga_probe|<original>"``, around the function
the model was using (sdpa, eager, flash_attention_*). The wrapper always calls the original unchanged
(outputs are untouched) and, at the chosen layers, also hands the post-RoPE, post q/k-norm query and
key states to :func:`saga_kernels.attention_probs` for the requested rows and columns. The original
mask function is registered under the same name in ``AttentionMaskInterface``: transformers skips
mask creation for names it does not know, which would silently drop the padding mask.

Positions are indices into the padded input sequence. The causal mask uses them directly; padded
keys are excluded through the mask the layer receives (the model's ``attention_mask``: a 4-D bool or
additive mask for sdpa/eager, the 2-D mask for flash attention), or an explicit ``key_padding_mask``.
Supported masks are causal + padding (no sliding windows, no packed sequences).

This module imports transformers; ``import saga_kernels`` never does.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from .._checks import check_mode, check_values
from ..attention import attention_probs

_PREFIX = "saga_probe|"
_ACTIVE: dict[int, "AttentionProbe"] = {}  # id(text config) -> probe capturing through it


def _original_function(original: str, module):
    """The attention function ``original`` names, resolved at call time (as the model itself does)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original == "eager":  # eager is each model file's own function, not in the interface
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__}'s module defines no eager_attention_forward to wrap")
        return fn
    return ALL_ATTENTION_FUNCTIONS[original]


def _register(original: str) -> str:
    """Register the probe wrapper (and the original's mask function) under "saga_probe|<original>"."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = _PREFIX + original
    if name in AttentionInterface._global_mapping:
        return name
    if original not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {original!r} has no mask function in AttentionMaskInterface")

    def probe_attention(module, query, key, value, attention_mask, *args, **kwargs):
        probe = _ACTIVE.get(id(getattr(module, "config", None)))
        if probe is not None and getattr(module, "layer_idx", None) in probe.layers:
            probe._record(module, query, key, attention_mask, kwargs.get("scaling"))
        return _original_function(original, module)(module, query, key, value, attention_mask, *args, **kwargs)

    AttentionInterface.register(name, probe_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _key_padding_from_layer_mask(mask, bsz: int, lk: int):
    """[B, Lk] bool (True = real key) from the mask an attention layer receives, or None if unpadded.

    4-D masks (sdpa bool / eager additive) are causal & padding, so their last query row sees exactly
    the non-padded keys; the 2-D flash-attention mask is the padding mask itself.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        kpm = mask[:, :lk].bool()
    elif mask.dim() == 4:
        last = mask[:, 0, -1, :lk]
        kpm = last if last.dtype == torch.bool else last == 0
    else:
        raise ValueError(f"unsupported attention mask of shape {tuple(mask.shape)} (expected 2-D or 4-D)")
    return kpm.expand(bsz, lk)


def _check_query_rows(qpos, lo: int, hi: int) -> None:
    """query_positions name rows of this forward: [lo, hi). No host sync unless the check mode is "sync"."""
    if qpos.numel() == 0:
        return
    ok = (qpos >= lo) & (qpos < hi)
    if check_mode(ok) != "sync":
        check_values("query_positions", ok, f"lie in [{lo}, {hi}) (this forward's query rows)")
    elif not bool(ok.all()):
        raise ValueError(f"query_positions must lie in [{lo}, {hi}) (this forward's query rows), "
                         f"found [{int(qpos.min())}, {int(qpos.max())}]")


class AttentionProbe:
    """Head-mean attention probabilities of chosen query rows at chosen key columns, per layer.

    Args:
        model: a transformers model whose text decoder calls ``ALL_ATTENTION_FUNCTIONS`` (Qwen3-VL,
            Qwen3, Llama, ...); for multimodal models the text config (``config.text_config``) is probed.
        layers: decoder layer indices (the attention modules' ``layer_idx``).

    After a ``capture``, ``maps[layer][name]`` is the fp32 ``[B, Lq, n_name]`` detached map: softmax over
    ALL visible keys of each query row, averaged over heads, gathered at ``key_index[name]``.
    """

    def __init__(self, model, layers):
        self.model = model
        self.layers = frozenset(int(i) for i in layers)
        if not self.layers:
            raise ValueError("layers must name at least one decoder layer")
        self.config = model.config.get_text_config(decoder=True)
        modules = {m.layer_idx for m in model.modules()
                   if getattr(m, "config", None) is self.config and isinstance(getattr(m, "layer_idx", None), int)
                   and hasattr(m, "num_key_value_groups")}
        missing = sorted(self.layers - modules)
        if missing:
            raise ValueError(f"layers {missing} have no attention module in this model "
                             f"(decoder layers: 0..{max(modules) if modules else -1})")
        self.maps: dict[int, dict[str, torch.Tensor]] = {}
        self._request = None

    @contextlib.contextmanager
    def capture(self, query_positions, key_index, key_padding_mask=None):
        """Record maps during the forward passes inside the block (the last pass wins).

        Args:
            query_positions: ``[B, Lq]`` long, indices of the query rows in the padded sequence.
            key_index: ``{name: [B, n_name] long}``, key columns (indices in the padded sequence).
            key_padding_mask: optional ``[B, L]`` bool (True = real token); default: derived from the
                mask the layer receives, i.e. from the model's ``attention_mask``.
        """
        if not isinstance(key_index, dict) or not key_index:
            raise TypeError("key_index must be a non-empty dict {name: LongTensor[B, n]}")
        if not isinstance(query_positions, torch.Tensor) or query_positions.dim() != 2:
            raise ValueError("query_positions must be a [B, Lq] tensor of positions")
        bsz = query_positions.shape[0]
        for name, idx in key_index.items():
            if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[0] != bsz:
                raise ValueError(f"key_index[{name!r}] must be a [B={bsz}, n] tensor, got "
                                 f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if id(self.config) in _ACTIVE:
            raise RuntimeError("this model is already being probed (nested capture)")
        original = self.config._attn_implementation or "eager"
        name = _register(original)
        names = list(key_index)
        self._request = {
            "query_positions": query_positions,
            "key_index": torch.cat([key_index[k].long() for k in names], dim=1),
            "splits": [key_index[k].shape[1] for k in names],
            "names": names,
            "key_padding_mask": key_padding_mask,
        }
        self.maps = {}
        _ACTIVE[id(self.config)] = self
        self.config._attn_implementation = name
        try:
            yield self
        finally:
            self.config._attn_implementation = original
            del _ACTIVE[id(self.config)]
            self._request = None
        not_run = sorted(self.layers - set(self.maps))
        if not_run:
            raise RuntimeError(f"layers {not_run} did not run inside the capture block (no forward pass?)")

    def _record(self, module, query, key, attention_mask, scaling):
        req = self._request
        if getattr(module, "sliding_window", None) is not None:
            raise ValueError(f"layer {module.layer_idx} uses sliding-window attention, which the probe does not model")
        bsz, hq, lq_all, dim = query.shape
        lk = key.shape[2]
        device = query.device
        qpos = req["query_positions"].to(device).long()
        if qpos.shape[0] != bsz:
            raise ValueError(f"query_positions has batch {qpos.shape[0]}, the model's batch is {bsz}")
        _check_query_rows(qpos, lk - lq_all, lk)
        # with a cache, the layer's queries are the last lq_all positions (clamped: checks may be off)
        rows = (qpos - (lk - lq_all)).clamp(0, max(lq_all - 1, 0))
        kpm = req["key_padding_mask"]
        kpm = kpm.to(device).bool() if kpm is not None else _key_padding_from_layer_mask(attention_mask, bsz, lk)
        with torch.no_grad():
            q_sel = query.detach().gather(2, rows[:, None, :, None].expand(bsz, hq, rows.shape[1], dim))
            probs = attention_probs(q_sel, key.detach(), req["key_index"].to(device), query_positions=qpos,
                                    key_padding_mask=kpm, scale=scaling)
        self.maps[module.layer_idx] = dict(zip(req["names"], (p.contiguous() for p in
                                                              probs.split(req["splits"], dim=-1))))
