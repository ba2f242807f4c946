"""Loaded by ``veil worker`` processes that bench/bench_mpc_stages.py starts (PYTHONPATH): stage timers."""
import os

if os.environ.get("VEIL_STAGES_DIR"):
    import stage_probe

    stage_probe.install(server=True)
