"""Rounds and bytes per party of the online phase (material dealt ahead), VirtualWorkers: deterministic.

Run: ``.venv/bin/python bench/bench_mpc_counts.py [workload ...]`` (default: all of bench_mpc's).

For each workload: one recorded call gives the plan, then twice the crypto provider deals it
ahead and the call runs with ``on_exhausted="raise"``; the second call's counts are printed
(bench_mpc's ``traffic``: opening rounds, orchestrator -> party and party -> orchestrator bytes
and requests per party; deferred party steps of the previous call ride on this call's first
request, as in any loop). Counts, unlike times, need no quiet machine.
"""

from __future__ import annotations

import sys

import torch

from bench_mpc import model_cases, op_cases, traffic, virtual_setup
from veil.mpc.providers.worker_dealer import dealer_for


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    hook, me, parties, cp = virtual_setup(2)
    cases = {n: (lambda s=s, f=f: f(*s)) for n, s, f, _ in op_cases(parties, cp)}
    cases.update({n: fn for n, fn, _ in model_cases(parties, cp)})
    dealer = dealer_for(cp, me)
    print("| workload | rounds | orchestrator -> party MB | party -> orchestrator MB | requests/party |")
    print("|---|---|---|---|---|")
    for name in names or list(cases):
        call = cases[name]
        with dealer.record() as plan:
            call()
        for _ in range(2):
            dealer.deal_ahead(plan)
            dealer.on_exhausted = "raise"
            try:
                _, t = traffic(call, me, None, len(parties))
            finally:
                dealer.on_exhausted = "deal"
        print(f"| {name} | {t['rounds']} | {t['to_party'] / 1e6:.2f} | {t['from_party'] / 1e6:.2f} | {t['msgs']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
