"""core.losses.distill_loss_from_hidden against distill_loss on the materialised logits."""

import pytest
import torch

from core.losses import (
    AGG_MODES,
    DIVERGENCES,
    distill_loss,
    distill_loss_from_hidden,
    register_divergence,
)

CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]


def make(B=3, T=7, H=16, Ht=12, V=151, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) * 0.7).requires_grad_(True)
    ht = torch.randn(B, T, Ht, generator=g)
    wt = torch.randn(V, Ht, generator=g) * 0.8
    mask = (torch.rand(B, T, generator=g) > 0.35).float()
    mask[0, 0] = 1.0
    if empty_row:
        mask[-1] = 0.0  # a sequence with no completion token
    return h, w, ht, wt, mask


def reference(h, w, ht, wt, mask, **kw):
    teacher = ht @ wt.T
    loss, metrics = distill_loss(h @ w.T, teacher, mask=mask, **kw)
    return loss, metrics, torch.autograd.grad(loss, [h, w])


def assert_close(loss_a, grads_a, loss_b, grads_b, tol=1e-5):
    assert abs(loss_a.item() - loss_b.item()) <= tol * max(1.0, abs(loss_b.item()))
    for a, b in zip(grads_a, grads_b):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_distill_loss(divergence, beta, temperature):
    h, w, ht, wt, mask = make(seed=1, V=203)
    kw = dict(divergence=divergence, beta=beta, temperature=temperature)
    want, want_m, want_g = reference(h, w, ht, wt, mask, **kw)
    got, got_m = distill_loss_from_hidden(h, w, teacher_hidden=ht, teacher_lm_head_weight=wt, mask=mask,
                                          chunk_size=4, **kw)
    got_g = torch.autograd.grad(got, [h, w])
    assert_close(got, got_g, want, want_g)
    assert set(got_m) == set(want_m)
    for k in want_m:
        assert got_m[k] == pytest.approx(want_m[k], abs=1e-5), k
    # positions outside the mask get no gradient
    assert (got_g[0][~mask.bool()] == 0).all()


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_aggregation_modes(agg, divergence):
    h, w, ht, wt, mask = make(seed=2, V=97)
    kw = dict(divergence=divergence, agg=agg, temperature=1.5)
    want, _, want_g = reference(h, w, ht, wt, mask, **kw)
    got, _ = distill_loss_from_hidden(h, w, teacher_hidden=ht, teacher_lm_head_weight=wt, mask=mask,
                                      chunk_size=5, **kw)
    assert_close(got, torch.autograd.grad(got, [h, w]), want, want_g)


def test_norm_len_is_passed_on():
    h, w, ht, wt, mask = make(seed=3, V=64)
    kw = dict(agg="seq-mean-token-sum-norm", norm_len=20)
    want, _, want_g = reference(h, w, ht, wt, mask, **kw)
    got, _ = distill_loss_from_hidden(h, w, teacher_hidden=ht, teacher_lm_head_weight=wt, mask=mask, **kw)
    assert_close(got, torch.autograd.grad(got, [h, w]), want, want_g)


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_chunk_size_independence(divergence, beta):
    h, w, ht, wt, mask = make(seed=4, V=120, B=4, T=9)
    results = []
    for chunk in (1, 3, 7, 1000):
        loss, metrics = distill_loss_from_hidden(h, w, teacher_hidden=ht, teacher_lm_head_weight=wt, mask=mask,
                                                 divergence=divergence, beta=beta, chunk_size=chunk)
        results.append((loss, torch.autograd.grad(loss, [h, w]), metrics))
    loss0, g0, m0 = results[0]
    for loss, g, m in results[1:]:
        assert_close(loss, g, loss0, g0, tol=5e-6)
        assert m["student_entropy"] == pytest.approx(m0["student_entropy"], abs=1e-6)


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5)])
def test_teacher_as_logits_or_hidden(divergence, beta):
    h, w, ht, wt, mask = make(seed=5, V=88)
    kw = dict(divergence=divergence, beta=beta, temperature=0.7, chunk_size=3)
    a, ma = distill_loss_from_hidden(h, w, teacher_hidden=ht, teacher_lm_head_weight=wt, mask=mask, **kw)
    ga = torch.autograd.grad(a, [h, w])
    b, mb = distill_loss_from_hidden(h, w, ht @ wt.T, mask=mask, **kw)
    gb = torch.autograd.grad(b, [h, w])
    assert_close(a, ga, b, gb, tol=1e-6)
    assert ma["teacher_entropy"] == pytest.approx(mb["teacher_entropy"], abs=1e-6)


def test_teacher_gets_no_gradient_and_student_only_what_is_asked():
    h, w, ht, wt, mask = make(seed=6, V=50)
    ht.requires_grad_(True)
    wt.requires_grad_(True)
    frozen_w = w.detach()
    loss, _ = distill_loss_from_hidden(h, frozen_w, teacher_hidden=ht, teacher_lm_head_weight=wt, mask=mask)
    loss.backward()
    assert ht.grad is None and wt.grad is None
    want, _, (want_gh, _) = reference(h.detach().requires_grad_(True), w, ht.detach(), wt.detach(), mask)
    assert (h.grad - want_gh).abs().max().item() <= 1e-5
    # under no_grad: the same value, nothing attached
    with torch.no_grad():
        v, _ = distill_loss_from_hidden(h, w, teacher_hidden=ht, teacher_lm_head_weight=wt, mask=mask)
    assert not v.requires_grad and v.item() == pytest.approx(loss.item(), abs=1e-6)


def test_backward_scales_with_upstream_gradient():
    h, w, ht, wt, mask = make(seed=7, V=60)
    loss, _ = distill_loss_from_hidden(h, w, teacher_hidden=ht, teacher_lm_head_weight=wt, mask=mask,
                                       divergence="jsd", chunk_size=2)
    g1 = torch.autograd.grad(3.0 * loss, [h, w])
    want, _, want_g = reference(h, w, ht, wt, mask, divergence="jsd")
    for a, b in zip(g1, want_g):
        assert (a - 3.0 * b).abs().max().item() <= 3e-5


def test_empty_mask_gives_attached_zero():
    h, w, ht, wt, mask = make(seed=8, V=50)
    loss, metrics = distill_loss_from_hidden(h, w, teacher_hidden=ht, teacher_lm_head_weight=wt,
                                             mask=torch.zeros_like(mask))
    assert loss.item() == 0.0 and metrics["num_tokens"] == 0.0
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert (gh == 0).all() and (gw == 0).all()


def test_bf16_weights():
    h, w, ht, wt, mask = make(seed=9, V=70)
    hb = h.detach().bfloat16().requires_grad_(True)
    wb = w.detach().bfloat16().requires_grad_(True)
    want, _ = distill_loss(hb @ wb.T, (ht @ wt.T).bfloat16(), mask=mask)
    want_g = torch.autograd.grad(want, [hb, wb])
    got, _ = distill_loss_from_hidden(hb, wb, (ht @ wt.T).bfloat16(), mask=mask, chunk_size=3)
    got_g = torch.autograd.grad(got, [hb, wb])
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    for a, b in zip(got_g, want_g):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * b.float().abs().max().item() + 1e-6


if "test_sq_logratio" not in DIVERGENCES:

    @register_divergence("test_sq_logratio")
    def _sq_logratio(s, t, valid=None, beta=0.5):
        """A divergence with no closed-form gradient in the fused path: autograd per chunk."""
        return 0.5 * (s.exp() * (s - t).square()).sum(-1)


def test_registered_divergence_uses_autograd_per_chunk():
    h, w, ht, wt, mask = make(seed=10, V=77)
    kw = dict(divergence="test_sq_logratio", temperature=1.3)
    want, _, want_g = reference(h, w, ht, wt, mask, **kw)
    got, _ = distill_loss_from_hidden(h, w, teacher_hidden=ht, teacher_lm_head_weight=wt, mask=mask,
                                      chunk_size=4, **kw)
    assert_close(got, torch.autograd.grad(got, [h, w]), want, want_g)


def test_bad_inputs():
    h, w, ht, wt, mask = make(seed=11, V=40)
    t_logits = ht @ wt.T
    with pytest.raises(ValueError, match="not both"):
        distill_loss_from_hidden(h, w, t_logits, teacher_hidden=ht, teacher_lm_head_weight=wt, mask=mask)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        distill_loss_from_hidden(h, w, mask=mask)
    with pytest.raises(ValueError, match="together"):
        distill_loss_from_hidden(h, w, teacher_hidden=ht, mask=mask)
    with pytest.raises(ValueError, match="vocabularies"):
        distill_loss_from_hidden(h, w, teacher_hidden=ht, teacher_lm_head_weight=wt[:-1], mask=mask)
    with pytest.raises(ValueError, match="vocabularies"):
        distill_loss_from_hidden(h, w, t_logits[..., :-1], mask=mask)
    with pytest.raises(ValueError, match="lm_head_weight"):
        distill_loss_from_hidden(h, w[:, :-1], t_logits, mask=mask)
    with pytest.raises(ValueError, match="mask shape"):
        distill_loss_from_hidden(h, w, t_logits, mask=mask[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        distill_loss_from_hidden(h, w, t_logits, mask=mask, chunk_size=0)
    with pytest.raises(ValueError, match="unknown divergence"):
        distill_loss_from_hidden(h, w, t_logits, mask=mask, divergence="hellinger")
    with pytest.raises(ValueError, match="temperature"):
        distill_loss_from_hidden(h, w, t_logits, mask=mask, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        distill_loss_from_hidden(h, w, t_logits, mask=mask, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="aggregation"):
        distill_loss_from_hidden(h, w, t_logits, mask=mask, agg="sum")
