"""Single-bit tampering of SPDZ2k material, shared by the MAC escape and MAC comparison tests."""


def delta(v: int) -> tuple:
    """``2^v`` (0 <= v < 128) as (limb index 0/1, int64 delta)."""
    limb, bit = divmod(v, 64)
    return limb, -(2**63) if bit == 63 else 1 << bit


def tamper_material(dealer, method: str, field: int, v: int) -> None:
    """Adds ``2^v`` to party b's share of one 128-bit field (lo, hi) of every item ``method`` deals."""
    real = getattr(dealer, method)
    limb, d = delta(v)

    def bad(*args, **kwargs):
        items = real(*args, **kwargs)
        fields = list(items["b"])
        fields[2 * field + limb] = fields[2 * field + limb] + d
        items["b"] = tuple(fields)
        return items

    setattr(dealer, method, bad)
