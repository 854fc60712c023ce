"""core.advantages against explicit formulas."""

import math
import statistics

import pytest
import torch

from core.advantages import group_advantages, group_stats, opd_advantages


def ref_group(rewards, G, scale, eps):
    out = []
    for i in range(0, len(rewards), G):
        grp = rewards[i : i + G]
        mean = sum(grp) / G
        std = statistics.stdev(grp) if G > 1 else 0.0  # unbiased (N - 1)
        for r in grp:
            out.append((r - mean) / (std + eps) if scale == "std" else r - mean)
    return out


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_group_advantages_match_formula(scale, G):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3 * G, generator=g)
    adv = group_advantages(rewards, G, scale=scale, eps=1e-6)
    want = ref_group(rewards.tolist(), G, scale, 1e-6)
    assert adv.shape == rewards.shape
    assert torch.allclose(adv, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_group_layout_is_contiguous():
    # prompt 0 -> [0, 0, 1, 1], prompt 1 -> [5, 5, 5, 9]
    r = [0.0, 0.0, 1.0, 1.0, 5.0, 5.0, 5.0, 9.0]
    adv = group_advantages(r, 4, scale="none")
    assert adv.tolist() == pytest.approx([-0.5, -0.5, 0.5, 0.5, -1.0, -1.0, -1.0, 3.0])
    adv_std = group_advantages(r, 4, scale="std", eps=0.0)
    assert adv_std[:4].tolist() == pytest.approx([-0.5 / math.sqrt(1 / 3)] * 2 + [0.5 / math.sqrt(1 / 3)] * 2)


def test_group_advantages_zero_variance_group_is_zero():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0]), 3)
    assert (adv[:3] == 0).all() and torch.isfinite(adv).all()


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(7), 3)
    with pytest.raises(ValueError, match="batch_std"):
        group_advantages(torch.zeros(6), 3, scale="batch_std")
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 0)


def test_group_advantages_detached():
    r = torch.randn(4, requires_grad=True)
    assert not group_advantages(r, 2).requires_grad


def test_group_stats():
    r = [1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 3.0, 5.0]
    st = group_stats(r, 2)
    assert st["zero_std_frac"] == pytest.approx(2 / 4)  # [1,1] and [2,2]
    assert st["num_groups"] == 4
    assert st["reward_mean"] == pytest.approx(sum(r) / len(r))
    assert st["reward_min"] == 0.0 and st["reward_max"] == 5.0
    stds = [statistics.stdev(r[i : i + 2]) for i in range(0, 8, 2)]
    assert st["group_std_mean"] == pytest.approx(sum(stds) / 4)
    assert all(isinstance(v, float) for v in st.values())
    with pytest.raises(ValueError):
        group_stats(r, 3)


def test_opd_advantages_formula_and_mask():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 5, generator=g).requires_grad_(True)
    t = torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    t_pad = t.clone()
    t_pad[0, 3:] = float("-inf")  # a teacher's padding must not leak
    adv = opd_advantages(s, t_pad, mask, coef=0.5)
    assert not adv.requires_grad
    for b in range(2):
        for i in range(5):
            want = 0.5 * (t[b, i].item() - s[b, i].item()) if mask[b, i] else 0.0
            assert adv[b, i].item() == pytest.approx(want, abs=1e-6)


def test_opd_hybrid_with_sequence_and_token_base():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 4, generator=g)
    t = torch.randn(3, 4, generator=g)
    mask = torch.ones(3, 4)
    mask[1, 2:] = 0
    base_seq = group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3)  # one group of B = 3 completions
    adv = opd_advantages(s, t, mask, coef=0.1, base=base_seq)
    for b in range(3):
        for i in range(4):
            # reward advantage - coef * reverse_kl_t, with reverse_kl_t = log p_S - log p_T
            want = (base_seq[b].item() - 0.1 * (s[b, i].item() - t[b, i].item())) if mask[b, i] else 0.0
            assert adv[b, i].item() == pytest.approx(want, abs=1e-6)
    base_tok = torch.randn(3, 4, generator=g)
    adv_tok = opd_advantages(s, t, mask, coef=2.0, base=base_tok)
    assert torch.allclose(adv_tok, (base_tok + 2.0 * (t - s)) * mask, atol=1e-6)
    with pytest.raises(ValueError, match="base"):
        opd_advantages(s, t, mask, base=torch.zeros(5))
