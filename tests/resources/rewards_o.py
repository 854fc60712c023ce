"""A reward for engine tests: the share of the letter ``o`` in a completion (a tiny random policy
gets a spread of values within each group, so GRPO has a signal from its first step)."""
from core.rewards import register_reward


@register_reward("test_o_share")
def o_share(completions, **kwargs):
    return [c.count("o") / max(1, len(c)) for c in completions]
