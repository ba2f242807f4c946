"""Function secret sharing (FSS): the PRG and distributed comparison functions
behind the 1-round private comparison of :mod:`veil.mpc.comparison`."""
