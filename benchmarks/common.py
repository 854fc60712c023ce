"""Shared pieces of the benchmarks: timing helpers and the tiny Qwen2-Audio teacher/student pair.

- ``best`` (minimum) is the headline statistic: the 2-core machine is shared, and a burst of
  other work can slow single runs ten-fold; medians are reported beside it.
- ``timeit(fn, repeat, warmup)``: runs ``fn`` ``warmup`` times untimed, then ``repeat`` times,
  and returns the median seconds (and every sample); ``median`` of a list of samples.
- ``tiny_audio_pair(smoke)``: a few espeak-ng clips (16 kHz mono), a byte-level BPE tokenizer
  trained on their transcripts, and a Qwen2-Audio student and teacher built from config with the
  ASR recipe's default sizes (``recipes/asr/conf/models.yaml``: teacher 64 hidden, student 48
  hidden, 2 layers each, vocabulary 400, 3 s chunks), saved with ``save_pretrained`` and loaded
  back through ``core.models.load_model_and_processor`` as the trainer does. Built once per
  process (cached) in a temporary folder that is removed at exit.
- ``opd_config(...)``: the ``TrainConfig`` of an OPD step (the recipe's defaults: distribution
  form, reverse KL over the full vocabulary) and ``opd_context(...)``: the trainer's ``Context``
  and ``TorchEngine`` for it.
- ``machine()``: platform, CPU count, threads and library versions for ``results.json`` (and the
  GPU's name in a GPU run).
- ``RUN`` / ``configure(device, dtype, zero)``: where the benchmarks run, set once by
  ``benchmarks.run`` (``--device cuda``: bf16 and DeepSpeed ZeRO-2 unless told otherwise);
  ``sync()`` waits for the GPU before a timer stops; ``ds_config(folder)`` writes the DeepSpeed
  JSON of the run (both sides of a comparison get the same one).

What it leaves out: timing assertions (benchmarks report numbers, tests never threshold them)
and any reference implementation (each benchmark module writes its own).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

SR = 16000
TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "red green and blue",
    "one two three four",
    "hello world",
    "open the door please",
    "the sun is hot",
    "we like to read books",
]
SEED = 0
THREADS = 2


# --------------------------------------------------------------------------- where the benchmarks run
RUN = SimpleNamespace(device="cpu", dtype="float32", zero=0)
DTYPES = ("float32", "bfloat16")


def configure(device: str = "cpu", dtype: str | None = None, zero: int | None = None) -> SimpleNamespace:
    """Set ``RUN``: ``device`` cpu | cuda; ``dtype`` (default float32 on the CPU, bfloat16 on a GPU);
    ``zero``: the DeepSpeed ZeRO stage of the training-step comparisons (0 = no DeepSpeed; default
    0 on the CPU, 2 on a GPU). A GPU asked for on a machine without one is a ``ValueError``."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: this machine has no CUDA GPU (torch {torch.__version__})")
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    zero = (2 if device == "cuda" else 0) if zero is None else int(zero)
    if zero not in (0, 2, 3):
        raise ValueError(f"zero must be 0, 2 or 3, not {zero!r}")
    if zero and device != "cuda":
        raise ValueError("--zero: the DeepSpeed comparisons run on a GPU (--device cuda)")
    RUN.device, RUN.dtype, RUN.zero = device, dtype, zero
    return RUN


def on_gpu() -> bool:
    return RUN.device == "cuda"


def sync() -> None:
    """Wait for the GPU's queued work (a timer stopped before it would time the launches only)."""
    if on_gpu():
        torch.cuda.synchronize()


def ds_config(folder: Path) -> Path | None:
    """The DeepSpeed JSON of this run in ``folder`` (ZeRO ``RUN.zero``, bf16 as ``RUN.dtype``), or
    None without DeepSpeed. ``"auto"`` values are filled by each trainer from its own arguments."""
    if not RUN.zero:
        return None
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
           "bf16": {"enabled": RUN.dtype == "bfloat16"},
           "zero_optimization": {"stage": RUN.zero, "overlap_comm": False, "contiguous_gradients": True},
           "steps_per_print": 1000000, "wall_clock_breakdown": False}
    path = Path(folder) / f"ds_zero{RUN.zero}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return path


# --------------------------------------------------------------------------- timing
def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def timeit(fn, repeat: int = 5, warmup: int = 1):
    """Median seconds of ``fn()`` over ``repeat`` runs after ``warmup`` untimed ones.

    Returns ``(median_seconds, samples, last_result)``.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    samples = []
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        out = fn()
        sync()
        samples.append(time.perf_counter() - t)
    return median(samples), samples, out


class Timer:
    """Accumulates named wall-clock sections: ``with timer("teacher"): ...``."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Section:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[name] = timer.t.get(name, 0.0) + time.perf_counter() - self.t0

        return _Section()


def alternate(fns: dict, repeat: int, warmup: int) -> tuple[dict, dict]:
    """Time the variants ``fns`` (name -> ``fn(round)``) side by side: every round runs each once,
    in reversed order every other round (no variant always runs first on a warm cache).

    Returns ``(seconds, results)``: for each name, its times and its return values over the
    ``repeat`` rounds after ``warmup`` untimed ones."""
    names = list(fns)
    seconds: dict = {k: [] for k in names}
    results: dict = {k: [] for k in names}
    for it in range(warmup + repeat):
        for name in (names if it % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            out = fns[name](it)
            sync()
            dt = time.perf_counter() - t0
            if it >= warmup:
                seconds[name].append(dt)
                results[name].append(out)
    return seconds, results


@contextlib.contextmanager
def multinomial_draw():
    """While open, ``core.sampling.sample_loop`` draws with ``torch.multinomial`` (as
    ``model.generate`` does) instead of its inverse-CDF ``draw``: both then sample the same tokens
    under the same seed."""
    import core.sampling as R
    real = R.draw
    R.draw = lambda probs: torch.multinomial(probs, 1).squeeze(1)
    try:
        yield
    finally:
        R.draw = real


def best(xs):
    """The minimum: on a shared, noisy machine the least disturbed run is the most repeatable."""
    return float(min(xs)) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def machine() -> dict:
    import transformers

    try:
        import trl
        trl_v = trl.__version__
    except Exception:  # noqa: BLE001 - optional
        trl_v = None
    return {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_v,
            "core": str(Path(__import__("core").__file__).parent),
            "run": {"device": RUN.device, "dtype": RUN.dtype, "zero": RUN.zero},
            **({"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda} if on_gpu() else {})}


# --------------------------------------------------------------------------- tiny models and clips
@functools.lru_cache(maxsize=None)
def tiny_audio_pair() -> SimpleNamespace:
    """Clips, manifest rows, tokenizer, and the saved student/teacher folders (built once)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is needed for the audio benchmarks (bash run.sh setup installs it)")
    from core.models import build_tiny_qwen2_audio, train_tokenizer
    from tools.synth.speech import synthesize

    root = Path(tempfile.mkdtemp(prefix="bench_audio_"))
    atexit.register(shutil.rmtree, root, True)
    (root / "wav").mkdir()
    rows = []
    for i, text in enumerate(TEXTS):
        wav = root / "wav" / f"utt{i:02d}.wav"
        dur = synthesize(text, wav, voice="en-us", speed=170, sample_rate=SR)
        rows.append({"key": f"utt{i:02d}", "audio": str(wav), "task": "asr", "text": text, "duration": dur})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer(TEXTS, 400)
    build_tiny_qwen2_audio(tok, hidden=48, layers=2, heads=4, audio_hidden=48, audio_layers=2, seed=0,
                           chunk_seconds=3, out_dir=root / "student")
    build_tiny_qwen2_audio(tok, hidden=64, layers=2, heads=4, audio_hidden=64, audio_layers=2, seed=1,
                           chunk_seconds=3, out_dir=root / "teacher")
    return SimpleNamespace(root=root, rows=rows, manifest=manifest, student=root / "student", teacher=root / "teacher")


def load_pair():
    """Fresh (student, processor, teacher) loaded from the cached folders (a new student each call,
    so optimizer steps of one benchmark never leak into another)."""
    from core.models import load_model_and_processor

    t = tiny_audio_pair()
    student, proc = load_model_and_processor(t.student)
    teacher, _ = load_model_and_processor(t.teacher)
    return student, proc, teacher.eval()


def opd_config(*, batch_size: int, n: int, max_new_tokens: int, temperature: float = 1.0, lr: float = 1e-3,
               grad_clip: float = 1.0):
    """The recipe's OPD stage (distribution form, reverse KL over the full vocabulary)."""
    from core import config as C

    t = tiny_audio_pair()
    return C.load_config(None, {
        "method": "opd", "model": {"path": str(t.student)}, "teacher": {"path": str(t.teacher)},
        "data": {"train": str(t.manifest), "prompt": "Transcribe the audio."},
        "rollout": {"n": n, "temperature": temperature, "max_new_tokens": max_new_tokens},
        "opd": {"form": "distribution", "divergence": "reverse_kl", "support": "full"},
        "optim": {"lr": lr, "grad_clip": grad_clip, "scheduler": "constant"},
        "train": {"batch_size": batch_size, "seed": SEED},
    })


def opd_context(cfg, student, proc, teacher):
    """The trainer's ``Context`` + ``TorchEngine`` for ``cfg`` (as ``Trainer.__init__`` builds them)."""
    from transformers import get_scheduler

    from core.backends import TorchEngine
    from core.data.collate import AudioPromptCollator
    from core.methods import Context
    from core.models import special_token_ids
    from core.teacher import LocalTeacher

    o = cfg.optim
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    sched = get_scheduler(o.scheduler, opt, num_warmup_steps=o.warmup_steps, num_training_steps=cfg.train.max_steps)
    engine = TorchEngine(student, opt, sched, grad_clip=o.grad_clip, grad_accum=o.grad_accum)
    tok = getattr(proc, "tokenizer", proc)
    ctx = Context(model=student, forward_model=student, processor=proc, tokenizer=tok,
                  collator=AudioPromptCollator(proc, cfg.data.prompt), cfg=cfg, teacher=LocalTeacher(teacher, proc),
                  suppress_ids=special_token_ids(proc), eos_ids=[tok.eos_token_id])
    return ctx, engine


def opd_setup(smoke: bool):
    """The OPD step both ``overhead`` and ``audio_opd_profile`` time: sizes, repeats, the model
    pair, the config, the trainer's context and engine, and the rows of one batch."""
    batch_size, n, max_new = (2, 2, 8) if smoke else (8, 4, 32)
    repeat, warmup = (1, 1) if smoke else (9, 2)
    student, proc, teacher = load_pair()
    cfg = opd_config(batch_size=batch_size, n=n, max_new_tokens=max_new)
    ctx, engine = opd_context(cfg, student, proc, teacher)
    return SimpleNamespace(batch_size=batch_size, n=n, max_new=max_new, repeat=repeat, warmup=warmup,
                           student=student, proc=proc, teacher=teacher, cfg=cfg, ctx=ctx, engine=engine,
                           rows=rows_for(batch_size))


def rows_for(batch_size: int) -> list[dict]:
    rows = tiny_audio_pair().rows
    return [rows[i % len(rows)] for i in range(batch_size)]
