"""Training methods as a registry: each turns rows into an ``Experience`` (no gradient: rollout,
teacher scores, rewards) and an ``Experience`` into a loss (with gradient).

- ``sft``: cross-entropy on the reference completions (``data.target_field``).
- ``opd``: the student samples, the teacher scores; ``distribution`` form uses ``distill_loss``
  (any divergence / support), ``sampled_token`` form feeds ``opd_advantages`` to the clipped
  policy loss; either can add a reward group advantage (hybrid).
- ``grpo``: n samples per prompt, rewards from the registry, group advantages, clipped policy
  loss, optional KL to a frozen reference.

The maths lives in ``core/losses.py`` and ``core/advantages.py``; this module only wires
tensors. The trainer asks ``METHODS[name]`` and never branches on the method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core import advantages as A
from core import losses as L
from core.data.collate import PromptBatch
from core.rewards import compute_rewards
from core.rollout import (Completions, completion_hidden, completion_logits, fusable_head, generate_completions,
                          token_logp)


@dataclass
class Experience:
    batch: PromptBatch
    comp: Completions
    tensors: dict = field(default_factory=dict)   # per-sample tensors, first dim = batch
    metrics: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.batch)

    def select(self, idx: list[int]) -> "Experience":
        t = torch.as_tensor(idx, dtype=torch.long)
        return Experience(self.batch.select(idx), self.comp.select(idx),
                          {k: (v[t] if v is not None else None) for k, v in self.tensors.items()}, {})


@dataclass
class Context:
    """What a method needs; built once by the trainer."""

    model: object            # the trainable module (unwrapped)
    forward_model: object    # what to call for the training forward (engine module)
    processor: object
    tokenizer: object
    collator: object
    cfg: object              # TrainConfig
    teacher: object = None
    ref_model: object = None
    suppress_ids: list = field(default_factory=list)
    eos_ids: list = field(default_factory=list)
    synced_gpus: bool = False
    device: torch.device | None = None  # where the policy runs: batches and per-sample tensors go there


def prompts(ctx: Context, rows) -> PromptBatch:
    """The collated prompts of ``rows`` on the policy's device."""
    batch = ctx.collator.prompts(rows)
    return batch if ctx.device is None else batch.to(ctx.device)


def targets(ctx: Context, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokenised reference completions ``texts`` (ids and mask, ``data.max_target_tokens`` at
    most) on the policy's device."""
    ids, mask = ctx.collator.targets(texts, max_len=ctx.cfg.data.max_target_tokens)
    return (ids, mask) if ctx.device is None else (ids.to(ctx.device), mask.to(ctx.device))


def _rollout(ctx: Context, rows, seed: int, n: int):
    r = ctx.cfg.rollout
    batch = prompts(ctx, rows)
    return generate_completions(
        ctx.model, batch, ctx.tokenizer, n=n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        max_new_tokens=r.max_new_tokens, do_sample=True, suppress_ids=ctx.suppress_ids,
        eos_ids=ctx.eos_ids, seed=seed, synced_gpus=ctx.synced_gpus)


def rollout_metrics(comp: Completions) -> dict:
    lens = comp.mask.sum(-1).float()
    eos_ok = torch.tensor([bool(t) for t in comp.texts], dtype=torch.float32)
    return {"completion_len": float(lens.mean()), "nonempty_share": float(eos_ok.mean())}


def reward_fields(rows: list[dict]) -> dict:
    keys = set().union(*[r.keys() for r in rows]) if rows else set()
    return {k: [r.get(k) for r in rows] for k in keys}


def _rewards(weights: dict, comp: Completions, rows: list[dict]):
    """Per-sample total rewards ``[B]`` (on the completions' device) and their metrics."""
    total, parts = compute_rewards(weights, comp.texts, **reward_fields(rows))
    metrics = {f"reward/{k}": float(sum(v) / max(1, len(v))) for k, v in parts.items()}
    metrics["reward"] = float(sum(total) / max(1, len(total)))
    return torch.tensor(total, dtype=torch.float32, device=comp.ids.device), metrics


class SFT:
    name = "sft"

    def experience(self, ctx: Context, rows: list[dict], seed: int) -> Experience:
        d = ctx.cfg.data
        batch = prompts(ctx, rows)
        texts = []
        for r in rows:
            t = r.get(d.target_field)
            if isinstance(t, list):
                t = t[0]
            texts.append(t)
        ids, mask = targets(ctx, texts)
        return Experience(batch, Completions(ids, mask, None, texts))

    def loss(self, ctx: Context, exp: Experience):
        logits = completion_logits(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask)
        logp = token_logp(logits, exp.comp.ids)
        mask = exp.comp.mask.to(logp)
        loss = L.agg_loss(-logp, mask, mode="token-mean")
        return loss, {"loss": float(loss.detach()), "tokens": float(mask.sum())}


FUSED_HEAD_MIN_VOCAB = 32768  # opd.fused_head auto: from here [B, T, V] logits cost more than the chunked head


def fused_head(ctx: Context, tensors: dict) -> bool:
    """Whether OPD's distribution loss runs fused with the student's LM head (``opd.fused_head``)."""
    c = ctx.cfg.opd
    if c.fused_head == "off" or c.support != "full" or tensors.get("teacher_logits") is None:
        return False
    head = fusable_head(ctx.forward_model)
    if c.fused_head == "on":
        if head is None:
            raise ValueError("opd.fused_head on: the student's LM head is no plain bias-free nn.Linear held whole "
                             "here (peft-wrapped, ZeRO-3-partitioned, or logits scaled after it); use auto or off")
        return True
    return head is not None and tensors.get("base_adv") is None and head.out_features >= FUSED_HEAD_MIN_VOCAB


class OPD:
    name = "opd"

    def experience(self, ctx: Context, rows: list[dict], seed: int) -> Experience:
        c = ctx.cfg.opd
        rep, comp = _rollout(ctx, rows, seed, ctx.cfg.rollout.n)
        need_logits = c.form == "distribution" and c.support in ("full", "student_topk", "union_topk")
        top_k = c.top_k if c.support == "teacher_topk" else None
        scores = ctx.teacher.score(rep, comp, top_k=top_k, return_logits=need_logits).to(comp.ids.device)
        valid = scores.valid.to(torch.float32)
        mask = comp.mask.to(torch.float32) * valid[:, None]
        tensors = {"mask": mask, "teacher_logp": scores.logp.float(), "old_logp": comp.logp,
                   "teacher_logits": scores.logits, "teacher_topk_ids": scores.topk_ids,
                   "teacher_topk_logp": scores.topk_logp}
        m = rollout_metrics(comp)
        m["aligned_share"] = float(mask.sum() / comp.mask.sum().clamp(min=1))
        m["unscored_samples"] = float((~scores.valid).sum())
        # per-token reverse-KL estimate on the sampled tokens: log pS(y) - log pT(y)
        m["kl_sampled"] = float(((comp.logp - scores.logp) * mask).sum() / mask.sum().clamp(min=1))
        if c.reward_weight and c.rewards:
            r, rm = _rewards(c.rewards, comp, rep.rows)
            tensors["base_adv"] = A.group_advantages(r, ctx.cfg.rollout.n) * c.reward_weight
            m.update(rm)
        return Experience(rep, comp, tensors, m)

    def loss(self, ctx: Context, exp: Experience):
        c, t = ctx.cfg.opd, exp.tensors
        mask = t["mask"]
        if c.form == "distribution" and fused_head(ctx, t):
            # the divergence fused with the LM head: no [B, T, V] student logits (large vocabularies)
            hidden, weight = completion_hidden(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask)
            loss, m = L.distill_loss_from_hidden(hidden, weight, t["teacher_logits"], mask=mask,
                                                 divergence=c.divergence, beta=c.beta, temperature=c.temperature,
                                                 chunk_size=c.chunk_size)
        elif c.form == "distribution":
            logits = completion_logits(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask)
            loss, m = L.distill_loss(
                logits, t.get("teacher_logits"), teacher_topk_ids=t.get("teacher_topk_ids"),
                teacher_topk_logp=t.get("teacher_topk_logp"), mask=mask, divergence=c.divergence,
                beta=c.beta, temperature=c.temperature, support=c.support, top_k=c.top_k or None,
                chunk_size=c.chunk_size)
            if t.get("base_adv") is not None:  # hybrid: add the reward's policy-gradient term
                logp = token_logp(logits / ctx.cfg.rollout.temperature, exp.comp.ids)
                pl, _ = L.policy_loss(logp, t["old_logp"], t["base_adv"][:, None].expand_as(logp), mask)
                loss = loss + pl
        else:
            logits = completion_logits(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask,
                                       temperature=ctx.cfg.rollout.temperature)
            logp = token_logp(logits, exp.comp.ids)
            adv = A.opd_advantages(t["old_logp"], t["teacher_logp"], mask, coef=c.coef, base=t.get("base_adv"))
            loss, m = L.policy_loss(logp, t["old_logp"], adv, mask)
            m = dict(m)
            m["advantage_mean"] = float((adv * mask).sum() / mask.sum().clamp(min=1))
        m = {k: float(v) for k, v in m.items()}
        m["loss"] = float(loss.detach())
        return loss, m


class GRPO:
    name = "grpo"

    def experience(self, ctx: Context, rows: list[dict], seed: int) -> Experience:
        g, n = ctx.cfg.grpo, ctx.cfg.rollout.n
        rep, comp = _rollout(ctx, rows, seed, n)
        r, m = _rewards(g.rewards, comp, rep.rows)
        adv = A.group_advantages(r, n, scale=g.scale)
        m.update(rollout_metrics(comp))
        m.update({k: float(v) for k, v in A.group_stats(r, n).items()})
        m["advantage_abs_mean"] = float(adv.abs().mean())
        tensors = {"mask": comp.mask.float(), "old_logp": comp.logp, "adv": adv}
        if g.kl_beta > 0 and ctx.ref_model is not None:
            with torch.no_grad():
                ref = completion_logits(ctx.ref_model, rep, comp.ids, comp.mask, ctx.cfg.rollout.temperature)
                tensors["ref_logp"] = token_logp(ref, comp.ids)
        return Experience(rep, comp, tensors, m)

    def loss(self, ctx: Context, exp: Experience):
        g, t = ctx.cfg.grpo, exp.tensors
        logits = completion_logits(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask,
                                   temperature=ctx.cfg.rollout.temperature)
        logp = token_logp(logits, exp.comp.ids)
        mask = t["mask"]
        adv = t["adv"][:, None].expand_as(logp)
        loss, m = L.policy_loss(logp, t["old_logp"], adv, mask, clip_low=g.clip_low, clip_high=g.clip_high,
                                agg=g.agg)
        m = {k: float(v) for k, v in m.items()}
        if t.get("ref_logp") is not None:
            kl = L.agg_loss(L.kl_penalty(logp, t["ref_logp"], kind=g.kl_kind), mask, mode=g.agg)
            loss = loss + g.kl_beta * kl
            m["kl_ref"] = float(kl.detach())
        m["loss"] = float(loss.detach())
        return loss, m


METHODS = {"sft": SFT(), "opd": OPD(), "grpo": GRPO()}
