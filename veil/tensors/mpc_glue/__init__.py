"""Glue between the SMPC protocols (``veil.mpc``) and tensors, modules and workers.

``veil.mpc`` is protocol code over party handles; what ties it to torch
tensors, ``nn.Module``/optimizers and veil workers lives here:

* ``runtime``: the worker party runtime (pointers, concurrent rounds, the
  opening handler), registered with :mod:`veil.mpc.runtime` on import;
* ``remote_sharing``: placing shares on workers, ``crypto_provider=worker``;
* ``maximum``: comparisons, ReLU, max/argmax, max-pooling of shared tensors;
* ``tensor_api``, ``module``, ``optim``: the verbs the hook attaches.
"""

from veil.tensors.mpc_glue import runtime  # noqa: F401  (registers the worker runtime and the opening handler)
