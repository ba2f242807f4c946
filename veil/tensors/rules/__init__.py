"""Op rule tables: which aten ops are local for which veil tensor type.

* :mod:`veil.tensors.rules.common`: ops linear in every tensor argument and
  free of public data, hence local for both types ("structural" ops).
* :mod:`veil.tensors.rules.fixed_precision`: ``FIXED_PRECISION_RULES``.
* :mod:`veil.tensors.rules.additive`: ``ADDITIVE_RULES``.
"""
