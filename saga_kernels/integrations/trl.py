"""TRL's fused-LM-head contract, served by :func:`saga_kernels.linear_logprobs` (TRL >= 1.15, < 1.17).

Since TRL 1.15 every TRL trainer takes its per-token log-probs from ``trl.trainer.utils.add_fused_lm_head``,
which patches ``model.forward`` so that ``model(..., labels=..., fused_lm_head=True)`` returns a
``FusedCausalLMOutput``. :func:`add_saga_lm_head` patches a model the same way (same arguments, same output
type and fields, same loss), with this library's kernels underneath; a GRPO user swaps one name::

    from saga_kernels.integrations.trl import SagaGRPOTrainer     # instead of trl's GRPOTrainer
    trainer = SagaGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset)

What the swap buys, per policy loss + backward (N_live = completion tokens, H x V the head):

* TRL asks for the entropy for its metrics and its high-entropy token mask; it differentiates it only when the
  entropy bonus is on (``entropy_coef != 0`` or ``use_adaptive_entropy``). The trainer tells the head, which
  then returns a detached entropy from the forward's streaming statistics: a frozen head stays on the 4NHV
  Jacobian path (TRL's own head recomputes: 6NHV); a trained head costs 8NHV.
* Prompt and padding positions (label -100) cost nothing on every path and on every device (TRL's head scores
  every position where Triton is missing).

Contract details kept from TRL: labels are shifted inside (or ``shift_labels`` scored as they are); the loss is
``-sum(log_probs) / (num_items_in_batch or the label count)`` plus the MoE load-balancing loss when the config
asks for router logits; per-token fields are 0 where the label is -100; ``label_mask`` is ``labels != -100``;
the backbone is ``model.base_model`` (``model.model`` for vision-language models before transformers 5), so a
VLM's image tokens are injected as in its own forward; the LM head is looked up on every call (FSDP and PEFT
replace it); an FSDP2-sharded head (DTensor) is gathered with ``full_tensor()``, a DeepSpeed ZeRO-3 head with
TRL's ``maybe_gather_lm_head_ctx`` (in the forward, and again in the backward when the backward reads it);
``cast_lm_head_to_fp32`` runs the head in fp32 outside autocast, otherwise the hidden states are cast to the
autocast dtype (the head's weight is converted tile by tile, never copied); the model's logit scale and
final-logit softcap (the config fields TRL reads) are applied. ``generate`` and every call without
``fused_lm_head=True`` go to the original forward, unchanged.

TRL's other per-token fields (``log_sum_sq_probs``, ``mean_logits``, ``is_top1``: asked for by the SFT, DPO and
KTO trainers) are not computed here: asking for one raises ValueError naming it.

This module imports trl and transformers; ``import saga_kernels`` never does.
"""
from __future__ import annotations

import contextlib
import functools
import math
import sys
import types
import warnings
from unittest import mock

import torch
from packaging.version import Version

from .._checks import check_number
from ..logprob import linear_logprobs

SUPPORTED_TRL = ("1.15", "1.17")  # [lowest, first untested): add_fused_lm_head appeared in 1.15
TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
COMPUTED_OUTPUTS = ("log_probs", "entropy")
ENTROPY_MODES = ("differentiable", "detached")

try:
    import trl
except ImportError as exc:
    raise ImportError("saga_kernels.integrations.trl needs trl (pip install 'trl>=1.15,<1.17')") from exc
if Version(trl.__version__) < Version(SUPPORTED_TRL[0]):
    raise ImportError(f"saga_kernels.integrations.trl needs trl >= {SUPPORTED_TRL[0]} (add_fused_lm_head), "
                      f"found {trl.__version__}")
if Version(trl.__version__) >= Version(SUPPORTED_TRL[1]):
    warnings.warn(f"saga_kernels.integrations.trl is tested with trl >= {SUPPORTED_TRL[0]}, < {SUPPORTED_TRL[1]}; "
                  f"found {trl.__version__}", stacklevel=2)
from transformers import __version__ as _TRANSFORMERS_VERSION  # noqa: E402
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx  # noqa: E402


def logit_transform(text_config) -> tuple[float, float | None]:
    """(logit scale, final-logit softcap or None) of a transformers text config, from the fields TRL reads:
    ``final_logit_softcapping`` (Gemma 2); ``logit_scale`` (Cohere), ``output_multiplier``, ``lm_head_multiplier``
    (Falcon-H1), or ``logits_scaling`` (Granite and MiniCPM3 divide by it, HyperCLOVA X multiplies), first one
    set wins; 1.0 when none is. Raises ValueError naming the field when its value is not a finite number (or a
    softcap not > 0)."""
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))
                            or not (math.isfinite(cap) and cap > 0)):
        raise ValueError(f"config.final_logit_softcapping must be None or a finite number > 0, got {cap!r}")
    for field in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(text_config, field, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                field == "logits_scaling" and value == 0):
            raise ValueError(f"config.{field} must be a finite number{' != 0' if field == 'logits_scaling' else ''}, "
                             f"got {value!r}")
        if field == "logits_scaling" and getattr(text_config, "model_type", None) != "hyperclovax":
            value = 1.0 / value
        return float(value), (None if cap is None else float(cap))
    return 1.0, (None if cap is None else float(cap))


def _check_outputs(outputs) -> tuple[str, ...]:
    if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs):
        raise TypeError(f"outputs must be a tuple of names among {TRL_OUTPUTS}, got {outputs!r}")
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in TRL_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs {unknown} are not fields of TRL's FusedCausalLMOutput {TRL_OUTPUTS}")
    missing = [o for o in outputs if o not in COMPUTED_OUTPUTS]
    if missing:
        raise ValueError(f"add_saga_lm_head cannot compute {', '.join(map(repr, missing))} (it computes "
                         f"{' and '.join(COMPUTED_OUTPUTS)}); use trl's add_fused_lm_head for that trainer")
    return outputs


def _router_aux_loss(model, text_config, backbone_outputs, attention_mask):
    """The MoE load-balancing loss as the model's own forward adds it (transformers' Mixtral function)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None)
    if num_experts is None:  # older configs keep it on the model (gpt-oss before transformers 5.6)
        num_experts = model.num_experts
    top_k = getattr(text_config, "num_experts_per_tok", None) or model.num_experts_per_tok
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, top_k, attention_mask)


def add_saga_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                     outputs: tuple[str, ...] = ("log_probs",), *, impl: str | None = None,
                     entropy: str = "differentiable") -> None:
    """Patch ``model.forward`` with TRL's fused-LM-head contract (``trl.trainer.utils.add_fused_lm_head``'s
    arguments and output type), computed by :func:`saga_kernels.linear_logprobs`.

    ``model(..., labels=labels, fused_lm_head=True)`` then returns ``trl.trainer.utils.FusedCausalLMOutput``:
    ``loss`` (mean NLL over labelled tokens, or summed / ``num_items_in_batch``), ``log_probs`` and, when
    ``"entropy"`` is in ``outputs``, ``entropy`` (fp32, ``[B, T - 1]``, or ``[B, T]`` with ``shift_labels``; 0
    at label -100), ``label_mask``, ``aux_loss`` (MoE). Without ``fused_lm_head=True`` the original forward
    runs. ``temperature`` > 0 divides the logits (after the model's logit scale and softcap).

    Keyword-only, beyond TRL's: ``impl`` ("triton" | "torch" | None, see saga_kernels._dispatch) and
    ``entropy``: "differentiable" (TRL's contract: gradients flow through the entropy; 6NHV with a frozen head)
    or "detached" (the entropy's value only, no extra matmul: 4NHV; for trainers that only read it).

    Raises ImportError without trl >= 1.15, ValueError for an output it cannot compute (``log_sum_sq_probs``,
    ``mean_logits``, ``is_top1``), an unknown output, a temperature that is not > 0, an entropy mode not in
    ("differentiable", "detached"), or a model whose logit scale / softcap field is not a finite number.
    """
    outputs = _check_outputs(outputs)
    check_number("temperature", temperature, minimum=0, strict=True)
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"entropy must be one of {ENTROPY_MODES}, got {entropy!r}")
    return_entropy = ("entropy" in outputs) and (True if entropy == "differentiable" else "detached")
    text_config = model.config.get_text_config()
    scale, cap = logit_transform(text_config)
    original_forward = model.forward
    if isinstance(original_forward, types.MethodType) and original_forward.__self__ is model:
        # call it on ``self``, so that a deep copy of the patched model runs its own forward, not the original's
        original_forward = original_forward.__func__
        bound = False
    else:  # a wrapper (e.g. accelerate's hooks) that is not a method of the model
        bound = True
    legacy_vlm = text_config is not model.config and Version(_TRANSFORMERS_VERSION) < Version("5.0.0")
    backbone_attr = "model" if legacy_vlm else "base_model"

    @functools.wraps(type(model).forward)  # keep the signature: generate validates its model kwargs against it
    def _saga_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                      **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs) if bound else original_forward(self, *args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels): the head scores the next tokens")
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        if shift_labels is None:
            hidden, targets = backbone_outputs.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, targets = backbone_outputs.last_hidden_state, shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        hidden, targets = hidden.to(weight.device), targets.to(weight.device)
        mask = targets != -100
        if isinstance(weight, torch.distributed.tensor.DTensor):  # FSDP2: gather the head for this call
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        if cast_lm_head_to_fp32:
            hidden = hidden.float()
        elif torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        zero3 = is_deepspeed_zero3_enabled()
        with maybe_gather_lm_head_ctx(weight, bias), torch.autocast(hidden.device.type, enabled=False):
            out = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=-100,
                                  return_entropy=return_entropy, logit_scale=scale, softcap=cap,
                                  weight_context=(lambda: maybe_gather_lm_head_ctx(weight, bias)) if zero3 else None,
                                  impl=impl)
        log_probs, ent = out if return_entropy else (out, None)
        divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / divisor
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(self, text_config, backbone_outputs, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=ent, label_mask=mask, aux_loss=aux_loss)

    model.forward = types.MethodType(_saga_forward, model)


class SagaLMHeadMixin:
    """Mixed into a TRL trainer (listed before it), gives the policy and the reference model this library's
    fused head instead of TRL's: every ``add_fused_lm_head`` call the trainer's ``__init__`` makes goes to
    :func:`add_saga_lm_head`, with ``impl`` (the ``saga_impl`` keyword) and the entropy mode the trainer
    needs (:meth:`saga_entropy_mode`). Usage: ``class MyTrainer(SagaLMHeadMixin, trl.RLOOTrainer)``.
    """

    def __init__(self, *args, saga_impl: str | None = None, **kwargs):
        self.saga_impl = saga_impl
        modules = {sys.modules[c.__module__] for c in type(self).__mro__
                   if c.__module__.startswith("trl.") and hasattr(sys.modules[c.__module__], "add_fused_lm_head")}
        if not modules:
            raise TypeError(f"{type(self).__name__}: SagaLMHeadMixin must be mixed into a TRL trainer that calls "
                            "add_fused_lm_head (trl >= 1.15)")
        with contextlib.ExitStack() as stack:
            for module in modules:
                stack.enter_context(mock.patch.object(module, "add_fused_lm_head", self._saga_add_lm_head))
            super().__init__(*args, **kwargs)

    def saga_entropy_mode(self) -> str:
        """"differentiable" unless the trainer is known to only read the entropy (subclasses say so)."""
        return "differentiable"

    def _saga_add_lm_head(self, model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        add_saga_lm_head(model, temperature, cast_lm_head_to_fp32, outputs, impl=self.saga_impl,
                         entropy=self.saga_entropy_mode())


class SagaGRPOTrainer(SagaLMHeadMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with saga_kernels' fused head on the policy and the reference model. Same arguments, plus
    ``saga_impl``. The entropy (metrics, ``top_entropy_quantile``) is read without a gradient unless the entropy
    bonus is on (``entropy_coef != 0`` or ``use_adaptive_entropy``)."""

    def saga_entropy_mode(self) -> str:
        return "differentiable" if self._entropy_bonus_enabled else "detached"


class SagaRLOOTrainer(SagaLMHeadMixin, trl.RLOOTrainer):
    """``trl.RLOOTrainer`` with saga_kernels' fused head; RLOO reads the entropy for its metric only."""

    def saga_entropy_mode(self) -> str:
        return "detached"


__all__ = ["add_saga_lm_head", "logit_transform", "SagaLMHeadMixin", "SagaGRPOTrainer", "SagaRLOOTrainer"]
