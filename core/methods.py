"""Training methods as a registry of objects that declare what they need and do.

A method is one class, registered with ``@register_method``; the trainer asks it and never
names a method:

- ``check(cfg)``: the config checks of this method (its section, the teacher it needs), at load;
- ``uses_teacher`` / ``needs_reference(cfg)`` / ``required_fields(cfg)``: a teacher to load
  (``teacher:``), a frozen reference model, the manifest fields every training row must have;
- ``reward_weights(cfg)``: the rewards it computes (their names are checked when the config loads);
- ``updates(cfg)``: optimisation epochs and minibatches per rollout;
- ``experience(ctx, rows, seed)``: rows -> an ``Experience`` (no gradient: rollout, teacher
  scores, rewards); ``loss(ctx, exp, norm)``: an ``Experience`` -> this part's loss (with
  gradient), normalised by ``norm``, the token and sequence counts of the whole optimizer step
  over its micro-batches and processes, so the parts add up to the loss of one big batch;
- ``run(cfg)``: the entry point ``core.bin.train`` calls (the trainer's loop, unless the method
  has a driver of its own: ``rest``) and ``evaluate(trainer)`` for a method that does not train
  (``trains = False``: ``calibrate``).

Methods here:

- ``sft``: cross-entropy on the reference completions (``data.target_field``).
- ``opd``: the student samples, the teacher scores; ``distribution`` form uses ``distill_loss``
  (any divergence / support), ``sampled_token`` form feeds ``opd_advantages`` to the clipped
  policy loss; either can add a reward group advantage (hybrid).
- ``grpo``: n samples per prompt, rewards from the registry, group advantages, clipped policy
  loss, optional KL to a frozen reference.
- ``rest``: rounds of sampling, filtering by reward and SFT (``core/rest.py``).
- ``calibrate``: rollout + teacher scoring on the dev set, no updates: the student/teacher gap.

A new method::

    @register_method
    class MyMethod(Method):
        name = "my_method"
        def check(self, cfg): ...                      # raise ConfigError naming the key
        def experience(self, ctx, rows, seed): ...     # -> Experience(batch, comp, {"mask": ...})
        def loss(self, ctx, exp, norm=None): ...       # -> (loss, {"loss": float, ...})

plus its options in ``core/config.py`` when it has any. The maths lives in ``core/losses.py``
and ``core/advantages.py``; this module only wires tensors.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from core import advantages as A
from core import losses as L
from core.config import ConfigError, _bad
from core.data.collate import PromptBatch
from core.forward import _unwrap, completion_hidden, completion_logits, fusable_head, token_logp
from core.rewards import compute_rewards
from core.sampling import Completions, generate_completions, sampling_logp
from core.utils import dist

log = logging.getLogger("core.trainer")


@dataclass
class Experience:
    batch: PromptBatch
    comp: Completions
    tensors: dict = field(default_factory=dict)   # per-sample tensors, first dim = batch
    metrics: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def mask(self) -> torch.Tensor:
        """The loss mask ``[B, T]``: ``tensors["mask"]`` when the method set one, else the
        completions' mask."""
        m = self.tensors.get("mask")
        return self.comp.mask if m is None else m

    def select(self, idx: list[int]) -> "Experience":
        t = torch.as_tensor(idx, dtype=torch.long)
        return Experience(self.batch.select(idx), self.comp.select(idx),
                          {k: (v[t.to(v.device)] if v is not None else None) for k, v in self.tensors.items()}, {})


@dataclass(frozen=True)
class LossNorm:
    """The denominators of one optimizer step's loss: loss-mask tokens and sequences over all its
    micro-batches and processes. A part's loss divided by them (``agg_loss``'s ``global_tokens``
    / ``global_seqs``) adds up, over the parts, to the loss of the whole batch taken at once."""

    tokens: float
    seqs: float

    def kw(self) -> dict:
        return {"global_tokens": self.tokens, "global_seqs": self.seqs}


def _kw(norm: LossNorm | None) -> dict:
    return {} if norm is None else norm.kw()


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
    rollout_engine: object = None       # rollout.engine vllm: the VLLMEngine (None: our loop)


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
    """``n`` samples of each row's prompt from the policy: our loop (``rollout.engine: hf``) or the
    vLLM engine (``vllm``). With vLLM, ``comp.logp`` is the trainer's own log-prob of each sampled
    token (one forward without gradient, the model in eval mode as for sampling), the same
    quantity our loop returns, and ``comp.engine_log_ratio`` the trainer's sampling log-prob minus
    the engine's (both after suppression, temperature, top-k and top-p: ``sampling_logp``), the
    mismatch the truncated importance weights correct for (``is_weights``)."""
    r = ctx.cfg.rollout
    batch = prompts(ctx, rows)
    if ctx.rollout_engine is None:
        return generate_completions(
            ctx.model, batch, ctx.tokenizer, n=n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            max_new_tokens=r.max_new_tokens, do_sample=True, suppress_ids=ctx.suppress_ids,
            eos_ids=ctx.eos_ids, seed=seed, synced_gpus=ctx.synced_gpus)
    rep, comp = ctx.rollout_engine.generate(
        batch, ctx.tokenizer, n=n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        max_new_tokens=r.max_new_tokens, suppress_ids=ctx.suppress_ids, eos_ids=ctx.eos_ids, seed=seed)
    m = _unwrap(ctx.model)
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad():
            logits = completion_logits(ctx.model, rep, comp.ids, comp.mask, temperature=r.temperature)
            ours = sampling_logp(logits, comp.ids, top_k=r.top_k, top_p=r.top_p, suppress_ids=ctx.suppress_ids)
            comp.engine_log_ratio = (ours - comp.logp) * comp.mask
            comp.logp = token_logp(logits, comp.ids) * comp.mask
            del logits
    finally:
        m.train(was_training)
    return rep, comp


def is_weights(ctx: Context, exp: "Experience", mask: torch.Tensor, metrics: dict):
    """Truncated importance weights of the samples when they came from the vLLM engine
    (``rollout.vllm.tis_cap`` > 0), their metrics added to ``metrics``; else None."""
    ratio = exp.comp.engine_log_ratio
    cap = ctx.cfg.rollout.vllm.tis_cap
    if ratio is None or cap <= 0:
        return None
    from core.vllm_engine import tis_weights
    w, m = tis_weights(ratio, mask, cap)
    metrics.update(m)
    return w


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


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

METHODS: dict = {}


def register_method(cls):
    """Class decorator: registers one instance of ``cls`` under ``cls.name``."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__}: a method needs a name")
    old = METHODS.get(cls.name)
    if old is not None and (type(old).__module__, type(old).__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method {cls.name!r} is already registered by {type(old).__module__}.{type(old).__qualname__}")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> "Method":
    """The registered method ``name``; a ``ConfigError`` naming ``method`` and the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"config key 'method': '{name}' is not one of {', '.join(METHODS)}") from None


class Method:
    """What every method declares; the defaults fit a method that samples nothing and needs no
    teacher, reference or reward."""

    name = ""
    trains = True          # runs the optimisation loop; False: ``evaluate(trainer)`` only
    uses_teacher = False   # loads ``teacher:`` (a local model or a remote server)
    needs_dev = False      # needs ``data.dev`` (and not ``data.train``)
    driver = "trainer"     # what runs it: the trainer's loop, or the method's own ``run`` (named here)
    samples = False        # samples from the policy through ``_rollout`` (rollout.engine applies)

    def check(self, cfg) -> None:
        """Config checks of this method; raise ``ConfigError`` naming the key."""

    def needs_reference(self, cfg) -> bool:
        """Whether the trainer builds a frozen reference model (``ctx.ref_model``)."""
        return False

    def required_fields(self, cfg) -> tuple:
        """Manifest fields every training row must carry."""
        return ()

    def reward_weights(self, cfg) -> dict:
        """``{config key: {reward name: weight}}`` of the rewards this method computes (their names
        are checked when the config loads)."""
        return {}

    def updates(self, cfg) -> tuple[int, int]:
        """``(epochs, minibatches)``: optimisation epochs per rollout, minibatches per epoch (one
        optimizer step each)."""
        return 1, 1

    def run(self, cfg) -> dict:
        """Train (or evaluate) with ``cfg``; what ``core.bin.train`` calls."""
        from core.trainer import Trainer
        return Trainer(cfg).train()

    def experience(self, ctx: Context, rows: list[dict], seed: int) -> Experience:
        raise NotImplementedError(f"method {self.name} does not make experience")

    def loss(self, ctx: Context, exp: Experience, norm: LossNorm | None = None):
        raise NotImplementedError(f"method {self.name} has no loss")

    def evaluate(self, trainer) -> dict:
        raise NotImplementedError(f"method {self.name} trains")


def _check_teacher(cfg, method: str) -> None:
    t = cfg.teacher
    if t.kind == "local" and not t.path:
        _bad("teacher.path", f"required for method {method}")
    if t.kind == "remote" and not t.url:
        _bad("teacher.url", "required for a remote teacher")


@register_method
class SFT(Method):
    name = "sft"

    def required_fields(self, cfg) -> tuple:
        return (cfg.data.target_field,)

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

    def loss(self, ctx: Context, exp: Experience, norm: LossNorm | None = None):
        logits = completion_logits(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask)
        logp = token_logp(logits, exp.comp.ids)
        mask = exp.comp.mask.to(logp)
        loss = L.agg_loss(-logp, mask, mode="token-mean", **_kw(norm))
        return loss, {"loss": float(loss.detach()), "tokens": float(mask.sum())}


def shared_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
    """The student's logits over the teacher's rows: a teacher scored over the token rows only
    (``LocalTeacher.vocab_limit``, tables padded to other sizes) has fewer columns, and the padded
    rows, never a token, take no part in a divergence."""
    if teacher_logits is not None and teacher_logits.shape[-1] < student_logits.shape[-1]:
        return student_logits[..., :teacher_logits.shape[-1]]
    return student_logits


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


@register_method
class OPD(Method):
    name = "opd"
    samples = True
    uses_teacher = True

    def check(self, cfg) -> None:
        _check_teacher(cfg, self.name)
        o, t = cfg.opd, cfg.teacher
        if o.support != "full" and o.top_k <= 0:
            _bad("opd.top_k", f"must be > 0 with support {o.support}")
        if o.fused_head == "on" and (o.form != "distribution" or o.support != "full" or o.reward_weight):
            _bad("opd.fused_head", "on needs form distribution, support full and no reward term (reward_weight 0)")
        if t.kind == "remote" and o.form == "distribution" and o.support != "teacher_topk":
            _bad("opd.support", f"a remote teacher gives top-k log-probs only, not the full logits that support "
                                f"{o.support!r} needs; use opd.support: teacher_topk (with opd.top_k) or "
                                "opd.form: sampled_token")
        if t.kind == "remote" and o.form == "distribution" and o.top_k > t.top_k_cap:
            _bad("opd.top_k", f"{o.top_k} is more than teacher.top_k_cap {t.top_k_cap}; raise both the server's "
                              "--max-logprobs and teacher.top_k_cap, or lower opd.top_k")

    def reward_weights(self, cfg) -> dict:
        return {"opd.rewards": dict(cfg.opd.rewards)} if cfg.opd.reward_weight else {}

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

    def loss(self, ctx: Context, exp: Experience, norm: LossNorm | None = None):
        c, t = ctx.cfg.opd, exp.tensors
        mask = t["mask"]
        if c.form == "distribution" and fused_head(ctx, t):
            # the divergence fused with the LM head: no [B, T, V] student logits (large vocabularies)
            hidden, weight = completion_hidden(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask)
            weight = weight[:t["teacher_logits"].shape[-1]]  # a teacher padded to fewer rows: the token rows
            loss, m = L.distill_loss_from_hidden(hidden, weight, t["teacher_logits"], mask=mask,
                                                 divergence=c.divergence, beta=c.beta, temperature=c.temperature,
                                                 chunk_size=c.chunk_size, **_kw(norm))
        elif c.form == "distribution":
            logits = completion_logits(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask)
            loss, m = L.distill_loss(
                shared_rows(logits, t.get("teacher_logits")), t.get("teacher_logits"), teacher_topk_ids=t.get("teacher_topk_ids"),
                teacher_topk_logp=t.get("teacher_topk_logp"), mask=mask, divergence=c.divergence,
                beta=c.beta, temperature=c.temperature, support=c.support, top_k=c.top_k or None,
                chunk_size=c.chunk_size, **_kw(norm))
            if t.get("base_adv") is not None:  # hybrid: add the reward's policy-gradient term
                logp = token_logp(logits / ctx.cfg.rollout.temperature, exp.comp.ids)
                pl, _ = L.policy_loss(logp, t["old_logp"], t["base_adv"][:, None].expand_as(logp), mask,
                                      is_weights=is_weights(ctx, exp, mask, {}), **_kw(norm))
                loss = loss + pl
        else:
            logits = completion_logits(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask,
                                       temperature=ctx.cfg.rollout.temperature)
            logp = token_logp(logits, exp.comp.ids)
            adv = A.opd_advantages(t["old_logp"], t["teacher_logp"], mask, coef=c.coef, base=t.get("base_adv"))
            extra: dict = {}
            loss, m = L.policy_loss(logp, t["old_logp"], adv, mask, is_weights=is_weights(ctx, exp, mask, extra),
                                    **_kw(norm))
            m = {**m, **extra}
            m["advantage_mean"] = float((adv * mask).sum() / mask.sum().clamp(min=1))
        m = {k: float(v) for k, v in m.items()}
        m["loss"] = float(loss.detach())
        return loss, m


@register_method
class GRPO(Method):
    name = "grpo"
    samples = True

    def check(self, cfg) -> None:
        if not cfg.grpo.rewards:
            _bad("grpo.rewards", "at least one reward is required")
        if cfg.grpo.epochs < 1:
            _bad("grpo.epochs", "must be >= 1")
        if cfg.grpo.minibatches < 1:
            _bad("grpo.minibatches", "must be >= 1")

    def needs_reference(self, cfg) -> bool:
        return cfg.grpo.kl_beta > 0

    def reward_weights(self, cfg) -> dict:
        return {"grpo.rewards": dict(cfg.grpo.rewards)}

    def updates(self, cfg) -> tuple[int, int]:
        return cfg.grpo.epochs, cfg.grpo.minibatches

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

    def loss(self, ctx: Context, exp: Experience, norm: LossNorm | None = None):
        g, t = ctx.cfg.grpo, exp.tensors
        logits = completion_logits(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask,
                                   temperature=ctx.cfg.rollout.temperature)
        logp = token_logp(logits, exp.comp.ids)
        mask = t["mask"]
        adv = t["adv"][:, None].expand_as(logp)
        extra: dict = {}
        loss, m = L.policy_loss(logp, t["old_logp"], adv, mask, clip_low=g.clip_low, clip_high=g.clip_high,
                                agg=g.agg, is_weights=is_weights(ctx, exp, mask, extra), **_kw(norm))
        m = {k: float(v) for k, v in {**m, **extra}.items()}
        if t.get("ref_logp") is not None:
            kl = L.agg_loss(L.kl_penalty(logp, t["ref_logp"], kind=g.kl_kind), mask, mode=g.agg, **_kw(norm))
            loss = loss + g.kl_beta * kl
            m["kl_ref"] = float(kl.detach())
        m["loss"] = float(loss.detach())
        return loss, m


@register_method
class ReST(Method):
    """Rounds of sampling, filtering by reward and SFT through the trainer (``core/rest.py``)."""

    name = "rest"
    driver = "core.rest.run"

    def check(self, cfg) -> None:
        r = cfg.rest
        if r.rounds < 1:
            _bad("rest.rounds", "must be >= 1")
        if r.samples < 1:
            _bad("rest.samples", "must be >= 1")
        if not r.rewards:
            _bad("rest.rewards", "at least one reward is required")
        if r.max_per_prompt < 0:
            _bad("rest.max_per_prompt", "must be >= 0 (0 = all)")
        if r.steps_per_round < 0:
            _bad("rest.steps_per_round", "must be >= 0 (0 = one pass over the kept samples)")
        try:  # YAML reads 1e-4 (no dot) as a string
            lrs = [float(x) for x in r.lrs if not isinstance(x, bool)]
        except (TypeError, ValueError):
            lrs = []
        if len(lrs) != r.rounds or len(r.lrs) != r.rounds:
            _bad("rest.lrs", f"needs one learning rate per round (rest.rounds={r.rounds}), got {r.lrs!r}")
        r.lrs = lrs

    def reward_weights(self, cfg) -> dict:
        return {"rest.rewards": dict(cfg.rest.rewards)}

    def run(self, cfg) -> dict:
        from core.rest import run
        return run(cfg)


@register_method
class Calibrate(Method):
    """Rollout + teacher scoring on the dev set without updates: the student/teacher per-token KL
    gap, written to ``calibrate.json``. With a local teacher the reverse KL is over the full
    vocabulary; a remote teacher gives its top-k log-probs only (``teacher.top_k_cap``), so there
    it is the reverse KL over the teacher's top-k tokens, both distributions renormalised on them
    (``kl_support: teacher_top<k>``, the support OPD's ``teacher_topk`` distils on). The sampled
    estimate ``sampled_kl_per_token`` (log pS(y) - log pT(y)) is exact either way."""

    name = "calibrate"
    trains = False
    samples = True
    uses_teacher = True
    needs_dev = True

    def check(self, cfg) -> None:
        _check_teacher(cfg, self.name)
        if not cfg.data.dev:
            _bad("data.dev", "required for calibrate")

    @torch.no_grad()
    def evaluate(self, trainer) -> dict:
        from core.trainer import step_seed  # the trainer imports this module
        cfg, ctx = trainer.cfg, trainer.ctx
        rows = trainer.dev_rows
        bs = cfg.train.batch_size
        tot = {"kl_sampled": 0.0, "kl_full": 0.0, "tokens": 0.0, "student_logp": 0.0, "teacher_logp": 0.0}
        lens = []
        remote = cfg.teacher.kind == "remote"
        top_k = min(cfg.opd.top_k or cfg.teacher.top_k_cap, cfg.teacher.top_k_cap)
        for i in tqdm(range(0, len(rows), bs), desc="calibrate", disable=not dist.is_main()):
            rep, comp = _rollout(ctx, rows[i: i + bs], step_seed(cfg.train.seed, 0, i, trainer.rank), cfg.rollout.n)
            if remote:
                s = trainer.teacher.score(rep, comp, top_k=top_k).to(comp.ids.device)
                st_logits = completion_logits(trainer.model, rep, comp.ids, comp.mask)
            else:
                s = trainer.teacher.score(rep, comp, return_logits=True).to(comp.ids.device)
                st_logits = shared_rows(completion_logits(trainer.model, rep, comp.ids, comp.mask), s.logits)
            m = comp.mask.float() * s.valid.float()[:, None]
            sl = torch.log_softmax(st_logits, -1)
            if remote:  # the teacher's top-k tokens, both sides renormalised on them
                ok = torch.isfinite(s.topk_logp)  # fewer than k entries (or an unscored position): -inf
                any_ok = ok.any(-1, keepdim=True)
                sk = torch.log_softmax(sl.gather(-1, s.topk_ids.clamp(min=0)).masked_fill(~ok, -torch.inf)
                                       .masked_fill(~any_ok, 0.0), -1)
                tk = torch.log_softmax(s.topk_logp.float().masked_fill(~any_ok, 0.0), -1)
                kl_full = torch.where(ok, sk.exp() * (sk - tk), torch.zeros_like(sk)).sum(-1)
            else:
                tl = torch.log_softmax(s.logits, -1)
                kl_full = (sl.exp() * (sl - tl)).sum(-1)
            slp = sl.gather(-1, comp.ids.unsqueeze(-1)).squeeze(-1)
            tot["kl_sampled"] += float(((slp - s.logp) * m).sum())
            tot["kl_full"] += float((kl_full * m).sum())
            tot["student_logp"] += float((slp * m).sum())
            tot["teacher_logp"] += float((s.logp * m).sum())
            tot["tokens"] += float(m.sum())
            lens += comp.mask.sum(-1).tolist()
        n = max(tot["tokens"], 1.0)
        res = {"reverse_kl_per_token": tot["kl_full"] / n, "sampled_kl_per_token": tot["kl_sampled"] / n,
               "student_logp_per_token": tot["student_logp"] / n, "teacher_logp_per_token": tot["teacher_logp"] / n,
               "tokens": tot["tokens"], "completion_len": sum(lens) / max(1, len(lens)), "samples": len(lens),
               "kl_support": f"teacher_top{top_k}" if remote else "full"}
        if dist.is_main():
            (trainer.out / "calibrate.json").write_text(json.dumps(res, indent=2))
            log.info("calibrate: %s", res)
        return res
