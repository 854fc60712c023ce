"""The training loop, and nothing else: batch -> experience (rollout, scores) -> loss -> step.

The method comes from the registry (``core.methods.get_method``); the loop asks it what it needs
(a teacher, a reference model, manifest fields, epochs and minibatches per rollout, whether it
trains at all) and never names a method. It handles data order (a seeded permutation per
epoch, each rank taking its slice of the global batch), gradient accumulation, the loss over
the global batch (each micro-batch's loss normalised by the token and sequence counts of the
whole optimizer step across micro-batches and processes, ``step_norm``, so any split of a batch
gives the gradient of the whole), several optimisation epochs per rollout, the LR schedule, the
wall-clock budget, skipped non-finite steps, periodic dev evaluation, checkpoints (``resume:
auto``), metrics (JSONL, TensorBoard, tqdm) and the final ``save_pretrained`` export.

``model.lora`` wraps the model with peft adapters (any method; only the adapters train, their
checkpoints hold the adapters only, the export merges them into the base); a method's KL
reference is then the same model with its adapters disabled, not a copy. A method with a
driver of its own (``rest``) runs there, through this loop's SFT.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core import config as C
from core.backends import DeepSpeedEngine, TorchEngine, fill_ds_config
from core.data.collate import make_collator
from core.data.manifest import NO_AUDIO_TRACK, ManifestError, Problem, read_manifest
from core.methods import Context, Experience, LossNorm, get_method, prompts, targets
from core.models import apply_lora, check_vocab_match, is_peft_model, load_model_and_processor, special_token_ids
from core.rewards import compute_rewards
from core.forward import completion_logits, token_logp
from core.sampling import generate_completions
from core.teacher import LocalTeacher, TeacherRequestError, TeacherUnavailable
from core.utils import checkpoint as ckpt
from core.utils import dist
from core.utils.logging import MetricsLogger, setup_console

log = logging.getLogger("core.trainer")


class TrainingError(RuntimeError):
    pass


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class DataOrder:
    """A seeded permutation per epoch; ``next_global(k)`` yields the next ``k`` indices.

    With ``lengths`` and ``group`` > 0 (``data.length_group``), each window of ``group * batch``
    indices of the permutation is sorted by length, longest first, and cut into runs of
    ``batch``, whose order within the window is shuffled again (seeded): a batch then holds rows
    of similar length, every row still comes once per epoch, and the order stays random between
    batches. ``batch`` must be the ``k`` that ``next_global`` is called with."""

    def __init__(self, n: int, seed: int, lengths: list | None = None, group: int = 0, batch: int = 0):
        if n == 0:
            raise TrainingError("the training manifest has no samples")
        self.n, self.seed = n, seed
        self.lengths, self.group, self.batch = lengths, int(group), int(batch)
        self.epoch, self.pos = 0, 0
        self._perm = self._make()

    def _make(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        if not (self.group > 0 and self.batch > 0 and self.lengths):
            return perm
        out, window = [], self.group * self.batch
        for w in range(0, self.n, window):
            part = sorted(perm[w: w + window], key=lambda i: self.lengths[i], reverse=True)
            runs = [part[j: j + self.batch] for j in range(0, len(part), self.batch)]
            for r in torch.randperm(len(runs), generator=g).tolist():
                out += runs[r]
        return out

    def next_global(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make()
            take = min(k - len(out), self.n - self.pos)
            out += self._perm[self.pos: self.pos + take]
            self.pos += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm = self._make()


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank) % (2**31 - 1)


def _load_teacher(cfg: C.TrainConfig, processor, model, device=None):
    """The teacher of ``cfg.teacher`` (its settings were checked when the config loaded)."""
    t = cfg.teacher
    if t.kind == "remote":
        from core.teacher import RemoteTeacher
        collator = make_collator(resolve_modality(cfg, model), processor, cfg.data)
        return RemoteTeacher(t.url, processor, collator=collator, api_key=t.api_key or None, model=t.model or None,
                             timeout=t.timeout, max_retries=t.max_retries, backoff=t.retry_backoff,
                             concurrency=t.concurrency, top_k_cap=t.top_k_cap, student_model=model)
    try:
        tm, tp = load_model_and_processor(t.path, dtype=t.dtype, trust_remote_code=cfg.model.trust_remote_code)
    except FileNotFoundError as e:
        raise C.ConfigError(f"config key 'teacher.path': {e}") from None
    try:
        limit = check_vocab_match(processor, tp, student_model=model, teacher_model=tm)
    except ValueError as e:
        raise C.ConfigError(f"config keys 'teacher.path' ({t.path}) and 'model.path' ({cfg.model.path}): {e}") from None
    if limit is not None:
        log.info("student and teacher pad their vocabularies differently; divergences use the %d token rows", limit)
    return LocalTeacher(tm, tp, device=device, vocab_limit=limit)


def _read_rows(path: str, cfg: C.TrainConfig, require=(), require_media: bool = True, key: str = "data.train",
               silent_video_ok: bool = False):
    try:
        return read_manifest(path, require=tuple(require), skip_bad=cfg.data.skip_bad, require_media=require_media,
                             silent_video_ok=silent_video_ok)
    except FileNotFoundError as e:
        raise C.ConfigError(f"config key '{key}': {e}") from None


def _no_sound_track(p: Problem) -> bool:
    return p.field == "video" and p.message.endswith(NO_AUDIO_TRACK)


def read_rows(path: str, cfg: C.TrainConfig, modality: str, require=(), key: str = "data.train") -> list[dict]:
    """The rows of manifest ``path`` for ``modality``, every problem found before training starts.

    Media prompts need an ``audio`` or ``video`` path in every row, audio-visual ones a ``video``.
    The manifest check refuses a video without a sound track (and no ``audio`` path), with a note
    naming ``data.missing_audio: silence``; with that setting such videos are accepted (the
    collator gives the clip silence) and every other problem still stops the run (or is skipped
    with ``data.skip_bad``).
    """
    require = tuple(require) + (("video",) if modality == "av" else ())
    silent_ok = modality == "av" and cfg.data.missing_audio == "silence"
    try:
        return _read_rows(path, cfg, require, modality != "text", key, silent_video_ok=silent_ok)
    except ManifestError as e:
        if modality != "av" or not any(_no_sound_track(p) for p in e.problems):
            raise
        raise ManifestError(e.path, e.problems, note="(data.missing_audio: silence gives a video without a "
                                                     "sound track silent audio of its length)") from None


def export_full_omni_if_asked(m: "C.ModelConfig", final: Path) -> None:
    """``model.export`` auto/full with a full Omni ``model.path`` (Qwen2.5-Omni, Qwen3-Omni-MoE:
    ``core.models.is_full_omni``): ``final`` (the trained thinker) becomes that folder with the
    thinker put back (``core.models.export_full_omni``)."""
    from core.models import export_full_omni, is_full_omni, model_type_of
    if m.export != "thinker" and is_full_omni(m.path):
        thinker = final.with_name(final.name + ".thinker")
        if thinker.exists():
            shutil.rmtree(thinker)
        os.replace(final, thinker)
        try:
            counts = export_full_omni(m.path, thinker, final)
        except BaseException:
            if not final.exists():  # leave the trained thinker where the run's summary says it is
                os.replace(thinker, final)
            raise
        shutil.rmtree(thinker)
        log.info("exported a full Omni folder (%s) to %s (%s)", model_type_of(m.path), final, counts)


def model_kwargs(m: C.ModelConfig) -> dict:
    """``load_model_and_processor`` keyword arguments of a ``model:`` section."""
    return dict(dtype=m.dtype, trust_remote_code=m.trust_remote_code, load_in_4bit=m.load_in_4bit,
                bnb_4bit_compute_dtype=m.bnb_4bit_compute_dtype, bnb_4bit_quant_type=m.bnb_4bit_quant_type)


def place_model(model, cfg: C.TrainConfig) -> torch.device:
    """Put ``model`` on this process's device (``backend.device``) and return that device; a 4-bit
    model stays where it was loaded (its GPU), and its device is returned."""
    if cfg.model.load_in_4bit:
        return next(model.parameters()).device
    dev = dist.device(cfg.backend.device)
    model.to(dev)
    return dev


def base_loader(m: C.ModelConfig):
    """A function loading ``m.path`` in full precision on the CPU (a LoRA export merges into it)."""
    dtype = m.bnb_4bit_compute_dtype if m.load_in_4bit else m.dtype
    return lambda: load_model_and_processor(m.path, dtype=dtype, trust_remote_code=m.trust_remote_code)[0]


class AdapterDisabled:
    """A peft model seen with its adapters disabled, in eval mode: the frozen base model, used as
    GRPO's KL reference without a copy of the weights. Callable like the model; ``forward`` and
    ``get_base_model`` are the peft model's (``completion_logits`` inspects them)."""

    def __init__(self, peft_model):
        self.peft = peft_model

    @property
    def forward(self):
        return self.peft.forward

    def get_base_model(self):
        return self.peft.get_base_model()

    def __call__(self, *args, **kwargs):
        was_training = self.peft.training
        self.peft.eval()
        try:
            with self.peft.disable_adapter():
                return self.peft(*args, **kwargs)
        finally:
            self.peft.train(was_training)


def has_audio_encoder(model) -> bool:
    """True when the model has an audio tower (Qwen2-Audio, the Omni thinker); False for a text LM."""
    return any(name.split(".")[-1] == "audio_tower" for name, _ in model.named_modules())


def has_vision_encoder(model) -> bool:
    """True when the model has a vision encoder (the Omni thinker's ``visual``, a ``vision_tower``)."""
    return any(name.split(".")[-1] in ("visual", "vision_tower") for name, _ in model.named_modules())


def resolve_modality(cfg: C.TrainConfig, model) -> str:
    """``data.modality`` made concrete: ``av``, ``audio`` or ``text``.

    ``auto``: text for a model without an audio encoder; av for a model with a vision encoder
    when a row of the training manifest has a ``video`` path; else, for an audio model, text
    when no row has an ``audio``/``video`` path, else audio. Without a readable training
    manifest (calibrate on dev only) a media model gets audio, or av when it has a vision encoder
    and the dev manifest has videos.
    """
    m = cfg.data.modality
    if m != "auto":
        return m
    if not has_audio_encoder(model):
        return "text"
    kinds = None
    if cfg.data.train and Path(cfg.data.train).is_file():
        kinds = _media_kinds(cfg.data.train)
        if not kinds:
            return "text"
    elif cfg.data.dev and Path(cfg.data.dev).is_file():
        kinds = _media_kinds(cfg.data.dev)
    if "video" in (kinds or ()) and has_vision_encoder(model):
        return "av"
    return "audio"


def _media_kinds(path: str) -> set[str]:
    """Which media fields (``audio``, ``video``) any parseable line of a JSONL manifest names
    (validation proper, with errors naming file:line, is ``read_manifest``'s job)."""
    kinds: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                kinds.update(k for k in ("audio", "video") if row.get(k) is not None)
                if len(kinds) == 2:
                    break
    return kinds


class Trainer:
    def __init__(self, cfg: C.TrainConfig):
        setup_console()
        self.method = get_method(cfg.method)
        if self.method.driver != "trainer":
            raise TrainingError(f"method {cfg.method} runs in {self.method.driver}, not in Trainer")
        self.cfg = cfg
        use_ds = cfg.backend.name == "deepspeed"
        dist.init(cfg.backend.dist_backend, use_deepspeed=use_ds, device_choice=cfg.backend.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.out = Path(cfg.output_dir)  # written only once every input has been checked
        seed_all(cfg.train.seed)
        try:
            model, processor = load_model_and_processor(cfg.model.path, **model_kwargs(cfg.model))
        except FileNotFoundError as e:
            raise C.ConfigError(f"config key 'model.path': {e}") from None
        # where this process computes: its GPU when there is one (DeepSpeed's accelerator is the same)
        self.device = place_model(model, cfg)
        if cfg.model.lora:
            model = apply_lora(model, cfg.model.lora, kbit=cfg.model.load_in_4bit)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.modality = resolve_modality(cfg, model)
        if cfg.data.modality == "auto":
            log.info("data.modality auto -> %s (%s)", self.modality,
                     "the model has audio and vision encoders and the manifest has videos" if self.modality == "av"
                     else "the model has an audio encoder and the manifest has media" if self.modality == "audio"
                     else "no audio encoder in the model" if not has_audio_encoder(model)
                     else "no row of the training manifest has audio or video")
        if self.modality == "av" and not has_vision_encoder(model):
            raise C.ConfigError(f"config key 'data.modality': av needs a model with a vision encoder; "
                                f"{type(model).__name__} has none")
        if self.modality != "text" and not cfg.data.prompt:
            raise C.ConfigError(f"config key 'data.prompt': {C.PROMPT_REQUIRED}")
        self.collator = make_collator(self.modality, processor, cfg.data)
        teacher = _load_teacher(cfg, processor, model, self.device) if self.method.uses_teacher else None
        ref = None
        if self.method.needs_reference(cfg) and is_peft_model(model):
            ref = AdapterDisabled(model)
        elif self.method.needs_reference(cfg):
            ref = copy.deepcopy(model).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
        # data: every problem found before training starts
        require = self.method.required_fields(cfg)
        self.rows = read_rows(cfg.data.train, cfg, self.modality, require) if cfg.data.train else []
        self.dev_rows = (read_rows(cfg.data.dev, cfg, self.modality, key="data.dev")[: cfg.data.dev_max_samples]
                         if cfg.data.dev else [])
        self.model = model
        self.teacher, self.ref = teacher, ref
        self.engine = None
        if self.method.trains:
            self._build_engine()
        fwd = self.engine.module if self.engine else model
        suppress = special_token_ids(processor)
        # rows of a padded table are never a token: the student never samples them (a remote or
        # local teacher padded to fewer rows could not score them)
        n_tok = max(self.tokenizer.get_vocab().values(), default=-1) + 1
        rows = model.get_output_embeddings().weight.shape[0]
        if rows > n_tok:
            suppress = sorted(set(suppress) | set(range(n_tok, rows)))
        self.ctx = Context(model=fwd, forward_model=fwd, processor=processor, tokenizer=self.tokenizer,
                           collator=self.collator, cfg=cfg, teacher=teacher, ref_model=ref,
                           suppress_ids=suppress, eos_ids=[self.tokenizer.eos_token_id],
                           synced_gpus=bool(self.engine and self.engine.zero3 and self.world > 1),
                           device=self.device)
        if cfg.rollout.engine == "vllm" and self.method.samples:
            from core.vllm_engine import engine_from_config
            self.ctx.rollout_engine = engine_from_config(cfg)
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            C.dump_config(cfg, self.out / "config.yaml")
        if cfg.train.resume == "never" and dist.is_main():  # a fresh run: no curves of an earlier one
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        self.logger = MetricsLogger.from_config(self.out, cfg, enabled=dist.is_main())  # JSONL + logging.report_to
        self._saved_step = None  # step of the checkpoint last written or resumed from in this output_dir

    def _build_engine(self):
        cfg, o = self.cfg, self.cfg.optim
        from transformers import get_scheduler
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = o.fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                **({"fused": True} if fused else {}))
        sched = get_scheduler(o.scheduler, opt, num_warmup_steps=o.warmup_steps,
                              num_training_steps=cfg.train.max_steps)
        if cfg.backend.name == "deepspeed":
            ds = fill_ds_config(cfg.backend.ds_config, batch_size=cfg.train.batch_size,
                                grad_accum=o.grad_accum, grad_clip=o.grad_clip, dtype=cfg.model.dtype)
            self.engine = DeepSpeedEngine(self.model, opt, sched, ds)
        else:
            self.engine = TorchEngine(self.model, opt, sched, grad_clip=o.grad_clip, grad_accum=o.grad_accum)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, rows=None, batch_size: int | None = None) -> dict:
        rows = self.dev_rows if rows is None else rows
        if not rows:
            return {}
        cfg = self.cfg
        bs = batch_size or max(cfg.train.batch_size, 16)
        model = self.ctx.forward_model
        model.eval()
        nll, ntok, rewards, lens = 0.0, 0.0, [], []
        has_ref = all(r.get(cfg.data.target_field) for r in rows)
        for i in range(0, len(rows), bs):
            chunk = rows[i: i + bs]
            batch = prompts(self.ctx, chunk)
            if has_ref:
                ids, mask = targets(self.ctx, [_first(r[cfg.data.target_field]) for r in chunk])
                lp = token_logp(completion_logits(model, batch, ids, mask), ids)
                nll -= float((lp * mask).sum())
                ntok += float(mask.sum())
            if cfg.train.eval_reward:
                _, comp = generate_completions(model, batch, self.tokenizer, do_sample=False,
                                               max_new_tokens=cfg.rollout.max_new_tokens,
                                               suppress_ids=self.ctx.suppress_ids, eos_ids=self.ctx.eos_ids,
                                               synced_gpus=self.ctx.synced_gpus, return_logp=False)
                from core.methods import reward_fields
                tot, _ = compute_rewards({cfg.train.eval_reward: 1.0}, comp.texts, **reward_fields(chunk))
                rewards += tot
                lens += comp.mask.sum(-1).tolist()
        model.train()
        out = {}
        if ntok:
            out["dev/nll"] = nll / ntok
        if rewards:
            out[f"dev/{cfg.train.eval_reward}_reward"] = sum(rewards) / len(rewards)
            out["dev/greedy_len"] = sum(lens) / len(lens)
        return out

    # ------------------------------------------------------------------ training
    def _micro_rows(self, idx: list[int], micro: int) -> list[dict]:
        B = self.cfg.train.batch_size
        start = (micro * self.world + self.rank) * B
        return [self.rows[i] for i in idx[start: start + B]]

    def train(self) -> dict:
        cfg, tc = self.cfg, self.cfg.train
        method = self.method
        if not method.trains:
            return method.evaluate(self)
        accum = cfg.optim.grad_accum
        epochs, minibatches = method.updates(cfg)
        global_k = tc.batch_size * accum * self.world
        lengths = None
        if cfg.data.length_group > 0:
            from core.data.manifest import length_keys
            lengths = length_keys(self.rows)
        order = DataOrder(len(self.rows), tc.seed, lengths, cfg.data.length_group, global_k)
        ckdir = self.out / "checkpoints"
        step, train_seconds, bad_in_a_row, skipped_total = 0, 0.0, 0, 0
        resume_from = None
        if tc.resume == "auto":
            resume_from = ckpt.latest_checkpoint(ckdir)
        elif tc.resume not in ("never", ""):
            resume_from = Path(tc.resume)
        if resume_from is not None:
            st = ckpt.load(resume_from, engine=self.engine)
            step, train_seconds = st["step"], st.get("train_seconds", 0.0)
            skipped_total = st.get("skipped_steps", 0)
            order.load(st["data"])
            ckpt.set_rng_state(st["rng"])
            if Path(resume_from).parent == ckdir:
                self._saved_step = step
            # rows of steps after the checkpoint are redone: drop them (and a line cut by a kill)
            self.logger.truncate_after(step)
            log.info("resumed from %s at step %d", resume_from, step)
        # a wall-clock budget shows as seconds spent of the budget, otherwise steps of max_steps
        by_time = bool(tc.max_seconds)
        bar = tqdm(total=round(tc.max_seconds) if by_time else tc.max_steps,
                   initial=round(train_seconds) if by_time else step, unit="s" if by_time else "step",
                   desc=cfg.method, disable=not dist.is_main(), dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0,
                   bar_format=("{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
                               if by_time else None))
        interrupted = False
        last_eval = {}
        while step < tc.max_steps:
            if tc.max_seconds and train_seconds >= tc.max_seconds:
                log.info("wall-clock budget of %.0f s reached at step %d", tc.max_seconds, step)
                break
            t0 = time.time()
            before = (order.state(), ckpt.rng_state(), dict(getattr(self.teacher, "stats", None) or {}))
            idx = order.next_global(global_k)
            self.ctx.forward_model.train()
            sync_s = self._sync_rollout_engine(step)
            t_exp = time.time()
            try:
                exps = [method.experience(self.ctx, self._micro_rows(idx, mi), step_seed(tc.seed, step, mi, self.rank))
                        for mi in range(accum)]
            except (TeacherUnavailable, TeacherRequestError) as e:
                self._teacher_failed(e, ckdir, step, before, train_seconds, skipped_total, len(idx))
            t_exp = time.time() - t_exp
            metrics: dict = {}
            for e in exps:
                for k, v in e.metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + v / len(exps)
            loss_sum, n_loss, step_info, bad = 0.0, 0, {}, False
            # a step whose loss mask is empty everywhere (a teacher that scored no sample) has no signal:
            # skipped and counted like a non-finite one, never trained on as a silent zero loss
            unscored = dist.mean_across(float(bool(exps) and all(
                e.tensors.get("mask") is not None and float(e.tensors["mask"].sum()) == 0 for e in exps))) == 1.0
            for ep in range(epochs if not unscored else 0):
                for mb in range(minibatches):
                    done = backward_parts(self.engine, method, self.ctx,
                                          [_minibatch(e, mb, minibatches) for e in exps], accum, self.world)
                    if done is None:
                        bad = True
                    else:  # a skipped step logs its loss as nan, as before
                        loss_sum += done[0]
                        n_loss += 1
                        metrics.update({f"train/{k}": v for k, v in done[1].items()})
                    if bad:
                        self.engine.zero_grad()
                        break
                    step_info = self.engine.step()
                    if step_info["skipped"]:
                        bad = True
                        break
                if bad:
                    break
            step += 1
            dt = time.time() - t0
            train_seconds += dt
            if bad or unscored:
                bad_in_a_row += 1
                skipped_total += 1
                why = ("the teacher scored none of its samples" if unscored else "non-finite loss or gradient")
                log.warning("step %d: %s, step skipped (%d in a row)", step, why, bad_in_a_row)
                if bad_in_a_row >= tc.max_bad_steps and unscored:
                    raise TrainingError(f"{bad_in_a_row} consecutive steps skipped, the last because the teacher "
                                        f"scored none of its samples (limit train.max_bad_steps={tc.max_bad_steps}); "
                                        "stopping. Check that teacher and student share the tokenizer and the chat "
                                        "template (the log names the samples that could not be aligned).")
                if bad_in_a_row >= tc.max_bad_steps:
                    raise TrainingError(f"{bad_in_a_row} consecutive non-finite steps (limit train.max_bad_steps="
                                        f"{tc.max_bad_steps}); stopping. Lower the learning rate or check the data.")
            else:
                bad_in_a_row = 0
            ntok = sum(float(e.comp.mask.sum()) for e in exps)
            metrics.update(_teacher_deltas(before[2], getattr(self.teacher, "stats", None)))
            if sync_s is not None:
                metrics["rollout/sync_seconds"] = sync_s
            # the step's loss over every process (each logs its share x world; the mean across ranks sums them)
            metrics.update({"loss": loss_sum * self.world / n_loss if n_loss else float("nan"), "lr": self.engine.lr(),
                            "grad_norm": step_info.get("grad_norm", float("nan")), "skipped_steps": skipped_total,
                            "step_seconds": dt, "experience_seconds": t_exp, "tokens_per_s": ntok / max(dt, 1e-9),
                            "train_seconds": train_seconds, "epoch": order.epoch})
            metrics = {k: dist.mean_across(v) if isinstance(v, float) else v for k, v in metrics.items()}
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                last_eval = self.evaluate()
                metrics.update(last_eval)
            if step % tc.log_every == 0 or step == tc.max_steps:
                self.logger.log(step, metrics)
            bar.set_postfix(step=step, loss=f"{metrics['loss']:.4f}", refresh=False,
                            **({"kl": f"{metrics['kl_sampled']:.3f}"} if "kl_sampled" in metrics else {}))
            bar.update(min(dt, max(0.0, bar.total - bar.n)) if by_time else 1)
            if tc.save_every and step % tc.save_every == 0:
                self._save(ckdir, step, order.state(), train_seconds, skipped_total)
            if tc.stop_after_steps and step >= tc.stop_after_steps:
                interrupted = True
                break
        bar.close()
        self._save(ckdir, step, order.state(), train_seconds, skipped_total)
        summary = {"method": cfg.method, "steps": step, "train_seconds": round(train_seconds, 2),
                   "skipped_steps": skipped_total, "interrupted": interrupted}
        if not interrupted:
            final_eval = self.evaluate()
            summary.update(final_eval)
            self.engine.export(self.out / "final", self.processor, base_loader=base_loader(cfg.model))
            if dist.is_main():
                export_full_omni_if_asked(cfg.model, self.out / "final")
            dist.barrier()
            summary["final_model"] = str(self.out / "final")
        if dist.is_main():
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
            log.info("done: %s", summary)
        self.logger.close()
        if self.ctx.rollout_engine is not None:
            self.ctx.rollout_engine.close()
            self.ctx.rollout_engine = None
        return summary

    def _sync_rollout_engine(self, step: int) -> float | None:
        """The vLLM engine gets the trainer's weights when it holds older ones (every step after
        an update, and at the first step: a resumed or LoRA model is not the folder it started
        from); the seconds it took, or None."""
        eng = self.ctx.rollout_engine
        if eng is None or eng.version == step:
            return None
        return eng.sync(self.model, version=step)

    def _save(self, ckdir, step, data_state, train_seconds, skipped_total, rng=None):
        """Checkpoint ``step`` (skipped when this step's checkpoint is already there); refuses weights
        that are not finite, so a checkpoint never holds NaN or inf."""
        if step == self._saved_step:
            return ckpt.latest_checkpoint(ckdir)
        bad = [n for n, p in self.engine.module.named_parameters() if p.requires_grad and
               not torch.isfinite(p.detach() if getattr(p, "ds_tensor", None) is None else p.ds_tensor).all()]
        if dist.mean_across(float(len(bad))) > 0:
            prev = ckpt.latest_checkpoint(ckdir)
            raise TrainingError(f"step {step}: the weights hold NaN or inf ({', '.join(bad[:3]) or 'another rank'}"
                                f"{' ...' if len(bad) > 3 else ''}); checkpoint step_{step} not written, "
                                f"{prev if prev else 'no checkpoint'} stays the latest. Lower the learning rate "
                                "or check the data.")
        state = {"step": step, "data": data_state, "rng": rng if rng is not None else ckpt.rng_state(),
                 "train_seconds": train_seconds, "skipped_steps": skipped_total, "config": C.to_dict(self.cfg)}
        path = ckpt.save(ckdir, step, engine=self.engine, state=state, keep_last=self.cfg.train.keep_last)
        self._saved_step = step
        return path

    def _teacher_failed(self, err, ckdir, step, before, train_seconds, skipped_total, prompts):
        """The teacher failed for good during step ``step + 1``: checkpoint the state before that step,
        record the failure in the metrics, and stop with an error saying how to continue."""
        data_state, rng, stats0 = before
        completions = prompts * self.cfg.rollout.n
        path = self._save(ckdir, step, data_state, train_seconds, skipped_total, rng=rng) if step > 0 else None
        row = {"event": "teacher_failure", **_teacher_deltas(stats0, getattr(self.teacher, "stats", None)),
               "teacher/failed_samples": float(completions)}
        self.logger.log(step + 1, row)
        self.logger.close()
        where = (f"checkpoint {path} holds the state before it" if path is not None
                 else "no step was completed, so a rerun starts from the beginning")
        raise TrainingError(f"step {step + 1}: the teacher failed: {err} -- the step's {prompts} prompt(s) "
                            f"({completions} completion(s)) were not trained on; {where}. Fix the teacher and "
                            f"rerun with train.resume: auto to continue from there (no sample is lost).") from err


def _first(x):
    return x[0] if isinstance(x, list) else x


def _teacher_deltas(before: dict, after: dict | None) -> dict:
    """A remote teacher's counters over one step: retries, and requests (one per completion) retried."""
    if not after:
        return {}
    return {"teacher/retries": float(after.get("retries", 0) - before.get("retries", 0)),
            "teacher/retried_samples": float(after.get("retried", 0) - before.get("retried", 0))}


def backward_parts(engine, method, ctx, parts: list[Experience], accum: int, world: int):
    """Backward of one optimizer step's ``parts`` (this process's micro-batches): each part's loss
    is its share of the whole step's (normalised by ``step_norm``: the step's token and sequence
    counts over every micro-batch and process), scaled by ``accum * world`` because the engine
    divides by ``grad_accum`` and averages the gradients over the processes. The accumulated
    gradient is then the gradient of the loss of the whole global batch taken at once.

    Returns ``(this process's share of the loss, the last part's metrics)``, or None when a
    part's loss is not finite on some process (every process stops together; the caller clears
    the gradients)."""
    norm = step_norm(parts)
    total, metrics = 0.0, {}
    for part in parts:
        loss, metrics = method.loss(ctx, part, norm)
        if dist.mean_across(float(not torch.isfinite(loss))) > 0:  # every rank skips together
            return None
        engine.backward(loss * (accum * world))
        total += float(loss.detach())
    return total, metrics


def step_norm(parts: list[Experience]) -> LossNorm:
    """The loss denominators of one optimizer step: loss-mask tokens and sequences of ``parts``
    (this process's micro-batches) summed over every process."""
    tokens = sum(float(e.mask.sum()) for e in parts)
    seqs = float(sum(len(e) for e in parts))
    return LossNorm(dist.sum_across(tokens), dist.sum_across(seqs))


def _minibatch(e: Experience, mb: int, n: int) -> Experience:
    if n == 1:
        return e
    B = len(e)
    per = math.ceil(B / n)
    return e.select(list(range(mb * per, min(B, (mb + 1) * per))))


def run(cfg: C.TrainConfig) -> dict:
    """Run ``cfg``'s method: its own driver when it has one (``rest``), else this trainer."""
    return get_method(cfg.method).run(cfg)
