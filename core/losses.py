"""Loss functions for post-training: pure tensor maths, nothing else.

What is here
------------
- ``agg_loss``: reduce a per-token loss ``[B, T]`` under a mask to a scalar, in the four
  aggregation modes of verl (token-mean, seq-mean-token-sum, seq-mean-token-mean,
  seq-mean-token-sum-norm).
- ``policy_loss``: the PPO/GRPO clipped surrogate with decoupled low/high clip ranges.
- ``kl_penalty``: Schulman's per-token KL estimators k1, k2, k3 between the policy and a reference.
- ``distill_loss`` / ``distill_per_token``: a divergence between student and teacher next-token
  distributions at every masked position (reverse KL, forward KL, generalised JSD), over the full
  vocabulary (computed in chunks of positions so memory stays bounded at a 150k vocabulary) or
  over a top-k support (the teacher's, the student's, or their union), with a temperature.
- ``distill_loss_from_hidden``: the same full-vocabulary loss from the student's hidden states and
  LM head weight (and the teacher's logits, or its hidden states and LM head), fused with the
  projection: chunks of positions go through ``h @ W^T``, the divergence and its gradient one at a
  time, so no ``[N, V]`` logits exist (memory independent of the number of positions).
- ``DIVERGENCES``: a registry of divergences by name (``register_divergence`` adds one).

What is left out
----------------
No models, no configs, no tokenisation, no distributed reductions: the callers pass tensors and
get back a scalar loss plus a dict of floats for logging. Advantages live in ``core.advantages``,
rewards in ``core.rewards``. No temperature-squared rescaling of distillation losses (as in TRL's
GKD). No tail bucket for top-k supports: both distributions are renormalised over the support.

Shapes: ``logp``, ``mask`` and per-token ``advantages`` are ``[B, T]``; logits ``[B, T, V]``;
top-k tensors ``[B, T, k]``. ``mask`` is 1 for completion tokens (up to and including EOS) and 0
elsewhere.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "DIVERGENCES",
    "SUPPORTS",
    "DEFAULT_CHUNK_SIZE",
    "agg_loss",
    "policy_loss",
    "kl_penalty",
    "register_divergence",
    "get_divergence",
    "distill_per_token",
    "distill_loss",
    "distill_loss_from_hidden",
]

Metrics = Dict[str, float]

# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (no NaN, no gradient blow-up)."""
    ok = den != 0
    return torch.where(ok, num, torch.zeros_like(num)) / torch.where(ok, den, torch.ones_like(den))


def agg_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    norm_len: Optional[float] = None,
    global_tokens: Optional[float] = None,
    global_seqs: Optional[float] = None,
) -> torch.Tensor:
    """Aggregate a per-token loss into a scalar.

    Args:
        per_token: ``[B, T]`` loss per token. Values outside the mask are ignored (they may be
            anything finite).
        mask: ``[B, T]`` 1 for tokens that count, 0 elsewhere (bool or float).
        mode: one of ``AGG_MODES``:

            - ``token-mean``: ``sum(x * m) / sum(m)``; every token weighs the same.
            - ``seq-mean-token-sum``: ``mean_b sum_t(x * m)``; per-sequence sums, averaged over
              the ``B`` sequences.
            - ``seq-mean-token-mean``: ``mean_b [sum_t(x * m) / sum_t(m)]``; every sequence weighs
              the same whatever its length.
            - ``seq-mean-token-sum-norm``: ``sum(x * m) / (B * L)`` with the constant ``L =
              norm_len`` (default ``mask.shape[-1]``, the padded length): Dr.GRPO's normaliser,
              which does not depend on the completion lengths. Pass the maximum generation
              length as ``norm_len`` to keep it constant across batches.
        norm_len: the constant ``L`` of ``seq-mean-token-sum-norm``; ignored by other modes.
        global_tokens, global_seqs: the denominators of the whole optimizer step, when this
            batch is one part (a micro-batch, one process's share) of it: ``sum(m)`` is replaced
            by ``global_tokens`` (token-mean) and ``B`` by ``global_seqs`` (seq-mean modes), so
            the parts' results add up to the loss of the whole batch taken at once, whatever
            the split (transformers' ``num_items_in_batch``, verl's global token count). None:
            this batch's own.

    Returns:
        scalar tensor.

    Empty masks never produce NaN: a batch with no token gives 0 (still attached to the graph),
    a sequence with no token contributes 0 to the seq-mean modes and still counts in ``B``
    (verl's convention).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token shape {tuple(per_token.shape)} != mask shape {tuple(mask.shape)}")
    if per_token.dim() != 2:
        raise ValueError(f"agg_loss expects [B, T] tensors, got shape {tuple(per_token.shape)}")
    m = mask.to(per_token.dtype)
    # where() rather than x * m so that inf/NaN outside the mask cannot leak in.
    x = torch.where(m != 0, per_token, torch.zeros_like(per_token)) * m
    batch = per_token.shape[0] if global_seqs is None else float(global_seqs)
    if mode == "token-mean":
        return _safe_div(x.sum(), m.sum() if global_tokens is None else x.new_tensor(float(global_tokens)))
    if mode == "seq-mean-token-sum":
        return x.sum(-1).sum() / max(batch, 1)
    if mode == "seq-mean-token-mean":
        return _safe_div(x.sum(-1), m.sum(-1)).sum() / max(batch, 1)
    # seq-mean-token-sum-norm
    length = float(mask.shape[-1] if norm_len is None else norm_len)
    if length <= 0:
        raise ValueError(f"norm_len must be > 0, got {norm_len}")
    return x.sum() / (max(batch, 1) * length)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(x.dtype)
    den = float(m.sum())
    if den == 0:
        return 0.0
    return float((torch.where(m != 0, x, torch.zeros_like(x)) * m).sum() / den)


# --------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    *,
    norm_len: Optional[float] = None,
    global_tokens: Optional[float] = None,
    global_seqs: Optional[float] = None,
    is_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (GRPO's policy loss, with DAPO's decoupled clip range).

    ``ratio = exp(logp - old_logp)`` and, per token,
    ``loss_t = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)``,
    aggregated with ``agg_loss(loss_t, mask, agg)``. Where the clipped term is the active one the
    gradient is zero. The log-ratio is clamped to [-20, 20] before ``exp`` for numerical safety.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (with grad).
        old_logp: ``[B, T]`` log-probs under the sampling policy (no grad needed; detached here).
        advantages: ``[B, T]`` per-token advantages, or ``[B]`` per-sequence (broadcast over T).
        mask: ``[B, T]`` completion mask.
        clip_low, clip_high: clip range ``[1 - clip_low, 1 + clip_high]``.
        agg: aggregation mode, see ``agg_loss``.
        norm_len, global_tokens, global_seqs: passed to ``agg_loss``.
        is_weights: optional ``[B, T]`` per-token weights (no grad) multiplied into ``loss_t``:
            truncated importance sampling, ``min(p_trainer / p_engine, cap)``, when the samples
            came from another engine than the trainer (``core.vllm_engine.tis_weights``).

    Returns:
        ``(loss, metrics)``; metrics (floats, means over masked tokens): ``pg_loss``,
        ``clip_frac`` (share of tokens where clipping is active, i.e. the gradient is zero),
        ``clip_frac_low`` / ``clip_frac_high`` (active at the lower / upper bound), ``ratio_mean``,
        ``ratio_min``, ``ratio_max``, ``approx_kl`` (k1 estimate of KL(old || new), verl's
        ``ppo_kl``), ``approx_kl_k3``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    if not (logp.shape == old_logp.shape == advantages.shape == mask.shape):
        raise ValueError(
            "policy_loss shape mismatch: "
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, "
            f"advantages {tuple(advantages.shape)}, mask {tuple(mask.shape)}"
        )
    advantages = advantages.detach().to(logp.dtype)
    old_logp = old_logp.detach()
    log_ratio = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * clipped
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    if is_weights is not None:
        if is_weights.shape != per_token.shape:
            raise ValueError(f"policy_loss: is_weights {tuple(is_weights.shape)} is not {tuple(per_token.shape)}")
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    loss = agg_loss(per_token, mask, agg, norm_len=norm_len, global_tokens=global_tokens, global_seqs=global_seqs)

    with torch.no_grad():
        active = (loss_clipped > loss_unclipped).float()
        low = active * (ratio < 1.0 - clip_low).float()
        high = active * (ratio > 1.0 + clip_high).float()
        mbool = mask.bool()
        r_masked = ratio[mbool]
        lr = log_ratio.detach()
        metrics = {
            "pg_loss": float(loss.detach()),
            "clip_frac": _masked_mean(active, mask),
            "clip_frac_low": _masked_mean(low, mask),
            "clip_frac_high": _masked_mean(high, mask),
            "ratio_mean": _masked_mean(ratio.detach(), mask),
            "ratio_min": float(r_masked.min()) if r_masked.numel() else 1.0,
            "ratio_max": float(r_masked.max()) if r_masked.numel() else 1.0,
            "approx_kl": _masked_mean(-lr, mask),
            "approx_kl_k3": _masked_mean(torch.exp(-lr) + lr - 1.0, mask),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# KL penalty
# --------------------------------------------------------------------------------------------


def _kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def _kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp).square()


def _kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


KL_ESTIMATORS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
}


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: str = "k3",
    *,
    clamp: Optional[float] = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman, 2020).

    With ``d = ref_logp - logp`` (tokens sampled from pi):

    - ``k1``: ``logp - ref_logp = -d`` (unbiased, high variance, can be negative);
    - ``k2``: ``0.5 * d**2`` (biased, low variance, >= 0);
    - ``k3``: ``exp(d) - d - 1`` (unbiased, low variance, >= 0; the GRPO paper's choice).

    Args:
        logp, ref_logp: ``[B, T]`` (any matching shape).
        kind: ``k1`` | ``k2`` | ``k3``.
        clamp: if given, the result is clamped to ``[-clamp, clamp]`` (verl clamps k3 at 10).

    Returns:
        per-token tensor of the input shape (not masked; aggregate with ``agg_loss``).
    """
    try:
        fn = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator {kind!r}; valid kinds: {', '.join(KL_ESTIMATORS)}") from None
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp shape {tuple(logp.shape)} != ref_logp shape {tuple(ref_logp.shape)}")
    out = fn(logp, ref_logp)
    if clamp is not None:
        out = torch.clamp(out, min=-clamp, max=clamp)
    return out


# --------------------------------------------------------------------------------------------
# Divergences between next-token distributions
# --------------------------------------------------------------------------------------------
#
# A divergence takes student and teacher log-probs over the same support, ``s`` and ``t`` of
# shape ``[N, K]`` (each row a normalised distribution over the valid entries), an optional
# validity mask ``valid`` ``[N, K]`` (False entries are padding: log-prob -inf, ignored), and
# ``beta``; it returns ``[N]``.

DivergenceFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], float], torch.Tensor]
DIVERGENCES: Dict[str, DivergenceFn] = {}


def register_divergence(name: str) -> Callable[[DivergenceFn], DivergenceFn]:
    """Decorator: register ``fn(s, t, valid, beta) -> [N]`` under ``name``."""

    def deco(fn: DivergenceFn) -> DivergenceFn:
        if name in DIVERGENCES and DIVERGENCES[name] is not fn:
            raise ValueError(f"divergence {name!r} is already registered")
        DIVERGENCES[name] = fn
        return fn

    return deco


def get_divergence(name: str) -> DivergenceFn:
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; valid divergences: {', '.join(DIVERGENCES)}") from None


def _zero_invalid(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    # where() before any arithmetic so that -inf padding never produces NaN values or gradients.
    if valid is None:
        return x
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


@register_divergence("reverse_kl")
def reverse_kl(s: torch.Tensor, t: torch.Tensor, valid: Optional[torch.Tensor] = None, beta: float = 0.5) -> torch.Tensor:
    """KL(S || T) = sum_v p_S (log p_S - log p_T): mode-seeking, the on-policy distillation default."""
    s0, t0 = _zero_invalid(s, valid), _zero_invalid(t, valid)
    p = _zero_invalid(s0.exp(), valid)
    return (p * (s0 - t0)).sum(-1)


@register_divergence("forward_kl")
def forward_kl(s: torch.Tensor, t: torch.Tensor, valid: Optional[torch.Tensor] = None, beta: float = 0.5) -> torch.Tensor:
    """KL(T || S) = sum_v p_T (log p_T - log p_S): mass-covering, classic (Hinton) distillation."""
    s0, t0 = _zero_invalid(s, valid), _zero_invalid(t, valid)
    q = _zero_invalid(t0.exp(), valid)
    return (q * (t0 - s0)).sum(-1)


@register_divergence("jsd")
def generalized_jsd(s: torch.Tensor, t: torch.Tensor, valid: Optional[torch.Tensor] = None, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024), TRL's convention.

    ``M = beta * P_T + (1 - beta) * P_S`` and
    ``JSD_beta = beta * KL(T || M) + (1 - beta) * KL(S || M)``.
    As in TRL's ``generalized_jsd_loss``, the end points are the plain KLs:
    ``beta = 0`` gives forward KL(T || S), ``beta = 1`` gives reverse KL(S || T) (the mixture
    formula itself tends to ``beta * KL(T||S)`` and ``(1-beta) * KL(S||T)`` there). ``beta = 0.5``
    is the symmetric JSD.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(s, t, valid)
    if beta == 1.0:
        return reverse_kl(s, t, valid)
    s0, t0 = _zero_invalid(s, valid), _zero_invalid(t, valid)
    log_m = torch.logaddexp(t0 + math.log(beta), s0 + math.log1p(-beta))
    p = _zero_invalid(s0.exp(), valid)
    q = _zero_invalid(t0.exp(), valid)
    return beta * (q * (t0 - log_m)).sum(-1) + (1.0 - beta) * (p * (s0 - log_m)).sum(-1)


def _entropy(logp: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[N, K]`` log-probs -> ``[N]`` entropy over the valid entries."""
    l0 = _zero_invalid(logp, valid)
    return -(_zero_invalid(l0.exp(), valid) * l0).sum(-1)


# --------------------------------------------------------------------------------------------
# Full-vocabulary divergence, chunked over positions
# --------------------------------------------------------------------------------------------


def _full_rows(
    z_s: torch.Tensor, z_t: torch.Tensor, fn: DivergenceFn, beta: float, temperature: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of logits ``[n, V]`` -> (divergence ``[n]``, student entropy, teacher entropy)."""
    s = F.log_softmax(z_s.float() / temperature, dim=-1)
    t = F.log_softmax(z_t.float() / temperature, dim=-1)
    d = fn(s, t, None, beta)
    with torch.no_grad():
        ent_s, ent_t = _entropy(s.detach()), _entropy(t.detach())
    return d, ent_s, ent_t


class _ChunkedFullDivergence(torch.autograd.Function):
    """Per-row divergence over the full vocabulary, computed ``chunk`` rows at a time.

    Forward runs each chunk without a graph; backward recomputes each chunk with autograd and
    writes its gradient into the rows of one preallocated gradient tensor. Peak memory is the
    logits, their gradient (which any backward needs) and the temporaries of one chunk, whatever
    the number of positions.
    """

    @staticmethod
    def forward(ctx, student_flat, teacher_flat, rows, fn, beta, temperature, chunk):
        outs, ents_s, ents_t = [], [], []
        for start in range(0, rows.numel(), chunk):
            r = rows[start : start + chunk]
            d, es, et = _full_rows(student_flat[r], teacher_flat[r], fn, beta, temperature)
            outs.append(d)
            ents_s.append(es)
            ents_t.append(et)
        ctx.save_for_backward(student_flat, teacher_flat, rows)
        ctx.fn, ctx.beta, ctx.temperature, ctx.chunk = fn, beta, temperature, chunk
        ent_s, ent_t = torch.cat(ents_s), torch.cat(ents_t)
        ctx.mark_non_differentiable(ent_s, ent_t)
        return torch.cat(outs), ent_s, ent_t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_d, _grad_es, _grad_et):
        student_flat, teacher_flat, rows = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_s = torch.zeros_like(student_flat) if need_s else None
        grad_t = torch.zeros_like(teacher_flat) if need_t else None
        for start in range(0, rows.numel(), ctx.chunk):
            r = rows[start : start + ctx.chunk]
            with torch.enable_grad():
                z_s = student_flat[r].detach().requires_grad_(need_s)
                z_t = teacher_flat[r].detach().requires_grad_(need_t)
                s = F.log_softmax(z_s.float() / ctx.temperature, dim=-1)
                t = F.log_softmax(z_t.float() / ctx.temperature, dim=-1)
                d = ctx.fn(s, t, None, ctx.beta)
                inputs = [x for x, need in ((z_s, need_s), (z_t, need_t)) if need]
                grads = torch.autograd.grad(d, inputs, grad_d[start : start + ctx.chunk])
            grads = list(grads)
            if need_s:
                grad_s.index_copy_(0, r, grads.pop(0).to(grad_s.dtype))
            if need_t:
                grad_t.index_copy_(0, r, grads.pop(0).to(grad_t.dtype))
        return grad_s, grad_t, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Distillation loss
# --------------------------------------------------------------------------------------------

SUPPORTS = ("full", "teacher_topk", "student_topk", "union_topk")
DEFAULT_CHUNK_SIZE = 256


def _rows_of(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[B, T, ...]`` -> ``[N, ...]`` at the flattened positions ``rows``."""
    return x.reshape(-1, *x.shape[2:])[rows]


def distill_per_token(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    teacher_topk_ids: Optional[torch.Tensor] = None,
    teacher_topk_logp: Optional[torch.Tensor] = None,
    mask: torch.Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    support: str = "full",
    top_k: Optional[int] = None,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
) -> Tuple[torch.Tensor, Metrics]:
    """Per-token divergence ``[B, T]`` (0 outside ``mask``) and metrics; see ``distill_loss``."""
    fn = get_divergence(divergence)
    if support not in SUPPORTS:
        raise ValueError(f"unknown support {support!r}; valid supports: {', '.join(SUPPORTS)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    B, T, V = student_logits.shape
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match student_logits [B, T] = {(B, T)}")
    have_topk = teacher_topk_ids is not None or teacher_topk_logp is not None
    if teacher_logits is not None and have_topk:
        raise ValueError("give either teacher_logits or teacher_topk_ids/teacher_topk_logp, not both")
    if teacher_logits is None and not have_topk:
        raise ValueError("distill_loss needs teacher_logits or teacher_topk_ids + teacher_topk_logp")
    if have_topk and (teacher_topk_ids is None or teacher_topk_logp is None):
        raise ValueError("teacher_topk_ids and teacher_topk_logp must be given together")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
            f"{tuple(student_logits.shape)} (teacher and student vocabularies must agree)"
        )
    if have_topk:
        if teacher_topk_ids.shape != teacher_topk_logp.shape or tuple(teacher_topk_ids.shape[:2]) != (B, T):
            raise ValueError(
                f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logp "
                f"{tuple(teacher_topk_logp.shape)} must both be [B, T, k] with [B, T] = {(B, T)}"
            )
        if support != "teacher_topk":
            raise ValueError(
                f"support {support!r} needs the teacher's full logits (the student's top-k ids are "
                "not in the teacher's top-k in general); with only teacher_topk_ids/teacher_topk_logp "
                "use support='teacher_topk'"
            )
    if support != "full" and top_k is None and not have_topk:
        raise ValueError(f"support {support!r} needs top_k")
    if top_k is not None and support != "full" and top_k <= 0:
        raise ValueError(f"top_k must be > 0, got {top_k}")

    rows = mask.reshape(-1).nonzero().squeeze(-1)
    n = rows.numel()
    per_token_flat = student_logits.new_zeros(B * T, dtype=torch.float32)
    if n == 0:
        # No token: a zero that is still attached to the student's graph.
        per_token = per_token_flat.reshape(B, T) + 0.0 * student_logits.sum().float()
        metrics = {"divergence": 0.0, "topk_support_size": 0.0, "student_entropy": 0.0,
                   "teacher_entropy": 0.0, "num_tokens": 0.0}
        return per_token, metrics

    valid = None
    if support == "full":
        support_size = float(V)
        if chunk_size is None or chunk_size >= n:
            d, ent_s, ent_t = _full_rows(
                _rows_of(student_logits, rows), _rows_of(teacher_logits, rows), fn, beta, temperature
            )
        else:
            if chunk_size <= 0:
                raise ValueError(f"chunk_size must be > 0 or None, got {chunk_size}")
            d, ent_s, ent_t = _ChunkedFullDivergence.apply(
                student_logits.reshape(B * T, V), teacher_logits.reshape(B * T, V), rows,
                fn, beta, temperature, int(chunk_size),
            )
    else:
        if support == "teacher_topk":
            if teacher_logits is not None:
                if top_k > V:
                    raise ValueError(f"top_k={top_k} exceeds the vocabulary size {V}")
                ids = teacher_logits.detach().topk(top_k, dim=-1).indices
                ids = _rows_of(ids, rows)
                t_logits = _rows_of(teacher_logits, rows).gather(-1, ids)
            else:
                ids_all, lp_all = _rows_of(teacher_topk_ids, rows), _rows_of(teacher_topk_logp, rows)
                k_given = ids_all.shape[-1]
                if top_k is not None and top_k > k_given:
                    raise ValueError(f"top_k={top_k} but the teacher gave only {k_given} ids per position")
                if top_k is not None and top_k < k_given:
                    lp_all, pick = lp_all.topk(top_k, dim=-1)
                    ids_all = ids_all.gather(-1, pick)
                valid = torch.isfinite(lp_all)
                bad = ~valid.any(-1)
                if bool(bad.any()):
                    where = rows[bad.nonzero().squeeze(-1)[0]].item()
                    raise ValueError(
                        f"teacher_topk_logp has no finite entry at masked position "
                        f"(b={where // T}, t={where % T}); the teacher did not score that token"
                    )
                if bool(((ids_all < 0) | (ids_all >= V))[valid].any()):
                    raise ValueError(f"teacher_topk_ids out of range [0, {V}) at a valid entry")
                ids = torch.where(valid, ids_all, torch.zeros_like(ids_all)).long()
                t_logits = lp_all.float()
                if bool(valid.all()):
                    valid = None
        elif support == "student_topk":
            if top_k > V:
                raise ValueError(f"top_k={top_k} exceeds the vocabulary size {V}")
            ids = _rows_of(student_logits.detach().topk(top_k, dim=-1).indices, rows)
            t_logits = _rows_of(teacher_logits, rows).gather(-1, ids)
        else:  # union_topk: teacher's ids, then the student's ids not already there (padding).
            if top_k > V:
                raise ValueError(f"top_k={top_k} exceeds the vocabulary size {V}")
            t_ids = _rows_of(teacher_logits.detach().topk(top_k, dim=-1).indices, rows)
            s_ids = _rows_of(student_logits.detach().topk(top_k, dim=-1).indices, rows)
            dup = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(-1)  # [N, k]
            ids = torch.cat([t_ids, s_ids], dim=-1)
            valid = torch.cat([torch.ones_like(dup), ~dup], dim=-1)
            t_logits = _rows_of(teacher_logits, rows).gather(-1, ids)
        s_logits = _rows_of(student_logits, rows).gather(-1, ids)
        s_logits = s_logits.float() / temperature
        t_logits = t_logits.float() / temperature
        if valid is not None:
            neg_inf = torch.tensor(float("-inf"), device=s_logits.device)
            s_logits = torch.where(valid, s_logits, neg_inf)
            t_logits = torch.where(valid, t_logits, neg_inf)
        s = F.log_softmax(s_logits, dim=-1)
        t = F.log_softmax(t_logits, dim=-1)
        d = fn(s, t, valid, beta)
        with torch.no_grad():
            ent_s, ent_t = _entropy(s.detach(), valid), _entropy(t.detach(), valid)
            support_size = float(ids.shape[-1] if valid is None else valid.sum(-1).float().mean())

    per_token = per_token_flat.index_put((rows,), d.float()).reshape(B, T)
    with torch.no_grad():
        metrics = {
            "divergence": float(d.detach().mean()),
            "topk_support_size": support_size,
            "student_entropy": float(ent_s.mean()),
            "teacher_entropy": float(ent_t.mean()),
            "num_tokens": float(n),
        }
    return per_token, metrics


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    teacher_topk_ids: Optional[torch.Tensor] = None,
    teacher_topk_logp: Optional[torch.Tensor] = None,
    mask: torch.Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    support: str = "full",
    top_k: Optional[int] = None,
    agg: str = "token-mean",
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    norm_len: Optional[float] = None,
    global_tokens: Optional[float] = None,
    global_seqs: Optional[float] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Divergence between student and teacher next-token distributions at masked positions.

    Args:
        student_logits: ``[B, T, V]`` (any float dtype; computed in float32). Gradient flows here.
        teacher_logits: ``[B, T, V]`` or None when only top-k is available.
        teacher_topk_ids: ``[B, T, k]`` int ids of the teacher's top-k (e.g. from a remote teacher).
        teacher_topk_logp: ``[B, T, k]`` the teacher's log-probs (temperature 1) at those ids.
            Non-finite entries are treated as absent (padding); a masked position with no finite
            entry is an error.
        mask: ``[B, T]`` positions that count.
        divergence: a name in ``DIVERGENCES``: ``reverse_kl`` KL(S||T), ``forward_kl`` KL(T||S),
            ``jsd`` generalised JSD with ``M = beta*P_T + (1-beta)*P_S``,
            ``beta*KL(T||M) + (1-beta)*KL(S||M)`` (TRL's GKD convention: ``beta=0`` is forward
            KL, ``beta=1`` reverse KL).
        beta: JSD interpolation, in [0, 1]; ignored by the KLs.
        temperature: both logits are divided by it before the softmax (also the teacher's top-k
            log-probs, which is the same up to the renormalisation over the support).
        support:
            - ``full``: the whole vocabulary, computed ``chunk_size`` masked positions at a time;
              forward and backward keep only one chunk's ``[chunk, V]`` temporaries alive.
            - ``teacher_topk``: the teacher's top-``top_k`` ids (from ``teacher_logits``, or the
              given ``teacher_topk_ids`` / ``teacher_topk_logp``; ``top_k`` None uses all given).
            - ``student_topk``: the student's top-``top_k`` ids (needs ``teacher_logits``).
            - ``union_topk``: the union of both top-``top_k`` sets per position, as a padded set of
              ``2*top_k`` ids with a validity mask (needs ``teacher_logits``).
            On a top-k support both distributions are renormalised over the support; ids are
            chosen without gradient.
        top_k: size of the top-k sets; ignored for ``full``.
        agg: aggregation mode of ``agg_loss``.
        chunk_size: positions per chunk for ``full`` (default 256: at a 151,936 vocabulary one
            float32 ``[256, V]`` temporary is ~150 MB); None computes all positions at once with
            plain autograd (several ``[N, V]`` float32 tensors alive at the peak).
        norm_len, global_tokens, global_seqs: passed to ``agg_loss``.

    Returns:
        ``(loss, metrics)``; metrics: ``distill_loss``, ``divergence`` (mean per-token divergence),
        ``topk_support_size`` (mean support size; V for ``full``), ``student_entropy`` and
        ``teacher_entropy`` (mean over positions, over the support, after temperature),
        ``num_tokens``.
    """
    per_token, metrics = distill_per_token(
        student_logits, teacher_logits,
        teacher_topk_ids=teacher_topk_ids, teacher_topk_logp=teacher_topk_logp, mask=mask,
        divergence=divergence, beta=beta, temperature=temperature, support=support, top_k=top_k,
        chunk_size=chunk_size,
    )
    loss = agg_loss(per_token, mask, agg, norm_len=norm_len, global_tokens=global_tokens, global_seqs=global_seqs)
    metrics = {"distill_loss": float(loss.detach()), **metrics}
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Distillation loss fused with the LM head (hidden states in, no [N, V] tensor kept)
# --------------------------------------------------------------------------------------------


def _dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``[n, V] x [n, V] -> [n]`` row-wise dot product through the preallocated ``scratch``.

    ``sum`` (pairwise/vectorised) rather than ``bmm``: a float32 ``bmm`` of ``[1, V] @ [V, 1]``
    accumulates sequentially and loses ~1e-4 relative at V = 150k.
    """
    return torch.mul(a, b, out=scratch).sum(-1)


def _project_rows(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[n, H] @ [V, H]^T`` in the weight's dtype, then float32 divided by the temperature."""
    z = h.to(weight.dtype) @ weight.t()
    z = z.float() if z.dtype != torch.float32 else z
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _log_softmax_(z: torch.Tensor) -> torch.Tensor:
    """In-place log-softmax over the last dim of a float32 ``[n, V]`` tensor."""
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


def _fused_chunk(
    s: torch.Tensor, t: torch.Tensor, kind: str, beta: float, want_grad: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One chunk of log-probs ``s``, ``t`` ``[n, V]`` (both overwritten) -> (d, ent_s, ent_t, G).

    ``G`` is d(d_row)/d(scaled student logits), row by row: ``p (s - t - d)`` for reverse KL,
    ``p - q`` for forward KL, ``(1 - beta) p (s - m - KL(S||M))`` for the generalised JSD.
    At most five ``[n, V]`` float32 tensors are alive at once (``s``, ``t`` included).
    """
    scratch = torch.empty_like(s)
    q = t.exp()
    ent_t = -_dot(q, t, scratch)
    if kind == "reverse_kl":
        del q
        p = s.exp()
        ent_s = -_dot(p, s, scratch)
        diff = t.neg_().add_(s)  # s - t
        d = _dot(p, diff, scratch)
        g = diff.sub_(d.unsqueeze(-1)).mul_(p) if want_grad else None
        return d, ent_s, ent_t, g
    if kind == "forward_kl":
        d = _dot(q, t.sub_(s), scratch)  # sum q (t - s)
        p = torch.exp(s, out=t)
        ent_s = -_dot(p, s, scratch)
        g = p.sub_(q) if want_grad else None
        return d, ent_s, ent_t, g
    # generalised JSD, 0 < beta < 1
    log_m = torch.add(s, math.log1p(-beta), out=scratch)
    del scratch
    log_m = torch.logaddexp(log_m, t + math.log(beta), out=log_m)
    kl_t = _dot(q, t.sub_(log_m), t)  # KL(T || M); t is free afterwards
    p = torch.exp(s, out=q)
    del q
    ent_s = -_dot(p, s, t)
    sm = s.sub_(log_m)  # s - m
    del log_m
    kl_s = _dot(p, sm, t)  # KL(S || M)
    d = beta * kl_t + (1.0 - beta) * kl_s
    g = sm.sub_(kl_s.unsqueeze(-1)).mul_(p).mul_(1.0 - beta) if want_grad else None
    return d, ent_s, ent_t, g


class _FusedHiddenDivergence(torch.autograd.Function):
    """``sum_r w_r * D(softmax(h_r W^T / tau), teacher_r)`` over rows, chunk by chunk.

    The row weights ``w`` (from the aggregation mode) are known in advance, so the gradient with
    respect to the student's hidden rows and LM head weight is accumulated during the forward
    pass, chunk by chunk, while the chunk's logits exist; backward only scales it by the incoming
    scalar gradient. No logits are recomputed and no ``[N, V]`` tensor is kept: the peak is the
    temporaries of one ``[chunk, V]`` chunk plus a float32 ``[V, H]`` gradient buffer.
    The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, h, weight, row_w, t_logits, t_hidden, t_weight, fn, kind, beta, temperature, chunk, grad_h, grad_w):
        n = h.shape[0]
        gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if grad_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else None
        want_grad = grad_h or grad_w
        w_f32 = weight if weight.dtype == torch.float32 else None
        ds, es, ets = [], [], []
        row_w = row_w.float()
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            h_c = h[sl]
            z_s = _project_rows(h_c, weight, temperature)
            if t_logits is not None:
                z_t = t_logits[sl].to(torch.float32, copy=True)
                if temperature != 1.0:
                    z_t.div_(temperature)
            else:
                z_t = _project_rows(t_hidden[sl], t_weight, temperature)
            if kind is not None:
                s, t = _log_softmax_(z_s), _log_softmax_(z_t)
                d, e_s, e_t, g = _fused_chunk(s, t, kind, beta, want_grad)
            else:  # a registered divergence without a closed-form gradient: autograd on the chunk
                with torch.enable_grad():
                    zs = z_s.requires_grad_(want_grad)
                    s = F.log_softmax(zs, dim=-1)
                    t = F.log_softmax(z_t, dim=-1)
                    d = fn(s, t, None, beta)
                    g = torch.autograd.grad(d, zs, row_w[sl])[0] if want_grad else None
                d = d.detach()
                e_s, e_t = _entropy(s.detach()), _entropy(t)
            ds.append(d)
            es.append(e_s)
            ets.append(e_t)
            if want_grad:
                if kind is not None:
                    g.mul_(row_w[sl].unsqueeze(-1))
                if temperature != 1.0:
                    g.div_(temperature)
                if gh is not None:
                    if w_f32 is not None:
                        gh[sl].addmm_(g, w_f32)
                    else:
                        gh[sl].add_((g.to(weight.dtype) @ weight).float())
                if gw is not None:
                    gw.addmm_(g.t(), h_c.float())
            del z_s, z_t, s, t, g  # free this chunk's [chunk, V] tensors before the next one
        d, ent_s, ent_t = torch.cat(ds), torch.cat(es), torch.cat(ets)
        loss = (d * row_w).sum()
        ctx.save_for_backward(*(x for x in (gh, gw) if x is not None))
        ctx.has = (gh is not None, gw is not None)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.mark_non_differentiable(d, ent_s, ent_t)
        return loss, d, ent_s, ent_t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _gd, _ges, _get):
        saved = list(ctx.saved_tensors)
        gh = saved.pop(0) if ctx.has[0] else None
        gw = saved.pop(0) if ctx.has[1] else None
        out_h = (gh * grad_loss).to(ctx.dtypes[0]) if gh is not None else None
        out_w = (gw * grad_loss).to(ctx.dtypes[1]) if gw is not None else None
        return (out_h, out_w) + (None,) * 11


def distill_loss_from_hidden(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_lm_head_weight: Optional[torch.Tensor] = None,
    mask: torch.Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    agg: str = "token-mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    norm_len: Optional[float] = None,
    global_tokens: Optional[float] = None,
    global_seqs: Optional[float] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """``distill_loss(student_hidden @ lm_head_weight.T, teacher, ...)`` over the full vocabulary,
    fused with the LM head so that no ``[B, T, V]`` / ``[N, V]`` logits exist.

    The masked positions are processed ``chunk_size`` at a time: the chunk's student logits
    ``h @ W^T`` (and the teacher's, from ``teacher_hidden @ teacher_lm_head_weight^T`` under no
    gradient, or rows of ``teacher_logits``), the per-token divergence, and the chunk's
    contribution to the gradient with respect to ``student_hidden`` and ``lm_head_weight``
    (accumulated in float32 during the forward pass, since the aggregation weights are known; the
    backward pass only scales it). Peak memory: a few float32 ``[chunk_size, V]`` temporaries
    plus a float32 ``[V, H]`` gradient buffer, whatever ``B * T``.

    Args:
        student_hidden: ``[B, T, H]`` the student's last hidden states (before the LM head),
            aligned with the positions of ``mask``. Gradient flows here.
        lm_head_weight: ``[V, H]`` the student's LM head weight (no bias). Gradient flows here.
        teacher_logits: ``[B, T, V]`` teacher logits, or None when ``teacher_hidden`` is given.
        teacher_hidden: ``[B, T, H_t]`` the teacher's last hidden states (no gradient).
        teacher_lm_head_weight: ``[V, H_t]`` the teacher's LM head weight (no gradient).
        mask, divergence, beta, temperature, agg, norm_len, global_tokens, global_seqs: as in
            ``distill_loss``.
        chunk_size: masked positions per chunk (> 0).

    Returns:
        ``(loss, metrics)`` with the metrics of ``distill_loss`` (``topk_support_size`` is V).

    The teacher receives no gradient (it is detached). The loss supports one backward pass (no
    double backward). Matmuls run in the weights' dtype; everything after them in float32.
    """
    fn = get_divergence(divergence)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if agg not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {agg!r}; valid modes: {', '.join(AGG_MODES)}")
    if chunk_size is None or int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if student_hidden.dim() != 3:
        raise ValueError(f"student_hidden must be [B, T, H], got shape {tuple(student_hidden.shape)}")
    B, T, H = student_hidden.shape
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != H:
        raise ValueError(f"lm_head_weight must be [V, H] with H = {H}, got shape {tuple(lm_head_weight.shape)}")
    V = lm_head_weight.shape[0]
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match student_hidden [B, T] = {(B, T)}")
    have_hidden = teacher_hidden is not None or teacher_lm_head_weight is not None
    if teacher_logits is not None and have_hidden:
        raise ValueError("give either teacher_logits or teacher_hidden + teacher_lm_head_weight, not both")
    if teacher_logits is None and not have_hidden:
        raise ValueError("distill_loss_from_hidden needs teacher_logits or teacher_hidden + teacher_lm_head_weight")
    if have_hidden:
        if teacher_hidden is None or teacher_lm_head_weight is None:
            raise ValueError("teacher_hidden and teacher_lm_head_weight must be given together")
        if teacher_hidden.dim() != 3 or tuple(teacher_hidden.shape[:2]) != (B, T):
            raise ValueError(f"teacher_hidden must be [B, T, H_t] with [B, T] = {(B, T)}, got {tuple(teacher_hidden.shape)}")
        if teacher_lm_head_weight.dim() != 2 or teacher_lm_head_weight.shape != (V, teacher_hidden.shape[-1]):
            raise ValueError(
                f"teacher_lm_head_weight must be [V, H_t] = {(V, teacher_hidden.shape[-1])} (teacher and student "
                f"vocabularies must agree), got {tuple(teacher_lm_head_weight.shape)}"
            )
    elif tuple(teacher_logits.shape) != (B, T, V):
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != [B, T, V] = {(B, T, V)} "
            "(teacher and student vocabularies must agree)"
        )

    kind: Optional[str] = None
    if fn is reverse_kl or (fn is generalized_jsd and beta == 1.0):
        kind = "reverse_kl"
    elif fn is forward_kl or (fn is generalized_jsd and beta == 0.0):
        kind = "forward_kl"
    elif fn is generalized_jsd:
        kind = "jsd"

    rows = mask.reshape(-1).nonzero().squeeze(-1)
    n = rows.numel()
    if n == 0:
        loss = 0.0 * (student_hidden.sum() + lm_head_weight.sum()).float()
        metrics = {"distill_loss": 0.0, "divergence": 0.0, "topk_support_size": 0.0, "student_entropy": 0.0,
                   "teacher_entropy": 0.0, "num_tokens": 0.0}
        return loss, metrics

    # agg_loss is linear in the per-token loss: its gradient gives each position's weight.
    with torch.enable_grad():
        probe = torch.zeros((B, T), dtype=torch.float32, device=student_hidden.device, requires_grad=True)
        (w_bt,) = torch.autograd.grad(agg_loss(probe, mask, agg, norm_len=norm_len, global_tokens=global_tokens,
                                                global_seqs=global_seqs), probe)
    row_w = w_bt.reshape(-1)[rows]

    h_rows = student_hidden.reshape(B * T, H)[rows]
    t_logits = t_hidden = t_weight = None
    if teacher_logits is not None:
        t_logits = teacher_logits.detach().reshape(B * T, V)[rows]
    else:
        t_hidden = teacher_hidden.detach().reshape(B * T, -1)[rows]
        t_weight = teacher_lm_head_weight.detach()
    grad_on = torch.is_grad_enabled()
    loss, d, ent_s, ent_t = _FusedHiddenDivergence.apply(
        h_rows, lm_head_weight, row_w, t_logits, t_hidden, t_weight, fn, kind, float(beta), float(temperature),
        int(chunk_size), grad_on and student_hidden.requires_grad, grad_on and lm_head_weight.requires_grad,
    )
    with torch.no_grad():
        metrics = {
            "distill_loss": float(loss.detach()),
            "divergence": float(d.mean()),
            "topk_support_size": float(V),
            "student_entropy": float(ent_s.mean()),
            "teacher_entropy": float(ent_t.mean()),
            "num_tokens": float(n),
        }
    return loss, metrics
