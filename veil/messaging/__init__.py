"""Typed messages, their wire format, and the operations a worker agrees to run."""
