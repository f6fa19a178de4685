"""The cryptography of secure aggregation: X25519 key agreement, HKDF-SHA256 keys, AES-GCM shares, AES-CTR masks.

Every derived key names its round and purpose (and, for a pair, both learners) in HKDF's `info`, so that no key
serves two purposes or two rounds. Masks are numpy vectors of unsigned words (uint32, or narrower for a narrow ring:
secagg.Ring views the keystream's bytes at its widths): their arithmetic wraps modulo 2^bits by itself.
"""

import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # X25519 keys (public and private), AES-256 keys, self-mask seeds
NONCE_BYTES = 12
TAG_BYTES = 16


class Undecryptable(ValueError):
    """A ciphertext that does not decrypt for its (round, sender, recipient): altered, replayed or misaddressed."""


def new_private_key() -> bytes:
    """A fresh raw X25519 private key (32 bytes)."""
    return X25519PrivateKey.generate().private_bytes_raw()


def public_of(private: bytes) -> bytes:
    """The raw public key of a raw private key (also checks a reconstructed key against the one advertised)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes) -> bytes:
    """The X25519 secret shared with the owner of peer_public; ValueError if that is no key (wrong length, or a
    low-order point that agrees on no secret)."""
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))


def derive(secret: bytes, round_index: int, purpose: str, *learners: int) -> bytes:
    """A 32-byte key for one purpose of one round (and pair of learners, ordered so both derive the same)."""
    names = ",".join(str(learner) for learner in sorted(learners))
    info = f"federated secagg v1|round {round_index}|{purpose}|{names}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def _associated_data(round_index: int, sender: int, recipient: int) -> bytes:
    return struct.pack("<qii", round_index, sender, recipient)


def encrypt(key: bytes, round_index: int, sender: int, recipient: int, plaintext: bytes) -> bytes:
    """nonce || AES-GCM(plaintext), bound to (round, sender, recipient) as associated data."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _associated_data(round_index, sender, recipient))


def decrypt(key: bytes, round_index: int, sender: int, recipient: int, ciphertext: bytes) -> bytes:
    """The plaintext of encrypt's output; Undecryptable if it was made for another key, round, sender or recipient."""
    try:
        return AESGCM(key).decrypt(
            ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], _associated_data(round_index, sender, recipient)
        )
    except (InvalidTag, ValueError) as error:
        raise Undecryptable(f"a share from {sender} to {recipient} does not decrypt for round {round_index}") from error


def ciphertext_bytes(plaintext_bytes: int) -> int:
    return NONCE_BYTES + plaintext_bytes + TAG_BYTES


def keystream(key: bytes, nbytes: int) -> np.ndarray:
    """The PRG: `nbytes` bytes (uint8) of AES-256-CTR's keystream under key, from a zero counter (each key is
    used for one mask only, so a fixed counter never repeats a keystream)."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(nbytes)), dtype=np.uint8)
