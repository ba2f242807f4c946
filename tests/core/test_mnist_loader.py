"""The bundled MNIST subset parses to the rows of its CSV file (load_mnist_5k reads it with numpy's parser)."""

from __future__ import annotations

import torch

from veil.datasets import load_mnist_5k
from veil.datasets.loaders import _read_text


def test_rows_match_the_csv_lines_and_the_split_is_balanced():
    lines = _read_text("mnist_5k.csv.gz").splitlines()
    raw = load_mnist_5k(scale=False)
    assert raw["x_train"].shape == (4000, 1, 28, 28) and raw["x_test"].shape == (1000, 1, 28, 28)
    assert raw["x_train"].dtype == torch.float32 and raw["y_train"].dtype == torch.int64
    assert torch.equal(torch.bincount(raw["y_train"]), torch.full((10,), 400))
    assert torch.equal(torch.bincount(raw["y_test"]), torch.full((10,), 100))

    def row(line):  # a plain parse of one line: 784 pixels, then the label
        values = [int(v) for v in line.split(",")]
        return torch.tensor(values[:784], dtype=torch.float32).reshape(1, 28, 28), values[784]

    first, last = row(lines[0]), row(lines[-1])  # the file is sorted by digit: a train row, then a test row
    assert torch.equal(raw["x_train"][0], first[0]) and raw["y_train"][0].item() == first[1]
    assert torch.equal(raw["x_test"][-1], last[0]) and raw["y_test"][-1].item() == last[1]
    assert raw["x_train"].max().item() == 255

    scaled = load_mnist_5k()
    assert torch.allclose(scaled["x_train"], raw["x_train"] / 255.0) and scaled["x_train"].max().item() == 1.0
