"""Shamir's t-of-n secret sharing of 32-byte secrets over the prime field of p = 2^264 - 275, shares of fixed length.

A share is the polynomial's value at x = holder's learner id + 1 (never 0, where the secret lies), serialised as
SHARE_BYTES big-endian bytes; the holder's x is known from who holds it, so it is not serialised. Any `threshold`
shares give the secret; fewer are consistent with every secret (the polynomial's other coefficients are uniform).
"""

import secrets

PRIME = 2**264 - 275  # the largest prime below 2^264: every 32-byte secret is a field element, and a share's 33
# bytes are uniform but for 275 / 2^264 (with 2^521 - 1, 66 bytes whose first is 0 or 1: a leader capturing the
# bytes of the reveals would see a pattern, though no information)
SECRET_BYTES = 32
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 33


class MalformedShare(ValueError):
    """A share or a secret that is not what this module makes (wrong length, beyond the field)."""


def x_of(learner_id: int) -> int:
    """The point at which the learner's share is evaluated (learner ids start at 0; x = 0 is the secret)."""
    return learner_id + 1


def split(secret: bytes, threshold: int, holders: list[int], prime: int = PRIME) -> dict[int, bytes]:
    """Each holder's share (by learner id) of the secret: any `threshold` of them reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise MalformedShare(f"a secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if not 1 <= threshold <= len(holders) or len(set(holders)) != len(holders) or min(holders) < 0:
        raise ValueError(f"threshold {threshold} of distinct holders {holders} (ids from 0) is not a sharing")
    coefficients = [int.from_bytes(secret, "big") % prime] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    return {holder: _encode(_evaluate(coefficients, x_of(holder), prime), prime) for holder in holders}


def combine(shares: dict[int, bytes], prime: int = PRIME) -> bytes:
    """The secret whose polynomial passes through these shares (by holder id); MalformedShare if a share is not a
    field element or the result is not a 32-byte secret (then the shares were not of one secret)."""
    return Polynomial(shares, prime).secret()


class Polynomial:
    """The polynomial through some shares, in Lagrange's barycentric form: its weights cost one inverse a share,
    once; each value then costs a few multiplications a share."""

    def __init__(self, shares: dict[int, bytes], prime: int = PRIME) -> None:
        self.prime = prime
        self.points = {x_of(holder): decode(share, prime) for holder, share in shares.items()}
        self.weights = {}
        for x_i in self.points:
            denominator = 1
            for x_j in self.points:
                if x_j != x_i:
                    denominator = denominator * (x_i - x_j) % prime
            self.weights[x_i] = pow(denominator, -1, prime)

    def secret(self) -> bytes:
        """The value at 0; MalformedShare if it is not a 32-byte secret (the shares were not of one secret)."""
        secret = self.at(0)
        if secret >= 2 ** (8 * SECRET_BYTES):
            raise MalformedShare("the shares do not combine into a 32-byte secret")
        return secret.to_bytes(SECRET_BYTES, "big")

    def at(self, x: int) -> int:
        """The polynomial's value at x: the sum of y_i * w_i * prod over j != i of (x - x_j) (the products from
        running products from both ends: no inverse)."""
        if x in self.points:
            return self.points[x]
        xs = list(self.points)
        before = [1]
        for x_j in xs:
            before.append(before[-1] * (x - x_j) % self.prime)
        total, after = 0, 1
        for i in reversed(range(len(xs))):
            total += self.points[xs[i]] * self.weights[xs[i]] * before[i] * after
            after = after * (x - xs[i]) % self.prime
        return total % self.prime


def decode(share: bytes, prime: int = PRIME) -> int:
    """A share's field element, parsed strictly: exactly the fixed length, below the prime."""
    if len(share) != _share_bytes(prime):
        raise MalformedShare(f"a share is {_share_bytes(prime)} bytes, not {len(share)}")
    value = int.from_bytes(share, "big")
    if value >= prime:
        raise MalformedShare("a share beyond the field")
    return value


def _share_bytes(prime: int) -> int:
    return (prime.bit_length() + 7) // 8


def _encode(value: int, prime: int) -> bytes:
    return value.to_bytes(_share_bytes(prime), "big")


def _evaluate(coefficients: list[int], x: int, prime: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):  # Horner
        value = (value * x + coefficient) % prime
    return value
