"""Teachers score a student's completions, token by token.

``Teacher`` is the protocol every teacher follows: ``score(batch, completions, top_k=None,
return_logits=False)`` returns ``TeacherScores`` with the sampled tokens' log-probabilities and,
as asked, the teacher's top-k ids and log-probabilities or its full logits, all aligned with the
student's completion positions. ``valid`` marks the samples a teacher could score; a sample it
could not (a remote teacher that failed to align it) is excluded from the loss by the caller and
counted, never turned into a silent zero.

``LocalTeacher`` runs an in-process transformers model on the same prompt tensors as the student
(teacher and student share the processor). A remote (HTTP) teacher implements the same protocol
in its own module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from core.data.collate import PromptBatch
from core.rollout import Completions, completion_logits


@dataclass
class TeacherScores:
    logp: torch.Tensor                    # [B, T] teacher log-prob of each completion token
    valid: torch.Tensor                   # [B] bool: the sample was scored
    topk_ids: torch.Tensor | None = None  # [B, T, k]
    topk_logp: torch.Tensor | None = None  # [B, T, k]
    logits: torch.Tensor | None = None    # [B, T, V]


@runtime_checkable
class Teacher(Protocol):
    def score(self, batch: PromptBatch, completions: Completions, top_k: int | None = None,
              return_logits: bool = False, temperature: float = 1.0) -> TeacherScores: ...


class LocalTeacher:
    """An in-process transformers model used as the teacher (frozen, eval mode, no grad)."""

    def __init__(self, model, processor=None, device: str | torch.device | None = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = processor
        self.device = device

    @torch.no_grad()
    def score(self, batch: PromptBatch, completions: Completions, top_k: int | None = None,
              return_logits: bool = False, temperature: float = 1.0) -> TeacherScores:
        logits = completion_logits(self.model, batch, completions.ids, completions.mask, temperature)
        # log-probs as logit - logsumexp: no [B, T, V] log-softmax copy of the logits
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        logp = logits.gather(-1, completions.ids.unsqueeze(-1).to(logits.device)) - lse
        logp = logp.squeeze(-1) * completions.mask.to(logp)
        out = TeacherScores(logp=logp, valid=torch.ones(logp.shape[0], dtype=torch.bool))
        if top_k:
            k = min(int(top_k), logits.shape[-1])
            top_logits, out.topk_ids = logits.topk(k, dim=-1)
            out.topk_logp = top_logits - lse
        if return_logits:
            out.logits = logits
        return out
