"""``sy.frameworks.torch.nn``: PySyft 0.2's recurrent layers (veil.compat.rnn)."""

from veil.compat.rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNBase, RNNCell, RNNCellBase  # noqa: F401
