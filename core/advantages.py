"""Advantages: what the policy loss multiplies the importance ratio by.

What is here
------------
- ``group_advantages``: GRPO's group-relative advantage of sequence rewards (``scale="std"``), or
  Dr.GRPO's unscaled version (``scale="none"``).
- ``group_stats``: logging numbers about the reward groups (share of groups with zero variance,
  which give no learning signal under GRPO).
- ``opd_advantages``: the sampled-token on-policy distillation advantage
  ``coef * (log p_T(y_t) - log p_S(y_t))`` (minus the per-token reverse-KL estimate), optionally
  added to a reward advantage (the hybrid: reward advantage - coef * reverse_kl_t).

What is left out
----------------
No losses (``core.losses``), no reward functions (``core.rewards``), no value functions / GAE, no
distributed gathering: callers pass whole groups. All outputs are detached: advantages are
constants for the policy gradient.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch

__all__ = ["ADV_SCALES", "group_advantages", "group_stats", "opd_advantages"]

ADV_SCALES = ("std", "none")

Rewards = Union[torch.Tensor, Sequence[float]]


def _grouped(rewards: Rewards, group_size: int) -> torch.Tensor:
    r = torch.as_tensor(rewards)
    if not torch.is_floating_point(r):
        r = r.float()
    r = r.detach().reshape(-1)
    if group_size <= 0:
        raise ValueError(f"group_size must be > 0, got {group_size}")
    if r.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({r.numel()}) is not divisible by group_size ({group_size}); "
            "rewards must be laid out group-contiguous: [prompt0 x G, prompt1 x G, ...]"
        )
    return r.reshape(-1, group_size)


def group_advantages(
    rewards: Rewards,
    group_size: int,
    scale: str = "std",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages of sequence rewards.

    Args:
        rewards: ``[B * G]`` rewards laid out group-contiguous: samples ``i*G .. i*G+G-1`` are the
            ``G`` completions of prompt ``i``.
        group_size: ``G``.
        scale: ``std`` (GRPO): ``A = (r - mean_g) / (std_g + eps)`` with the *unbiased* (Bessel,
            ``N - 1``) standard deviation, as ``torch.std`` in TRL and verl; a group of one
            sample has advantage 0. ``none`` (Dr.GRPO): ``A = r - mean_g``.
        eps: added to the standard deviation.

    Returns:
        ``[B * G]`` float tensor (detached), same layout as ``rewards``. Broadcast over tokens
        with ``A[:, None]`` (``core.losses.policy_loss`` accepts ``[B]`` directly).
    """
    if scale not in ADV_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid scales: {', '.join(ADV_SCALES)}")
    r = _grouped(rewards, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.reshape(-1)
    if group_size == 1:
        std = torch.zeros_like(r)
    else:
        std = r.std(dim=1, keepdim=True, correction=1)
    return (centred / (std + eps)).reshape(-1)


def group_stats(rewards: Rewards, group_size: int) -> Dict[str, float]:
    """Logging numbers about reward groups (floats).

    ``reward_mean``, ``reward_std`` (population, over all samples), ``reward_min``, ``reward_max``,
    ``group_std_mean`` (mean within-group unbiased std; 0 for ``G = 1``), ``zero_std_frac`` (share
    of groups whose rewards are all equal: zero advantage, no signal), ``num_groups``.
    """
    r = _grouped(rewards, group_size).double()
    flat = r.reshape(-1)
    if group_size > 1:
        gstd = r.std(dim=1, correction=1)
    else:
        gstd = torch.zeros(r.shape[0], dtype=r.dtype)
    all_equal = (r == r[:, :1]).all(dim=1)
    return {
        "reward_mean": float(flat.mean()) if flat.numel() else 0.0,
        "reward_std": float(flat.std(correction=0)) if flat.numel() else 0.0,
        "reward_min": float(flat.min()) if flat.numel() else 0.0,
        "reward_max": float(flat.max()) if flat.numel() else 0.0,
        "group_std_mean": float(gstd.mean()) if gstd.numel() else 0.0,
        "zero_std_frac": float(all_equal.double().mean()) if all_equal.numel() else 0.0,
        "num_groups": float(r.shape[0]),
    }


def opd_advantages(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    coef: float = 1.0,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token on-policy distillation advantage, optionally on top of a reward advantage.

    ``A_t = coef * (teacher_logp_t - student_logp_t)`` at the sampled tokens, i.e. minus ``coef``
    times the per-token (k1) reverse-KL estimate; with ``base``, ``A_t = base_t + coef * (...)``,
    the hybrid "reward advantage - coef * reverse_kl_t".

    Args:
        student_logp: ``[B, T]`` log-probs of the sampled tokens under the student (sampling) policy.
        teacher_logp: ``[B, T]`` the teacher's log-probs of the same tokens.
        mask: ``[B, T]`` completion mask.
        coef: weight of the distillation term.
        base: optional ``[B]`` per-sequence (broadcast over tokens) or ``[B, T]`` per-token reward
            advantage.

    Returns:
        ``[B, T]`` detached float tensor, exactly 0 outside ``mask`` (non-finite log-probs at
        padding do not leak).
    """
    if student_logp.shape != teacher_logp.shape or student_logp.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: student_logp {tuple(student_logp.shape)}, "
            f"teacher_logp {tuple(teacher_logp.shape)}, mask {tuple(mask.shape)}"
        )
    m = mask.bool()
    s = torch.where(m, student_logp.detach(), torch.zeros_like(student_logp))
    t = torch.where(m, teacher_logp.detach(), torch.zeros_like(teacher_logp))
    adv = coef * (t - s)
    if base is not None:
        base = torch.as_tensor(base, device=adv.device).detach().to(adv.dtype)
        if base.dim() == 1 and base.shape[0] == adv.shape[0]:
            base = base.unsqueeze(-1)
        elif base.shape != adv.shape:
            raise ValueError(
                f"base must be [B] = [{adv.shape[0]}] or [B, T] = {list(adv.shape)}, got {list(base.shape)}"
            )
        adv = adv + base
    return torch.where(m, adv, torch.zeros_like(adv))
