"""Secure multi-party computation primitives over the ring Z/2^64.

One module per job: ``encoding`` (fixed point), ``ring`` (sampling, ring
conv), ``sharing`` (splitting), ``opening`` (the only reconstruction path),
``beaver`` (SPDZ products), ``truncation`` (division by public integers),
``functions`` (approximations), ``providers`` (correlated randomness).
"""
