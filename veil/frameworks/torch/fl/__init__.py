"""``sy.frameworks.torch.fl``: federated datasets and loader, and ``utils``."""

from veil.federated import BaseDataset, FederatedDataLoader, FederatedDataset  # noqa: F401
from veil.frameworks.torch.fl import utils  # noqa: F401
