"""``sy.frameworks.torch.fl.utils`` (PySyft 0.2 path)."""

from veil.compat.fl_utils import accuracy, add_model, extract_batches_per_worker, federated_avg, scale_model

__all__ = ["accuracy", "add_model", "extract_batches_per_worker", "federated_avg", "scale_model"]
