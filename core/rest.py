"""ReST (Reinforced Self-Training, Gulcehre et al. 2023) in offline rounds: grow, then improve.

Round ``i`` (``rest.rounds`` of them, each from the previous round's model):

- grow: the model samples ``rest.samples`` (K) completions per training prompt at
  ``rest.temperature`` (top-p, top-k and max-new-tokens from ``rollout``; ``train.batch_size``
  prompts per ``generate``), ``core.rewards.compute_rewards`` scores them with ``rest.rewards``,
  and ``filter_samples`` keeps those with a total reward >= ``rest.keep_min_reward``, distinct per
  prompt, at most ``rest.max_per_prompt`` per prompt. Written to ``round_<i>/samples.jsonl``
  (every sample with its rewards) and ``round_<i>/kept.jsonl``: the prompt's manifest row with
  key ``<key>#<j>``, the completion in ``completion``, its total reward in ``reward``.
- improve: SFT on ``kept.jsonl`` by ``core.trainer.Trainer`` (method sft, target field
  ``completion``, ``optim.lr = rest.lrs[i]``, ``rest.steps_per_round`` steps) into ``round_<i>``:
  LoRA, DeepSpeed, checkpoints and the export are the trainer's; ``round_<i>/final`` is the next
  round's model.

``train.max_seconds`` budgets the whole run, sampling included: once it is spent no batch of
sampling and no round starts (an unfinished grow step is dropped), and a round's SFT gets what
is left. Per-round stats (samples, kept, kept share, rewards, seconds, the SFT's dev metrics)
go to ``rest_summary.json`` and ``metrics.jsonl`` (step = round number); the last trained model
is copied to ``<output_dir>/final``. A round that keeps nothing skips its SFT with a warning and
is counted (``empty_rounds``). Resume: a finished round (``round_<i>/round.json``) is not redone,
a written grow step is reused, an interrupted SFT resumes from its checkpoints.

What it leaves out: the paper's several improve steps per grow with a rising threshold (one
threshold here), online variants (sampling inside the loop is GRPO's place), reward models.
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch

from core import config as C
from core.data.collate import make_collator
from core.data.manifest import write_manifest
from core.methods import reward_fields
from core.models import load_model_and_processor, special_token_ids, tokenizer_of
from core.rewards import compute_rewards
from core.sampling import generate_completions
from core.trainer import Trainer, model_kwargs, place_model, read_rows, resolve_modality, step_seed
from core.utils import dist
from core.utils.logging import MetricsLogger, setup_console

log = logging.getLogger("core.rest")


def filter_samples(samples: list[dict], rewards: list[float], keep_min_reward: float = 1.0,
                   max_per_prompt: int = 0) -> list[dict]:
    """The samples worth imitating.

    ``samples``: dicts with the prompt's ``key`` and a ``completion``; ``rewards``: one total per
    sample. Keeps a sample when its reward is >= ``keep_min_reward`` and its completion (stripped)
    is not empty; one copy of each distinct completion per prompt (the best scored, the first on a
    tie); with ``max_per_prompt`` > 0 at most that many per prompt, highest reward first (earlier
    first on a tie). Returns copies with ``reward`` added, in the samples' order.
    """
    if len(samples) != len(rewards):
        raise ValueError(f"{len(samples)} samples but {len(rewards)} rewards")
    best: dict[tuple, int] = {}
    for i, (s, r) in enumerate(zip(samples, rewards)):
        text = s["completion"].strip()
        if not text or r < keep_min_reward:
            continue
        k = (s["key"], text)
        if k not in best or r > rewards[best[k]]:
            best[k] = i
    chosen = sorted(best.values())
    if max_per_prompt > 0:
        per: dict = defaultdict(list)
        for i in chosen:
            per[samples[i]["key"]].append(i)
        chosen = sorted(i for idx in per.values() for i in sorted(idx, key=lambda j: -rewards[j])[:max_per_prompt])
    return [dict(samples[i], reward=float(rewards[i])) for i in chosen]


def _gather(obj) -> list:
    if dist.world_size() == 1:
        return [obj]
    out = [None] * dist.world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_ENGINE = {}


def _vllm_engine(cfg: C.TrainConfig, model_path: str, model):
    """``rollout.engine: vllm``: this process's engine, started from the first round's model and
    given each later round's weights (``sync``) rather than started again."""
    from core.vllm_engine import engine_from_config
    eng = _ENGINE.get("engine")
    if eng is None:
        eng = _ENGINE["engine"] = engine_from_config(cfg, model_path)
    else:
        eng.sync(model)
    return eng


def grow(cfg: C.TrainConfig, model_path: str, round_i: int, time_left) -> tuple[list, list, dict, list, bool]:
    """Sample K completions per training prompt with ``model_path`` and score them.

    Each process samples its share of the prompts; all get everything back. Returns
    ``(samples, totals, components, rows, complete)``; ``complete`` is False when the budget
    ran out before the last batch.
    """
    r, tc = cfg.rest, cfg.train
    model, processor = load_model_and_processor(model_path, **model_kwargs(cfg.model))
    device = place_model(model, cfg)
    tok = tokenizer_of(processor)
    modality = resolve_modality(cfg, model)
    rows = read_rows(cfg.data.train, cfg, modality)
    collator = make_collator(modality, processor, cfg.data)
    suppress = special_token_ids(processor)
    mine = rows[dist.rank()::dist.world_size()]
    engine = _vllm_engine(cfg, model_path, model) if cfg.rollout.engine == "vllm" else None
    samples, totals, parts, complete = [], [], defaultdict(list), True
    for b, i in enumerate(range(0, len(mine), tc.batch_size)):
        if time_left() <= 0:
            complete = False
            break
        kw = dict(n=r.samples, temperature=r.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                  max_new_tokens=cfg.rollout.max_new_tokens, suppress_ids=suppress, eos_ids=[tok.eos_token_id],
                  seed=step_seed(tc.seed, round_i, b, dist.rank()))
        batch = collator.prompts(mine[i: i + tc.batch_size]).to(device)
        if engine is not None:
            rep, comp = engine.generate(batch, tok, **kw)
        else:
            rep, comp = generate_completions(model, batch, tok, return_logp=False, **kw)
        tot, part = compute_rewards(r.rewards, comp.texts, **reward_fields(rep.rows))
        samples += [{"key": row["key"], "completion": text} for row, text in zip(rep.rows, comp.texts)]
        totals += tot
        for k, v in part.items():
            parts[k] += v
    del model
    _free()
    got = _gather((samples, totals, dict(parts), complete))
    samples = [s for g in got for s in g[0]]
    totals = [x for g in got for x in g[1]]
    parts = {k: [x for g in got for x in g[2].get(k, [])] for k in r.rewards}
    return samples, totals, parts, rows, all(g[3] for g in got)


def kept_rows(kept: list[dict], rows: list[dict]) -> list[dict]:
    """Manifest rows of the kept samples: the prompt's row, key ``<key>#<j>``, ``completion``, ``reward``."""
    by_key = {row["key"]: row for row in rows}
    count: dict = defaultdict(int)
    out = []
    for s in kept:
        j = count[s["key"]]
        count[s["key"]] += 1
        out.append({**by_key[s["key"]], "key": f"{s['key']}#{j}", "prompt_key": s["key"],
                    "completion": s["completion"].strip(), "reward": s["reward"]})
    return out


def round_config(cfg: C.TrainConfig, i: int, kept_path: Path, model_path: str, steps: int,
                 max_seconds: float) -> C.TrainConfig:
    """The SFT config of round ``i``'s improve step."""
    rc = copy.deepcopy(cfg)
    rc.method, rc.output_dir = "sft", str(Path(cfg.output_dir) / f"round_{i}")
    rc.model.path = model_path
    rc.data.train, rc.data.target_field = str(kept_path), "completion"
    rc.data.max_target_tokens = max(cfg.data.max_target_tokens, cfg.rollout.max_new_tokens + 1)
    rc.optim.lr = float(cfg.rest.lrs[i])
    rc.optim.warmup_steps = min(cfg.optim.warmup_steps, steps // 10)
    rc.train.max_steps, rc.train.max_seconds = steps, max_seconds
    rc.train.seed = cfg.train.seed + i
    rc.train.resume = "never" if cfg.train.resume == "never" else "auto"
    if "mlflow" in rc.logging.report_to:  # the rounds' MLflow runs go into the ReST run's store
        from core.utils.trackers import default_mlflow_uri
        rc.logging.mlflow_tracking_uri = (cfg.logging.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                          or default_mlflow_uri(Path(cfg.output_dir)))
    if cfg.logging.run_name:
        rc.logging.run_name = f"{cfg.logging.run_name}/round_{i}"
    return C.validate(rc)


def _mean(xs) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def _copy_model(src: str | Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def run(cfg: C.TrainConfig) -> dict:
    """All rounds of ReST; returns the summary also written to ``rest_summary.json``."""
    setup_console()
    dist.init(cfg.backend.dist_backend, use_deepspeed=cfg.backend.name == "deepspeed",
              device_choice=cfg.backend.device)
    r, out, main = cfg.rest, Path(cfg.output_dir), dist.is_main()
    if not main:
        log.setLevel(logging.WARNING)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        C.dump_config(cfg, out / "config.yaml")
    if cfg.train.resume == "never" and main:  # a fresh run: nothing of an earlier one is reused
        for old in out.glob("round_*"):
            shutil.rmtree(old, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / "final", ignore_errors=True)
    dist.barrier()
    logger = MetricsLogger.from_config(out, cfg, enabled=main, filename="metrics.jsonl")
    t_start, prior = time.time(), 0.0
    # the budget counts what the other methods' train_seconds count: sampling (grow) and SFT
    # steps, not model loading, export or dev evaluation between rounds
    budget_used, grow_started = 0.0, None

    def time_left() -> float:
        if not cfg.train.max_seconds:
            return math.inf
        running = time.time() - grow_started if grow_started is not None else 0.0
        return cfg.train.max_seconds - budget_used - running

    model_path, stats = str(cfg.model.path), []
    summary = {"method": "rest", "rounds": stats, "rounds_done": 0, "empty_rounds": 0,
               "stopped_by_budget": False, "interrupted": False}

    def write_summary():
        summary.update(rounds_done=len(stats), empty_rounds=sum(not s["trained"] for s in stats),
                       seconds=round(prior + time.time() - t_start, 2), budget_seconds=round(budget_used, 2))
        if main:
            (out / "rest_summary.json").write_text(json.dumps(summary, indent=2))

    for i in range(r.rounds):
        rdir = out / f"round_{i}"
        done = rdir / "round.json"
        if done.is_file():
            st = json.loads(done.read_text())
            stats.append(st)
            prior += st["seconds"]
            budget_used += st.get("budget_seconds", st["seconds"])
            model_path = st["final_model"]
            log.info("round %d: already done, continuing from %s", i, model_path)
            continue
        if not all(_gather(time_left() > 0)):
            summary["stopped_by_budget"] = True
            log.info("wall-clock budget of %.0f s spent before round %d", cfg.train.max_seconds, i)
            break
        # ------------------------------------------------------------ grow
        t0, reused = time.time(), 0.0
        grow_path, kept_path = rdir / "grow.json", rdir / "kept.jsonl"
        if grow_path.is_file():  # written after kept.jsonl: reuse it
            st = json.loads(grow_path.read_text())
            reused = st["grow_seconds"]
            prior += reused
            budget_used += reused
            log.info("round %d: reusing the grow step in %s", i, kept_path)
        else:
            grow_started = time.time()
            samples, totals, parts, rows, complete = grow(cfg, model_path, i, time_left)
            grow_started = None
            if not complete:
                summary["stopped_by_budget"] = True
                log.info("wall-clock budget of %.0f s spent while sampling round %d; round dropped",
                         cfg.train.max_seconds, i)
                break
            kept = filter_samples(samples, totals, r.keep_min_reward, r.max_per_prompt)
            st = {"round": i, "model": model_path, "lr": float(r.lrs[i]), "prompts": len(rows),
                  "samples": len(samples), "kept": len(kept), "kept_share": len(kept) / max(1, len(samples)),
                  "prompts_with_kept": len({s["key"] for s in kept}), "reward": _mean(totals),
                  **{f"reward/{k}": _mean(v) for k, v in parts.items()},
                  "kept_reward": _mean([s["reward"] for s in kept]), "grow_seconds": time.time() - t0}
            budget_used += st["grow_seconds"]
            if main:
                write_manifest(rdir / "samples.jsonl",
                               [dict(s, reward=t, **{f"reward/{k}": v[j] for k, v in parts.items()})
                                for j, (s, t) in enumerate(zip(samples, totals))])
                write_manifest(kept_path, kept_rows(kept, rows))
                grow_path.write_text(json.dumps(st, indent=2))
            dist.barrier()
            log.info("round %d grow: %d samples, %d kept (%.1f%%), mean reward %.4f, %.1f s", i, st["samples"],
                     st["kept"], 100 * st["kept_share"], st["reward"], st["grow_seconds"])
        # ------------------------------------------------------------ improve
        st["trained"], st["sft_steps"] = False, 0
        if st["kept"] == 0:
            log.warning("round %d: no sample reached rest.keep_min_reward=%g; SFT skipped, the next round "
                        "samples from %s again", i, r.keep_min_reward, model_path)
        elif not all(_gather(time_left() > 0)):
            summary["stopped_by_budget"] = True
            log.info("wall-clock budget of %.0f s spent before round %d's SFT", cfg.train.max_seconds, i)
            break
        else:
            per_step = cfg.train.batch_size * cfg.optim.grad_accum * dist.world_size()
            steps = r.steps_per_round or math.ceil(st["kept"] / per_step)
            left = time_left()
            rc = round_config(cfg, i, kept_path, model_path, steps, 0.0 if math.isinf(left) else left)
            t1 = time.time()
            trainer = Trainer(rc)
            res = trainer.train()
            del trainer
            _free()
            if res["interrupted"]:
                summary["interrupted"] = True
                break
            model_path = res["final_model"]
            budget_used += res["train_seconds"]
            st.update(trained=True, sft_steps=res["steps"], sft_seconds=time.time() - t1,
                      sft_train_seconds=res["train_seconds"],
                      **{k: v for k, v in res.items() if k.startswith("dev/")})
        st["final_model"] = model_path
        st["budget_seconds"] = st["grow_seconds"] + st.get("sft_train_seconds", 0.0)
        st["seconds"] = reused + time.time() - t0
        st["elapsed_seconds"] = prior + time.time() - t_start
        stats.append(st)
        if main:
            done.write_text(json.dumps(st, indent=2))
        logger.log(i + 1, {k: v for k, v in st.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        write_summary()
    if not summary["interrupted"]:
        if model_path == str(cfg.model.path):
            log.warning("no round trained a model; %s/final is a copy of the starting model", out)
        if main:
            _copy_model(model_path, out / "final")
        dist.barrier()
        summary["final_model"] = str(out / "final")
    write_summary()
    logger.close()
    log.info("rest done: %d round(s), %d empty, final %s", summary["rounds_done"], summary["empty_rounds"],
             summary.get("final_model"))
    return summary
