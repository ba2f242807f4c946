"""Constants and helpers shared by the network tests (imported by name: not a conftest)."""

from __future__ import annotations

import torch

import veil as sy

TOKEN = "net-scientist-token"
OTHER = "net-other-scientist-token"
HOSPITAL = "net-hospital-token"
ADMIN = "net-admin-token"
PEER = "net-peer-token"
BOSTON = str(__import__("pathlib").Path(sy.__file__).parent / "datasets" / "data" / "boston_housing.csv")


def base_args(extra: list[str] = ()) -> list[str]:
    return ["--token", TOKEN, "--user", f"other={OTHER}", "--user", f"hospital={HOSPITAL}",
            "--admin-token", ADMIN, *extra]


def tensor_eq(a, b) -> bool:
    return torch.equal(a, b)
