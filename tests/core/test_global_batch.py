"""The loss over the global batch, whatever the split.

One optimizer step's 8 samples with unequal completion lengths, taken as one batch of 8, as 2
micro-batches of 4 (``optim.grad_accum`` 2) and as 2 processes of 4 (gloo): the same loss and the
same gradients, for every method (sft, opd in both forms, grpo) and every aggregation mode of
GRPO's policy loss and KL penalty. Each part's loss is normalised by the token and sequence
counts of the whole step (``core.trainer.step_norm``) and scaled for the engine's division by
``grad_accum`` and its average over processes (``core.trainer.backward_parts``), so per-part
means averaged afterwards (the bug class of transformers' ``num_items_in_batch`` and verl's
global token count) would fail here: with these lengths they differ by far more than the
tolerance (checked below for token-mean).
"""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from core import config as C
from core.backends import TorchEngine
from core.data.collate import AudioPromptCollator
from core.forward import completion_logits, token_logp
from core.methods import Context, Experience, get_method
from core.models import load_model_and_processor
from core.sampling import Completions
from core.trainer import backward_parts

LENGTHS = [1, 7, 2, 8, 3, 5, 8, 1]  # completion tokens of the 8 samples (two halves of unequal totals)
AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
CASES = ([("sft", {})] + [("opd", {"opd": {"form": "distribution"}}), ("opd", {"opd": {"form": "sampled_token"}})]
         + [("grpo", {"grpo": {"agg": a, "kl_beta": 0.1, "clip_low": 0.1, "clip_high": 0.1}}) for a in AGG_MODES])
IDS = ["sft", "opd-distribution", "opd-sampled_token"] + [f"grpo-{a}" for a in AGG_MODES]


def _cfg(student, manifest, method, over) -> C.TrainConfig:
    d = {"method": method, "model": {"path": str(student)}, "teacher": {"path": str(student)},
         "data": {"train": str(manifest), "prompt": "Transcribe the audio."},
         "grpo": {"rewards": {"format": 1.0}}, "rollout": {"temperature": 0.9}}
    return C.load_config(overrides=C.deep_merge(d, over))


def _experience(cfg, model, proc, rows) -> tuple[Context, Experience]:
    """A fixed experience of 8 samples for ``cfg.method`` (the same in every process)."""
    tok = proc.tokenizer
    ctx = Context(model=model, forward_model=model, processor=proc, tokenizer=tok,
                  collator=AudioPromptCollator(proc, cfg.data.prompt), cfg=cfg)
    g = torch.Generator().manual_seed(0)
    B, T = len(LENGTHS), max(LENGTHS)
    V = model.get_output_embeddings().out_features
    batch = ctx.collator.prompts(rows)
    ids = torch.randint(10, 200, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    comp = Completions(ids, mask, None, [""] * B)
    with torch.no_grad():
        logp = token_logp(completion_logits(model, batch, ids, mask, temperature=cfg.rollout.temperature), ids)
    old = (logp + 0.3 * torch.randn(B, T, generator=g)) * mask  # ratios away from 1: the clip acts
    m = mask.float()
    if cfg.method == "sft":
        tensors = {}
    elif cfg.method == "opd":
        tensors = {"mask": m, "old_logp": old, "teacher_logits": torch.randn(B, T, V, generator=g) * 2,
                   "teacher_logp": old - torch.rand(B, T, generator=g)}
    else:
        tensors = {"mask": m, "old_logp": old, "adv": torch.randn(B, generator=g),
                   "ref_logp": old + 0.2 * torch.randn(B, T, generator=g)}
    return ctx, Experience(batch, comp, tensors)


class _GradEngine(TorchEngine):
    """The torch engine, whose step keeps the averaged gradients instead of applying them."""

    def step(self) -> dict:
        from core.utils import dist
        params = self.params()
        dist.all_reduce_grads(params)
        self.grads = [p.grad.detach().clone() for p in params]
        self.optimizer.zero_grad(set_to_none=True)
        return {"skipped": False}


def _step(cfg, model, ctx, parts, accum, world):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine = _GradEngine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), grad_clip=0.0,
                         grad_accum=accum)
    out = backward_parts(engine, get_method(cfg.method), ctx, parts, accum, world)
    assert out is not None
    engine.step()
    return out[0], engine.grads


def _run(student, manifest, rows, method, over, split: str, rank: int = 0):
    torch.manual_seed(0)
    model, proc = load_model_and_processor(str(student))
    model.train()
    cfg = _cfg(student, manifest, method, over)
    ctx, exp = _experience(cfg, model, proc, rows)
    if split == "one":
        return _step(cfg, model, ctx, [exp], 1, 1)
    if split == "micro":
        return _step(cfg, model, ctx, [exp.select([0, 1, 2, 3]), exp.select([4, 5, 6, 7])], 2, 1)
    return _step(cfg, model, ctx, [exp.select([4 * rank + i for i in range(4)])], 1, 2)


def _worker(rank, port, setting, out_path):
    """One of 2 processes: every case's step on this process's 4 samples."""
    import torch.distributed as tdist
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        res = {}
        for case_id, (method, over) in zip(IDS, CASES):
            loss, grads = _run(*setting, method, over, split="procs", rank=rank)
            t = torch.tensor([loss], dtype=torch.float64)
            tdist.all_reduce(t)  # the step's loss: the processes' shares added up
            res[case_id] = {"loss": float(t), "grads": grads}
        if rank == 0:
            torch.save(res, out_path)
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def setting(tiny):
    assert sum(LENGTHS[:4]) != sum(LENGTHS[4:])
    return tiny.student, tiny.manifest, tiny.rows[:8]


@pytest.fixture(scope="module")
def two_processes(setting, tmp_path_factory):
    """Every case run by 2 processes of 4 samples each (one spawn for all cases)."""
    out = tmp_path_factory.mktemp("procs") / "procs.pt"
    mp.spawn(_worker, args=(free_port(), setting, str(out)), nprocs=2, join=True)
    return torch.load(out)


def _close(a: list, b: list, what: str):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4, msg=lambda m: f"{what}, parameter {i}: {m}")


@pytest.mark.parametrize("method,over,case_id", [(m, o, i) for (m, o), i in zip(CASES, IDS)], ids=IDS)
def test_the_same_loss_and_gradients_for_any_split(setting, two_processes, method, over, case_id, one_thread):
    loss1, g1 = _run(*setting, method, over, split="one")
    loss2, g2 = _run(*setting, method, over, split="micro")
    assert loss2 == pytest.approx(loss1, rel=1e-5, abs=1e-7)
    _close(g2, g1, "2 micro-batches of 4 vs one batch of 8")
    two = two_processes[case_id]
    assert two["loss"] == pytest.approx(loss1, rel=1e-5, abs=1e-7)
    _close(two["grads"], g1, "2 processes of 4 vs one batch of 8")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_per_part_means_would_differ(setting, agg, one_thread):
    """The check above can fail: averaging each half's own loss (each normalised by its own
    counts, the old way) gives another loss for these lengths and advantages."""
    student, manifest, rows = setting
    torch.manual_seed(0)
    model, proc = load_model_and_processor(str(student))
    cfg = _cfg(student, manifest, "grpo", {"grpo": {"agg": agg}})
    ctx, exp = _experience(cfg, model, proc, rows)
    grpo = get_method("grpo")
    with torch.no_grad():
        whole = float(grpo.loss(ctx, exp)[0])
        halves = [float(grpo.loss(ctx, exp.select(list(range(i, i + 4))))[0]) for i in (0, 4)]
    if agg == "token-mean":  # unequal token counts of the halves: their mean is not the whole's
        assert abs(sum(halves) / 2 - whole) > 1e-2 * abs(whole)
    else:  # equal sequence counts: the mean of the halves is the whole, as the normaliser says
        assert sum(halves) / 2 == pytest.approx(whole, rel=1e-5)


