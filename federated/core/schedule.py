"""How long training runs and how fast it learns: rounds, epochs and the learning-rate schedule."""

import math

def learning_rate(round_index: int, base_lr: float, warmup_rounds: int, total_rounds: int) -> float:
    """Linear warm-up to base_lr over warmup_rounds, then cosine decay towards zero."""
    if round_index < warmup_rounds:
        return base_lr * (round_index + 1) / warmup_rounds
    progress = (round_index - warmup_rounds) / max(1, total_rounds - warmup_rounds)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
