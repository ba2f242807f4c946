"""Small real datasets bundled with veil, loaded as torch tensors.

Provenance of each file is in ``data/PROVENANCE.md``.
"""

from veil.datasets.loaders import load_boston, load_mnist_5k, load_pima, train_test_split

__all__ = ["load_boston", "load_mnist_5k", "load_pima", "train_test_split"]
