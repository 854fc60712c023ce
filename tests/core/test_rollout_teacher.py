"""Rollout engine and LocalTeacher on tiny Qwen2-Audio models (real HF classes, real audio).

Checks: determinism under a seed, EOS masks and padding, the n-per-prompt layout, special tokens
never sampled, sampled-token log-probs equal to a recomputed forward, and LocalTeacher scores equal
to a forward of the teacher written out in the test.
"""
from __future__ import annotations

import pytest
import torch

from core.data.collate import AudioPromptCollator
from core.models import load_model_and_processor, special_token_ids
from core.forward import completion_logits, token_logp
from core.sampling import eos_mask, generate_completions
from core.teacher import LocalTeacher

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student(tiny):
    model, proc = load_model_and_processor(tiny.student)
    return model.eval(), proc


@pytest.fixture(scope="module")
def teacher_model(tiny):
    model, proc = load_model_and_processor(tiny.teacher)
    return model.eval(), proc


@pytest.fixture(scope="module")
def batch(tiny, student):
    _, proc = student
    b = AudioPromptCollator(proc, "Transcribe the audio.").prompts(tiny.rows[:3])
    lens = b.inputs["attention_mask"].sum(1)
    assert len(set(lens.tolist())) > 1, "the prompts should need left padding"
    return b


def _with_logit_bias(model, bias: dict[int, float]):
    """The model with its LM head given a bias on some token ids (a copy; the original is kept)."""
    import copy

    m = copy.deepcopy(model)
    old = m.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for i, v in bias.items():
            head.bias[i] = v
    m.set_output_embeddings(head)
    return m.eval()


@pytest.fixture(scope="module")
def eos_prone(student):
    """The student made to emit EOS often (about 1 token in 3), so completions end early."""
    model, proc = student
    return _with_logit_bias(model, {proc.tokenizer.eos_token_id: 5.0})


def _gen(model, batch, proc, **kw):
    tok = proc.tokenizer
    kw.setdefault("suppress_ids", special_token_ids(proc))
    kw.setdefault("eos_ids", [tok.eos_token_id])
    return generate_completions(model, batch, tok, **kw)


# ----------------------------------------------------------------------------- eos_mask
def test_eos_mask_hand_made():
    E = 7
    ids = torch.tensor([
        [5, 6, E, 9, E, 3],   # EOS at 2: the later EOS is after the end
        [E, 1, 1, 1, 1, 1],   # EOS first
        [1, 2, 3, 4, 5, 6],   # no EOS: everything counts
        [1, 2, 3, 4, 5, E],   # EOS last
    ])
    want = torch.tensor([
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
    ])
    assert torch.equal(eos_mask(ids, [E]), want)
    # several EOS ids: the first of any of them ends the completion
    assert torch.equal(eos_mask(ids, [E, 3])[0], torch.tensor([1, 1, 1, 0, 0, 0]))
    assert torch.equal(eos_mask(ids, [E, 3])[2], torch.tensor([1, 1, 1, 0, 0, 0]))


# ----------------------------------------------------------------------------- determinism
def test_generation_is_deterministic_under_a_seed(student, batch):
    model, proc = student
    kw = dict(n=2, temperature=1.0, max_new_tokens=8)
    _, a = _gen(model, batch, proc, seed=123, **kw)
    torch.manual_seed(999)  # the global RNG state before the call must not matter
    _, b = _gen(model, batch, proc, seed=123, **kw)
    _, c = _gen(model, batch, proc, seed=124, **kw)
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.logp, b.logp)
    assert a.texts == b.texts
    assert not torch.equal(a.ids, c.ids), "another seed should sample other completions"


# ----------------------------------------------------------------------------- masks
def test_masks_stop_at_first_eos_and_pad_after(eos_prone, student, batch):
    _, proc = student
    tok = proc.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    _, comp = _gen(eos_prone, batch, proc, n=4, max_new_tokens=12, seed=0)
    B, T = comp.ids.shape
    assert B == len(batch) * 4 and T <= 12
    assert comp.mask.dtype == torch.long
    ended_early = 0
    for ids, mask, logp in zip(comp.ids.tolist(), comp.mask.tolist(), comp.logp):
        first = ids.index(eos) if eos in ids else None
        if first is None:
            assert mask == [1] * T, "a completion without EOS is all completion tokens"
            continue
        assert mask == [1] * (first + 1) + [0] * (T - first - 1), (ids, mask)
        assert all(t == pad for t in ids[first + 1:]), "tokens after EOS must be padding"
        assert torch.all(logp[first + 1:] == 0)
        ended_early += first < T - 1
    assert ended_early >= 2, "the EOS-prone model should end some completions early (then padded)"
    # the decoded text stops at EOS
    for text, ids, mask in zip(comp.texts, comp.ids, comp.mask):
        want = tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True).strip()
        assert text == want


def test_n_completions_per_prompt_are_contiguous(eos_prone, student, batch):
    _, proc = student
    n = 3
    rep, comp = _gen(eos_prone, batch, proc, n=n, temperature=0.8, max_new_tokens=10, seed=7)
    assert len(rep) == len(batch) * n == comp.ids.shape[0]
    for r in range(len(rep)):
        i = r // n
        assert rep.rows[r] is batch.rows[i]
        for k, v in batch.inputs.items():
            assert torch.equal(rep.inputs[k][r], v[i]), k
    # completion r was sampled from prompt r // n: its log-probs are reproduced with that prompt
    own = batch.select([r // n for r in range(len(rep))])
    lp = token_logp(completion_logits(eos_prone, own, comp.ids, comp.mask) / 0.8, comp.ids) * comp.mask
    torch.testing.assert_close(lp, comp.logp, atol=1e-4, rtol=0)
    # ... and not with a shuffled assignment
    other = batch.select([(r // n + 1) % len(batch) for r in range(len(rep))])
    lp_other = token_logp(completion_logits(eos_prone, other, comp.ids, comp.mask) / 0.8, comp.ids) * comp.mask
    assert not torch.allclose(lp_other, comp.logp, atol=1e-4)
    # greedy: the n copies of one prompt agree
    _, g = _gen(eos_prone, batch, proc, n=n, do_sample=False, max_new_tokens=6)
    for i in range(len(batch)):
        grp = g.ids[i * n:(i + 1) * n]
        assert all(torch.equal(grp[0], x) for x in grp[1:])


# ----------------------------------------------------------------------------- special tokens
def test_special_tokens_are_never_sampled(student, batch):
    model, proc = student
    tok = proc.tokenizer
    audio, im_start, pad = (tok.convert_tokens_to_ids(t) for t in ("<|AUDIO|>", "<|im_start|>", "<|endoftext|>"))
    specials = special_token_ids(proc)
    assert {audio, im_start, pad} <= set(specials)
    assert tok.eos_token_id not in specials
    # make the specials likely (and EOS impossible, so completions run to full length)
    biased = _with_logit_bias(model, {**{i: 15.0 for i in specials}, tok.eos_token_id: -1e4})
    kw = dict(n=8, temperature=5.0, max_new_tokens=16, seed=1)
    _, free = _gen(biased, batch, proc, suppress_ids=[], **kw)
    hits = torch.isin(free.ids[free.mask.bool()], torch.tensor(specials))
    assert hits.sum() > 20, "without suppression the biased model samples special tokens"
    _, comp = _gen(biased, batch, proc, **kw)
    sampled = comp.ids[comp.mask.bool()]
    assert sampled.numel() == len(batch) * 8 * 16
    assert not torch.isin(sampled, torch.tensor(specials)).any()
    # the unbiased model at a high temperature, with the default suppression list
    _, comp = _gen(model, batch, proc, **kw)
    assert not torch.isin(comp.ids[comp.mask.bool()], torch.tensor(specials)).any()


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logp_matches_a_recomputed_forward(eos_prone, student, batch, temperature):
    _, proc = student
    rep, comp = _gen(eos_prone, batch, proc, n=2, temperature=temperature, max_new_tokens=10, seed=3)
    assert comp.logp is not None and comp.logp.shape == comp.ids.shape
    logits = completion_logits(eos_prone, rep, comp.ids, comp.mask)
    assert logits.shape == (*comp.ids.shape, eos_prone.config.text_config.vocab_size)
    lp = token_logp(logits / temperature, comp.ids) * comp.mask
    torch.testing.assert_close(comp.logp, lp, atol=1e-4, rtol=0)
    # the temperature argument of completion_logits is the same division
    lp2 = token_logp(completion_logits(eos_prone, rep, comp.ids, comp.mask, temperature), comp.ids) * comp.mask
    torch.testing.assert_close(lp2, lp, atol=1e-5, rtol=0)
    assert (comp.logp[comp.mask.bool()] < 0).all()


# ----------------------------------------------------------------------------- LocalTeacher
def _direct_teacher_logits(model, batch, ids, mask):
    """Teacher logits predicting each completion token, from one plain forward."""
    p_ids, p_mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    P, T = p_ids.shape[1], ids.shape[1]
    full_ids = torch.cat([p_ids, ids], dim=1)
    attn = torch.cat([p_mask, mask.to(p_mask.dtype)], dim=1)
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=full_ids, attention_mask=attn, position_ids=pos,
                    input_features=batch.inputs["input_features"],
                    feature_attention_mask=batch.inputs["feature_attention_mask"], use_cache=False)
    return out.logits[:, P - 1:P + T - 1].float()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_local_teacher_scores_equal_a_direct_forward(eos_prone, student, teacher_model, batch, temperature):
    _, proc = student
    tmodel, _ = teacher_model
    rep, comp = _gen(eos_prone, batch, proc, n=2, max_new_tokens=10, seed=11)
    k = 5
    scores = LocalTeacher(tmodel).score(rep, comp, top_k=k, return_logits=True, temperature=temperature)
    ref_logits = _direct_teacher_logits(tmodel, rep, comp.ids, comp.mask) / temperature
    m = comp.mask.bool()
    assert scores.logits.shape == ref_logits.shape
    torch.testing.assert_close(scores.logits[m], ref_logits[m], atol=1e-5, rtol=1e-5)
    ref_logp_all = torch.log_softmax(ref_logits, -1)
    ref_logp = ref_logp_all.gather(-1, comp.ids.unsqueeze(-1)).squeeze(-1) * comp.mask
    torch.testing.assert_close(scores.logp, ref_logp, atol=1e-5, rtol=0)
    ref_topk_logp, ref_topk_ids = ref_logp_all.topk(k, dim=-1)
    assert scores.topk_ids.shape == (*comp.ids.shape, k)
    assert torch.equal(scores.topk_ids[m], ref_topk_ids[m])
    torch.testing.assert_close(scores.topk_logp[m], ref_topk_logp[m], atol=1e-5, rtol=0)
    assert scores.valid.all() and scores.valid.shape == (comp.ids.shape[0],)
    # the teacher is another model: its scores are not the student's
    assert not torch.allclose(scores.logp[m], comp.logp[m], atol=1e-3)
    # without top_k / return_logits only the sampled-token log-probs come back
    plain = LocalTeacher(tmodel).score(rep, comp, temperature=temperature)
    assert plain.topk_ids is None and plain.logits is None
    torch.testing.assert_close(plain.logp, scores.logp, atol=0, rtol=0)


# ----------------------------------------------------------------------------- our loop vs generate
@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=20),
                                dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, top_k=50, top_p=0.9),
                                dict(do_sample=False)], ids=["plain", "top_k", "top_p", "both", "greedy"])
def test_our_loop_samples_what_generate_samples(eos_prone, student, batch, kw, monkeypatch):
    """``sample_loop`` (prefill once per prompt, static cache, our filters) with ``generate``'s
    draw (``torch.multinomial``) in place of ours against ``model.generate`` on the repeated
    batch: same tokens, masks, texts and log-probs."""
    import core.sampling as R
    from core.forward import own_loop_ok
    monkeypatch.setattr(R, "draw", lambda probs: torch.multinomial(probs, 1).squeeze(1))
    _, proc = student
    assert own_loop_ok(eos_prone)
    common = dict(n=3, max_new_tokens=12, seed=11, **kw)
    _, ours = _gen(eos_prone, batch, proc, **common)
    _, hf = _gen(eos_prone, batch, proc, engine="hf", **common)
    assert torch.equal(ours.ids, hf.ids) and torch.equal(ours.mask, hf.mask)
    assert ours.texts == hf.texts
    torch.testing.assert_close(ours.logp, hf.logp, atol=1e-5, rtol=0)
    lens = ours.mask.sum(-1)
    if kw.get("do_sample", True):  # (greedy, the EOS-prone model stops at once)
        assert int(lens.min()) < int(lens.max()), "some completions should end early"


def test_filters_keep_what_they_should():
    from core.sampling import _filter_top_k, _filter_top_p
    s = torch.tensor([[0.0, 3.0, 1.0, 2.0, 2.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    k = _filter_top_k(s, 2)
    assert torch.isfinite(k).tolist() == [[False, True, False, True, True],  # a tie with the 2nd stays
                                          [True, True, True, True, True]]  # four tied for 2nd
    assert torch.equal(_filter_top_k(s, 0), s) and torch.equal(_filter_top_k(s, 9), s)
    s = torch.tensor([[0.0, 3.0, 1.0, 2.0, 2.5], [5.0, 0.1, 0.2, 0.3, 0.4]])  # no ties
    p = torch.softmax(s, -1)
    kept = torch.isfinite(_filter_top_p(s, 0.7))
    for row, keep in zip(p, kept):  # the most likely tokens until their mass reaches 0.7
        order = row.argsort(descending=True)
        mass = row[order].cumsum(0)
        n_keep = int((mass < 0.7).sum()) + 1
        assert keep[order[:n_keep]].all() and not keep[order[n_keep:]].any()
    assert torch.isfinite(_filter_top_p(s, 1e-6)).sum(-1).tolist() == [1, 1]  # the top token always stays
    assert torch.equal(_filter_top_p(s, 1.0), s)


def test_mask_and_engine_choice(tiny):
    from core.forward import own_loop_ok
    model, proc = load_model_and_processor(tiny.student)
    with pytest.raises(ValueError, match="engine"):
        generate_completions(model, AudioPromptCollator(proc, "Transcribe the audio.").prompts(tiny.rows[:1]), proc.tokenizer, engine="vllm")
    assert own_loop_ok(model)
    assert not own_loop_ok(torch.nn.Linear(2, 2))


ZERO3_SYNCED = r"""
import json, sys
import torch
from core.utils import dist
dist.init("gloo", use_deepspeed=True)
import deepspeed
import torch.distributed as tdist
from core.data.collate import AudioPromptCollator
from core.models import load_model_and_processor, special_token_ids
from core.sampling import generate_completions

student, rows = sys.argv[1], json.loads(sys.argv[2])
rank = tdist.get_rank()
model, proc = load_model_and_processor(student)
old = model.get_output_embeddings()
head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
with torch.no_grad():  # EOS made likely (same weights on both ranks): completions end at various steps
    head.weight.copy_(old.weight)
    head.bias.zero_()
    head.bias[proc.tokenizer.eos_token_id] = 5.0
model.set_output_embeddings(head)
plain = __import__("copy").deepcopy(model)
batch = AudioPromptCollator(proc, "Transcribe the audio.").prompts(rows[rank::2])
kw = dict(n=2, max_new_tokens=10, seed=5 + rank, suppress_ids=special_token_ids(proc))
cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
       "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
       "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
opt = torch.optim.SGD(model.parameters(), lr=0.0)
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
steps = []
h = engine.module.get_output_embeddings().register_forward_hook(lambda *a: steps.append(1))
_, comp = generate_completions(engine, batch, proc.tokenizer, synced_gpus=True, **kw)
h.remove()
_, ref = generate_completions(plain, batch, proc.tokenizer, **kw)
T = int(ref.mask.sum(-1).max())
print("RESULT " + json.dumps({"rank": rank, "forwards": len(steps), "own_len": int(comp.mask.sum(-1).max()),
      "same_ids": torch.equal(comp.ids[:, :T], ref.ids[:, :T]) and bool((comp.mask[:, T:] == 0).all()),
      "same_mask": torch.equal(comp.mask[:, :T], ref.mask[:, :T]),
      "logp_diff": float((comp.logp[:, :T] - ref.logp[:, :T]).abs().max())}))
"""


def test_zero3_two_ranks_step_together_until_both_are_done(tiny):
    """Two ZeRO-3 ranks (gloo, CPU) whose completions end at different steps: the synced loop
    keeps both stepping (the parameter gathers are collective) until both are done, and each
    rank's samples equal a plain one-process run of the same model and seed."""
    import json
    import subprocess
    import sys

    from conftest import REPO, cpu_env
    pytest.importorskip("deepspeed")
    env = cpu_env(1)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    procs = []
    for rank in range(2):
        e = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-c", ZERO3_SYNCED, str(tiny.student), json.dumps(tiny.rows[:4])],
                                      cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    res = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-6000:]
        res.append(json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][len("RESULT "):]))
    res.sort(key=lambda r: r["rank"])
    assert res[0]["own_len"] != res[1]["own_len"], res  # one rank is done first ...
    longest = max(r["own_len"] for r in res)
    assert res[0]["forwards"] == res[1]["forwards"] == longest, res  # ... and steps on with the other
    for r in res:
        assert r["same_ids"] and r["same_mask"] and r["logp_diff"] <= 1e-5, r


def test_decoding_writes_into_a_static_cache(eos_prone, student, batch, monkeypatch):
    """After the prefill the prompts' keys and values go into buffers of the final length once
    (``StaticCache``); the token-for-token test above then covers its decoding."""
    import core.sampling as R
    seen = []
    real = R._static_cache

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(type(out).__name__)
        return out

    monkeypatch.setattr(R, "_static_cache", spy)
    _, proc = student
    _gen(eos_prone, batch, proc, n=2, max_new_tokens=4, seed=0)
    assert seen == ["StaticCache"]


def test_inverse_cdf_draw_samples_the_distribution():
    """``draw`` against the probabilities it is given: frequencies within 5 standard deviations,
    zero entries (first, middle, last: suppressed or filtered tokens) never drawn, and over a
    150k vocabulary with a long tail the draws land in tenths of the CDF as its mass says."""
    from core.sampling import draw
    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0])
    n = 100_000
    got = draw(p.expand(n, -1).contiguous())
    counts = torch.bincount(got, minlength=len(p)).double()
    assert counts[p == 0].sum() == 0
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sd + 1e-9).all(), counts
    # a large vocabulary with a long tail: where each draw falls in the row's CDF is uniform
    V, rows = 151_936, 4_000
    probs = torch.softmax(torch.randn(V) * 3, -1)
    cdf = probs.double().cumsum(0)
    idx = torch.cat([draw(probs.expand(200, -1)) for _ in range(rows // 200)])  # 200 rows a call: 0.25 GB
    # tokens binned by where the middle of their slice of [0, 1) falls; each bin's expected share
    # is the mass of its tokens
    bins = ((cdf - probs.double() / 2) * 10).long().clamp(max=9)
    want = torch.zeros(10, dtype=torch.float64).index_add_(0, bins, probs.double())
    got = torch.bincount(bins[idx], minlength=10).double()
    assert ((got - rows * want).abs() <= 5 * (rows * want * (1 - want)).sqrt() + 1).all(), (got, rows * want)
    # deterministic under a seed, and another seed draws otherwise
    torch.manual_seed(3)
    a = draw(probs.expand(64, -1))
    torch.manual_seed(3)
    assert torch.equal(a, draw(probs.expand(64, -1)))
    torch.manual_seed(4)
    assert not torch.equal(a, draw(probs.expand(64, -1)))


def test_bad_probabilities_and_out_of_range_suppress_ids(eos_prone, student, batch):
    from core.sampling import draw
    with pytest.raises(ValueError, match="NaN"):
        draw(torch.tensor([[0.5, float("nan")], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="all zero"):
        draw(torch.zeros(1, 4))
    # a suppressed id past the LM head's rows (an added token) is ignored, as generate ignores it
    _, proc = student
    V = eos_prone.get_output_embeddings().out_features
    _, a = _gen(eos_prone, batch, proc, n=2, max_new_tokens=5, seed=9)
    _, b = _gen(eos_prone, batch, proc, n=2, max_new_tokens=5, seed=9,
                suppress_ids=special_token_ids(proc) + [V, V + 7])
    assert torch.equal(a.ids, b.ids)
