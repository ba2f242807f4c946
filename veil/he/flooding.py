"""Noise flooding: what a CKKS decryption, or a ciphertext computed on the owner's data, gets before it leaves.

A CKKS decryption is the plaintext plus the ciphertext's noise, and that noise depends on the secret key and on
how the ciphertext was made: released as is, a decryption of a ciphertext someone else made hands out the key
(Li & Micciancio, EUROCRYPT 2021), and a result computed with the owner's plaintext carries it in its noise
(circuit privacy). Gaussian noise of standard deviation ``sigma`` added to a value whose own noise is at most
``t`` moves its distribution by a KL divergence of at most ``t**2 / (2 * sigma**2)`` (the flooding argument of
Li, Micciancio, Schultz & Sorrell, CRYPTO 2022). Statistical flooding (``sigma = 2**40 t``) would leave no
precision at veil's parameters; the sigmas below are what the results' accuracy allows (FedAvg of a ReLU
network: ~1e-6 after two rounds, where a larger flood flips activations). That hides honest noise, not a
crafted ciphertext's: whoever decrypts must also refuse values no honest ciphertext reaches
(``veil.federated.he_agg``).
"""

from __future__ import annotations

import torch

from veil.dp.core import secure_normal

#: noise of a fresh CKKS encryption, or a sum of a few, at scale 2**40 and 8192 slots: ~1e-9 (2**-30) per value,
#: ~2e-8 (2**-25.5) the largest of 4096; it scales as 1 / scale. sigma = 2**19 / scale (2**-21 at 2**40): a KL
#: divergence of at most 2**-10 for the largest, 2**-19 for the typical
FRESH_LOG2 = 19
#: one plaintext product (a dot, a mask) leaves ~1e-7 (2**-23) at scale 2**40: sigma = 2**24 / scale (2**-16,
#: ~1.5e-5 at 2**40), a divergence of at most 2**-15
PRODUCT_LOG2 = 24


def sigma(scale: float, product: bool = False) -> float:
    """The flooding standard deviation for a ciphertext at CKKS ``scale`` (``product``: after a plaintext
    multiplication)."""
    return 2.0 ** (PRODUCT_LOG2 if product else FRESH_LOG2) / float(scale)


def gaussian(count: int, std: float) -> torch.Tensor:
    """``count`` float64 Gaussian samples of standard deviation ``std`` from the DP core's CSPRNG sampler
    (seeding Python's, NumPy's or torch's generators predicts nothing)."""
    return secure_normal(count) * std
