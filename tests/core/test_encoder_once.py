"""The media encoders run once per distinct prompt (``core.forward.encoders_once``).

On a tiny Qwen2-Audio student (real clips) and a tiny Qwen2.5-Omni thinker (real mp4 clips with
sound), prompts repeated n times as the rollout repeats them: ``completion_logits`` with the
encoders shared (``share="encoders"``) and with the whole prompt forward shared (``"prompts"``,
Qwen2-Audio: the prompt's KV cache read by its copies) gives the logits of the plain forward
(``share="none"``, where every row runs everything; both models share the whole prompt) within 1e-5, and the gradient of every parameter (encoder weights included)
within 1e-5; a hook on each encoder counts the items it ran on, B distinct prompts against B*n
rows on the plain path. Also: ``repeat`` / ``select`` keep the copy groups; a selection of
partial groups and the LocalTeacher share too; a LoRA (peft) model shares through its wrapper; a
batch without copies and a model without a known encoder run unchanged; and one DeepSpeed ZeRO-3
process (CPU, gloo) gives the plain forward's logits and gradients with the encoder run once per
prompt.
"""
from __future__ import annotations

import copy
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, cpu_env

from core.data.collate import AudioPromptCollator, AVPromptCollator, PromptBatch
from core.models import build_tiny_omni_thinker, load_model_and_processor, special_token_ids, train_tokenizer
from core.forward import completion_logits, encoders_once, shared_encoders, token_logp
from core.sampling import Completions, generate_completions
from core.teacher import LocalTeacher

pytestmark = pytest.mark.usefixtures("one_thread")

N = 3  # copies per prompt


# ----------------------------------------------------------------------------- helpers
class ItemCounter:
    """Forward hooks counting the items each encoder ran on, per call. Registered before
    ``completion_logits`` adds its own hooks, so they see the inputs the encoder really got."""

    def __init__(self, model):
        self.calls: dict[str, list[int]] = {}
        self.handles = []
        for enc in shared_encoders(model):
            name = type(enc).__name__
            self.calls[name] = []
            self.handles.append(enc.register_forward_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name):
        def hook(mod, args, kwargs, out):
            a = inspect.signature(mod.forward).bind(*args, **kwargs).arguments
            if name == "Qwen2AudioEncoder":           # input_features [N, mel, frames]
                n = a["input_features"].shape[0]
            elif name == "Qwen2_5OmniAudioEncoder":   # feature_lens [N]
                n = a["feature_lens"].shape[0]
            else:                                     # grid_thw [N, 3]
                n = a["grid_thw"].shape[0]
            self.calls[name].append(int(n))
        return hook

    def take(self) -> dict[str, list[int]]:
        out = {k: list(v) for k, v in self.calls.items()}
        for v in self.calls.values():
            v.clear()
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def _completions(tok, proc, rows: int, T: int = 6, seed: int = 0):
    """Random completions of ordinary tokens; some end early (pad after the mask)."""
    g = torch.Generator().manual_seed(seed)
    specials = set(special_token_ids(proc)) | {tok.eos_token_id}
    normal = torch.tensor([i for i in range(len(tok)) if i not in specials])
    ids = normal[torch.randint(len(normal), (rows, T), generator=g)]
    mask = torch.ones_like(ids)
    mask[1, T - 2:] = 0
    ids[1, T - 2:] = tok.pad_token_id
    return ids, mask


def _forward_backward(model, batch, ids, mask, share: str, weights: torch.Tensor):
    """Logits and the gradient of every trainable parameter of a weighted sum of token log-probs
    (weights differ between copies, so each copy sends the encoder its own gradient)."""
    model.zero_grad(set_to_none=True)
    logits = completion_logits(model, batch, ids, mask, share=share)
    loss = (token_logp(logits, ids) * mask * weights).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _decoder_rows(model):
    """A forward hook on the first LM decoder layer recording ``(rows, positions)`` per call."""
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    calls = []
    handle = layer.register_forward_hook(lambda mod, args, kwargs, out: calls.append(
        tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])), with_kwargs=True)
    return calls, handle


def _assert_same_forward_backward(model, batch, ids, mask, encoder_prefixes, distinct: int,
                                  prompt_once: bool = True):
    """Shared vs plain: equal logits and gradients (1e-5), encoders on ``distinct`` vs all rows;
    for both ways of sharing (``share="encoders"``, and ``"prompts"``: the whole prompt forward
    once per distinct prompt where the model allows it: ``prompt_once``)."""
    counter = ItemCounter(model)
    layer_calls, handle = _decoder_rows(model)
    w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    B, P, T = len(batch), batch.inputs["input_ids"].shape[1], ids.shape[1]
    try:
        plain, g_plain = _forward_backward(model, batch, ids, mask, "none", w)
        seen_plain = counter.take()
        shared = {}
        for mode in ("encoders", "prompts"):
            layer_calls.clear()
            shared[mode] = _forward_backward(model, batch, ids, mask, mode, w)
            seen = counter.take()
            assert all(v == [distinct] for v in seen.values()), (mode, seen)
            if mode == "prompts" and prompt_once:  # the prompt's layers on the distinct prompts only
                assert layer_calls == [(distinct, P), (B, T - 1)], layer_calls
            else:
                assert layer_calls == [(B, P + T)], (mode, layer_calls)
    finally:
        counter.remove()
        handle.remove()
    B = len(batch)
    assert seen_plain and all(v == [B] for v in seen_plain.values()), seen_plain
    m = mask.bool()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for mode, (ours, g_ours) in shared.items():
        torch.testing.assert_close(ours[m], plain[m], atol=1e-5, rtol=0, msg=mode)
        assert g_ours.keys() == g_plain.keys() and g_ours.keys() <= trainable, mode
        for n in g_plain:
            torch.testing.assert_close(g_ours[n], g_plain[n], atol=1e-5, rtol=1e-5, msg=f"{mode}: {n}")
    for prefix in encoder_prefixes:  # the encoders do get a gradient, through the shared outputs
        enc = [n for n in g_plain if prefix in n]
        assert enc and any(float(g_plain[n].abs().max()) > 0 for n in enc), prefix
    # the hooks are gone afterwards
    for enc in shared_encoders(model):
        assert not enc._forward_pre_hooks and not enc._forward_hooks


# ----------------------------------------------------------------------------- Qwen2-Audio
@pytest.fixture(scope="module")
def audio(tiny):
    model, proc = load_model_and_processor(tiny.student)
    batch = AudioPromptCollator(proc, "Transcribe the audio.").prompts(tiny.rows[:3])
    return SimpleNamespace(model=model.train(), proc=proc, tok=proc.tokenizer, batch=batch, tiny=tiny)


def test_repeat_and_select_keep_the_copy_groups(audio):
    b = audio.batch
    assert b.groups is None and b.distinct() is None
    rep = b.repeat(N)
    assert rep.groups == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rep.distinct() == ([0, 3, 6], [0, 0, 0, 1, 1, 1, 2, 2, 2])
    sel = rep.select([4, 0, 3, 8])
    assert sel.groups == [1, 0, 1, 2] and sel.distinct() == ([0, 1, 3], [0, 1, 0, 2])
    assert rep.select([0, 3]).distinct() is None  # no copies left
    assert rep.repeat(2).groups == [g for g in rep.groups for _ in range(2)]
    assert b.repeat(1) is b


def test_qwen2_audio_shared_encoder_matches_the_plain_forward(audio):
    rep = audio.batch.repeat(N)
    ids, mask = _completions(audio.tok, audio.proc, len(rep))
    _assert_same_forward_backward(audio.model, rep, ids, mask, ["audio_tower.", "multi_modal_projector."],
                                  distinct=len(audio.batch))


def test_partial_groups_and_the_local_teacher(audio, tiny):
    rep = audio.batch.repeat(N)
    sel = rep.select([7, 1, 0, 8, 4])  # prompts 2, 0, 0, 2, 1: three distinct
    ids, mask = _completions(audio.tok, audio.proc, len(sel), seed=2)
    _assert_same_forward_backward(audio.model, sel, ids, mask, ["audio_tower."], distinct=3)
    tmodel, _ = load_model_and_processor(tiny.teacher)
    teacher = LocalTeacher(tmodel)
    counter = ItemCounter(tmodel)
    try:
        ids, mask = _completions(audio.tok, audio.proc, len(rep), seed=3)
        scores = teacher.score(rep, Completions(ids, mask, None, [""] * len(rep)), top_k=4, return_logits=True)
        assert counter.take() == {"Qwen2AudioEncoder": [len(audio.batch)]}
        with torch.no_grad():
            plain = completion_logits(tmodel, rep, ids, mask, share="none")
        assert counter.take() == {"Qwen2AudioEncoder": [len(rep)]}
    finally:
        counter.remove()
    m = mask.bool()
    torch.testing.assert_close(scores.logits[m], plain[m], atol=1e-5, rtol=0)


def test_lora_model_shares_through_the_peft_wrapper(audio):
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(audio.model)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg).train()
    assert shared_encoders(model), "the encoder is found through the peft wrapper"
    rep = audio.batch.repeat(2)
    ids, mask = _completions(audio.tok, audio.proc, len(rep), seed=4)
    # LoRA on the encoder's attention too: its adapters get the copies' summed gradient
    _assert_same_forward_backward(model, rep, ids, mask, ["audio_tower."], distinct=len(audio.batch))


def test_no_copies_or_no_known_encoder_runs_unchanged(audio):
    b = audio.batch
    with encoders_once(audio.model, b) as hooks:
        assert hooks == []
    rep = b.repeat(2)
    with encoders_once(torch.nn.Linear(2, 2), rep) as hooks:  # a model without a shared encoder
        assert hooks == []
    # a call the hooks cannot map (not one item per row) passes through untouched
    with encoders_once(audio.model, rep) as hooks:
        enc = shared_encoders(audio.model)[0]
        x = rep.inputs["input_features"][:2]
        with torch.no_grad():
            out = enc(x).last_hidden_state
        assert out.shape[0] == 2 and hooks[0].items == 0
    # and a batch that is no PromptBatch copy (groups given by hand) tells its distinct prompts
    hand = PromptBatch(rep.inputs, rep.rows, rep.texts, groups=[0, 0, 1, 1, 2, 2])
    assert hand.distinct() == ([0, 2, 4], [0, 0, 1, 1, 2, 2])


# ----------------------------------------------------------------------------- Qwen2.5-Omni thinker
def _mp4(path: Path, seconds: float, freq: int) -> Path:
    """A 64x64, 8 fps test pattern of ``seconds`` with a sine track."""
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size=64x64:rate=8:duration={seconds}",
           "-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate=16000:duration={seconds}",
           "-c:a", "aac", "-shortest", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is needed to make the test videos (bash run.sh setup installs it)")
    root = tmp_path_factory.mktemp("omni_once")
    short, long = _mp4(root / "short.mp4", 2, 440), _mp4(root / "long.mp4", 3, 880)
    tok = train_tokenizer(["a red square", "two beeps", "what do you see"], 300, omni=True)
    model, proc = build_tiny_omni_thinker(tok, seed=0)
    rows = [{"key": "s0", "video": str(short), "question": "what do you see"},
            {"key": "s1", "video": str(long), "question": "what do you hear"}]
    batch = AVPromptCollator(proc, "Question: {question}").prompts(rows)
    return SimpleNamespace(model=model.train(), proc=proc, tok=tok, batch=batch)


def test_omni_thinker_shared_encoders_match_the_plain_forward(omni):
    rep = omni.batch.repeat(N)
    assert rep.inputs["video_grid_thw"].shape[0] == len(rep)
    ids, mask = _completions(omni.tok, omni.proc, len(rep), seed=5)
    # "prompts": the whole prompt forward once per clip too (3-D rotary positions for the completions)
    _assert_same_forward_backward(omni.model, rep, ids, mask, ["audio_tower.", "visual."],
                                  distinct=len(omni.batch))
    names = {type(e).__name__ for e in shared_encoders(omni.model)}
    assert names == {"Qwen2_5OmniAudioEncoder", "Qwen2_5OmniVisionEncoder"}


def test_omni_thinker_partial_groups(omni):
    rep = omni.batch.repeat(N)
    sel = rep.select([4, 0, 5, 1])  # prompts 1, 0, 1, 0 (clips of different lengths, interleaved)
    ids, mask = _completions(omni.tok, omni.proc, len(sel), seed=6)
    _assert_same_forward_backward(omni.model, sel, ids, mask, ["audio_tower.", "visual."], distinct=2)


@pytest.mark.parametrize("which", ["audio", "omni"])
def test_generate_prefill_runs_the_encoders_once_per_prompt(which, request):
    """``generate_completions`` samples n per prompt with the encoders run on the distinct prompts
    at prefill, and samples what the plain path samples (the repeated batch without copy groups)."""
    env = request.getfixturevalue(which)
    model, batch = env.model, env.batch
    counter = ItemCounter(model)
    try:
        kw = dict(n=N, temperature=1.0, max_new_tokens=5, seed=7, suppress_ids=special_token_ids(env.proc))
        rep, ours = generate_completions(model, batch, env.tok, **kw)
        seen_ours = counter.take()
        plain_batch = PromptBatch(rep.inputs, rep.rows, rep.texts)  # no groups: every row runs the encoders
        kw["n"] = 1
        _, plain = generate_completions(model, plain_batch, env.tok, **kw)
        seen_plain = counter.take()
    finally:
        counter.remove()
    assert rep.groups is not None
    assert seen_ours and all(v == [len(batch)] for v in seen_ours.values()), seen_ours
    assert all(v == [len(rep)] for v in seen_plain.values()), seen_plain
    assert torch.equal(ours.ids, plain.ids) and torch.equal(ours.mask, plain.mask)
    torch.testing.assert_close(ours.logp, plain.logp, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3
ZERO3_SCRIPT = r"""
import json, sys
import torch
from core.utils import dist
dist.init("gloo", use_deepspeed=True)
import deepspeed
from deepspeed.utils import safe_get_full_grad
from core.data.collate import AudioPromptCollator
from core.models import load_model_and_processor
from core.forward import completion_logits, shared_encoders, token_logp

student, rows = sys.argv[1], json.loads(sys.argv[2])
out = {}
for share in ("prompts", "encoders", "none"):
    model, proc = load_model_and_processor(student)
    rep = AudioPromptCollator(proc, "Transcribe the audio.").prompts(rows).repeat(3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 200, (len(rep), 5), generator=g)
    mask = torch.ones_like(ids)
    w = torch.rand(ids.shape, generator=g) + 0.5
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    seen = []
    enc = shared_encoders(engine)[0]
    h = enc.register_forward_hook(lambda m, a, k, o: seen.append(int(a[0].shape[0])), with_kwargs=True)
    logits = completion_logits(engine, rep, ids, mask, share=share)
    loss = (token_logp(logits, ids) * w).sum()
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
    h.remove()
    grads = {n: g for n, g in grads.items() if g is not None}
    out[str(share)] = {"seen": seen, "logits": logits.detach(), "grads": grads}
b = out["none"]
res = {"seen_plain": b["seen"], "rows": len(rep), "grad_names": len(b["grads"]),
       "encoder_grad_max": max(float(g.abs().max()) for n, g in b["grads"].items() if "audio_tower." in n)}
for mode in ("prompts", "encoders"):
    a = out[mode]
    res[mode] = {"seen": a["seen"], "logits_max_diff": float((a["logits"] - b["logits"]).abs().max()),
                 "same_grad_names": sorted(a["grads"]) == sorted(b["grads"]),
                 "grad_max_diff": max(float((a["grads"][n] - b["grads"][n]).abs().max()) for n in b["grads"])}
print("RESULT " + json.dumps(res))
"""


def test_deepspeed_zero3_shares_the_encoder(tiny):
    pytest.importorskip("deepspeed")
    rows = json.dumps(tiny.rows[:2])
    p = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT, str(tiny.student), rows], cwd=REPO, env=cpu_env(1),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-6000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert res["seen_plain"] == [res["rows"]] == [6] and res["grad_names"] > 0, res
    assert res["encoder_grad_max"] > 0, res
    for mode in ("prompts", "encoders"):  # the whole prompt once per prompt, or only the encoder
        r = res[mode]
        assert r["seen"] == [2], (mode, res)
        assert r["logits_max_diff"] <= 1e-5, (mode, res)
        assert r["same_grad_names"] and r["grad_max_diff"] <= 1e-5, (mode, res)
