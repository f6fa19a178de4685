"""The epsilon of a schedule of Gaussian mechanism steps, computed with Opacus' analysis directly: the independent
reference the accountant's and the leader's reports are checked against."""

from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' RDPAccountant's default orders


def independent_epsilon(schedule: list[tuple[float, float, int]], delta: float) -> float:
    """The epsilon at delta of these (noise multiplier, sample rate, steps) phases, one after another."""
    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS) for sigma, q, steps in schedule)
    epsilon, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)
