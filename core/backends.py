"""Training backends: plain PyTorch and DeepSpeed, behind one small interface.

``engine.backward(loss)`` once per micro-batch, ``engine.step()`` once per optimizer step
(it returns the gradient norm and whether the step was skipped for a non-finite gradient),
``engine.save_state(dir)`` / ``load_state(dir)`` for checkpoints, ``engine.export(dir, processor)``
for a ``save_pretrained`` folder loadable by plain transformers.

LoRA (a peft model): checkpoints hold the trainable parameters only (adapters and their
optimizer state; the frozen base is reloaded from ``model.path`` on resume), and the export
merges the adapters into a fresh full-precision base from ``base_loader`` (``save_merged_lora``),
so it works the same for a 4-bit base and for weights partitioned by ZeRO-3 (the adapters are
gathered first).

- ``TorchEngine``: one process, or several under torchrun/the DeepSpeed launcher with gradients
  averaged by ``all_reduce`` before clipping (every rank holds the whole model).
- ``DeepSpeedEngine``: ``deepspeed.initialize`` with the recipe's JSON (ZeRO-2 or ZeRO-3); the
  values written ``"auto"`` are filled from the training config. On CPU it runs with gloo.

What it leaves out: the loop (``core/trainer.py``) and any loss maths.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from core.utils import dist

log = logging.getLogger(__name__)


def _clean_state_dict(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def _is_peft(model) -> bool:
    from core.models import is_peft_model
    return is_peft_model(model)


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _export_lora(adapters: dict, module, out_dir: Path, processor, base_loader) -> None:
    from core.models import save_merged_lora
    if base_loader is None:
        raise ValueError("exporting a LoRA model needs base_loader (a function returning the base model)")
    save_merged_lora(adapters, module.peft_config[module.active_adapter], base_loader, processor, out_dir)


class TorchEngine:
    name = "torch"

    def __init__(self, model, optimizer, scheduler, *, grad_clip: float = 1.0, grad_accum: int = 1):
        self.module = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.grad_accum = grad_accum
        self.zero3 = False

    def params(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> dict:
        params = self.params()
        dist.all_reduce_grads(params)
        if self.grad_clip and self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        norm = float(norm)
        skipped = not math.isfinite(norm)
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "skipped": skipped}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_state(self, d: Path) -> None:
        if dist.is_main():
            sd = self.module.state_dict()
            if _is_peft(self.module):  # the adapters only; the frozen base comes from model.path
                keep = _trainable_names(self.module)
                sd = {k: v for k, v in sd.items() if k in keep}
            from core.utils.checkpoint import write_torch
            write_torch({"model": sd, "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict()}, Path(d) / "engine.pt")

    def load_state(self, d: Path) -> None:
        s = torch.load(Path(d) / "engine.pt", weights_only=True, map_location="cpu")
        if _is_peft(self.module):
            res = self.module.load_state_dict(s["model"], strict=False)
            lacking = _trainable_names(self.module) - set(s["model"])
            if res.unexpected_keys or lacking:
                raise RuntimeError(f"{d}: the checkpoint's trainable parameters do not match this LoRA model "
                                   f"(unexpected {list(res.unexpected_keys)[:5]}, missing {sorted(lacking)[:5]}); "
                                   "was it written with another model.lora?")
        else:
            self.module.load_state_dict(s["model"])
        impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(s["optimizer"])
        for g, kept in zip(self.optimizer.param_groups, impl):  # the implementation is this run's (optim.fused),
            g.update(kept)                                       # not the checkpoint's
            # and so is where its step counts live: on the parameters' device for the fused kernel,
            # on the CPU otherwise (load_state_dict placed them by the checkpoint's flags)
            on_device = bool(g.get("fused") or g.get("capturable"))
            for p in g["params"]:
                st = self.optimizer.state.get(p, {})
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].to(p.device if on_device else "cpu", torch.float32)
        self.scheduler.load_state_dict(s["scheduler"])

    def export(self, out_dir: Path, processor, base_loader=None) -> None:
        """A plain model folder; a LoRA model's adapters merged into ``base_loader()``'s weights."""
        if dist.is_main():
            from core.models import adapter_state_dict, save_model
            if _is_peft(self.module):
                _export_lora(adapter_state_dict(self.module), self.module, out_dir, processor, base_loader)
            else:
                save_model(self.module, processor, out_dir)
        dist.barrier()


def fill_ds_config(path: str, *, batch_size: int, grad_accum: int, grad_clip: float,
                   dtype: str = "float32") -> dict:
    """The DeepSpeed JSON with its ``"auto"`` values filled from the training config: the batch
    sizes, gradient clipping, and ``bf16`` / ``fp16`` ``enabled`` from the model's dtype (so
    ``model.dtype: bfloat16`` turns on DeepSpeed's bf16 mode; an explicit true/false is kept)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {p}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON: {e}") from None
    ws = dist.world_size()
    auto = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": batch_size * grad_accum * ws, "gradient_clipping": grad_clip}
    for k, v in auto.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
    for key, want in (("bf16", "bfloat16"), ("fp16", "float16")):
        sect = cfg.get(key)
        if isinstance(sect, dict) and sect.get("enabled") == "auto":
            sect["enabled"] = dtype == want
    if dtype in ("bfloat16", "float16") and not any(
            isinstance(cfg.get(k), dict) and cfg[k].get("enabled") is True for k in ("bf16", "fp16")):
        log.warning("%s: model.dtype is %s but neither bf16 nor fp16 is enabled; DeepSpeed will "
                    "train in float32", p, dtype)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    for k in ("optimizer", "scheduler"):
        if k in cfg:
            raise ValueError(f"{p}: remove '{k}': the optimizer and schedule come from the training config")
    return cfg


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model, optimizer, scheduler, ds_config: dict):
        import deepspeed
        self.ds_config = ds_config
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.module = self.engine.module
        self.zero3 = int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary

    def step(self) -> dict:
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return {"grad_norm": norm, "skipped": False}

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save_state(self, d: Path) -> None:
        # LoRA: the frozen base is not written (it is reloaded from model.path on resume)
        self.engine.save_checkpoint(str(d), tag="deepspeed", save_latest=False,
                                    exclude_frozen_parameters=_is_peft(self.module))

    def load_state(self, d: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(d), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=True,
                                              load_module_strict=not _is_peft(self.module))
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {d}")

    def export(self, out_dir: Path, processor, base_loader=None) -> None:
        """A plain model folder: ZeRO-3 weights gathered; LoRA adapters (gathered under ZeRO-3)
        merged into ``base_loader()``'s full-precision weights on the main process."""
        from core.models import adapter_state_dict, save_model
        if _is_peft(self.module):
            if self.zero3:
                import deepspeed
                params = [p for p in self.module.parameters() if p.requires_grad]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    adapters = adapter_state_dict(self.module)
            else:
                adapters = adapter_state_dict(self.module)
            if dist.is_main():
                _export_lora(adapters, self.module, out_dir, processor, base_loader)
            dist.barrier()
            return
        if self.zero3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.module.state_dict()
        if dist.is_main():
            m = self.module
            if self.zero3:
                # save the gathered weights with the module's own config and class
                tmp = type(m)(m.config)
                tmp.load_state_dict(_clean_state_dict(sd), strict=False)
                tmp.generation_config = m.generation_config
                m = tmp
            save_model(m, processor, out_dir)
        dist.barrier()
