"""SMPC over network workers vs VirtualWorkers, online phase, interleaved; and one round broken down.

Run: ``.venv/bin/python bench/bench_net_rounds.py [--calls 10] [--breakdown] [workload ...]``

Timing: for each workload, one recorded call gives the dealing plan; then ``--calls`` times,
alternating, the crypto provider deals the plan ahead (untimed) and the online call runs over
VirtualWorkers, then the same over three ``veil worker`` processes (bench_crypten's set-up: two
parties and the crypto provider). Alternating calls meet the same load, so the net/virtual
ratio of the medians is steadier on a shared machine than two separate columns. Also printed:
CPU seconds per online call (this process plus both party processes, from /proc/*/task/*/schedstat),
which a loaded machine inflates far less than wall time.

``--breakdown``: the workers and this process record timestamps of every stage of every
request (``round_trace.py``; one monotonic clock for all processes), and the script prints
where an average network round's time goes: orchestrator serialize, client send + server
receive, worker hop to its handler, decode, prelude (the deferred steps), handle (monitor +
execute), encode, hop back, reply send, client read, orchestrator decode, and the
orchestrator's own work between rounds. For peer openings it prints each step's timeline per
party: handler start, prelude, step, publish, fetch sent and answered (and the publishing
peer's take and reply frames), sum, readers done, reply to the orchestrator.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import round_trace  # noqa: E402
from bench_mpc import dealing_plan, model_cases, op_cases, virtual_setup  # noqa: E402

import veil as sy  # noqa: E402
from veil.mpc.communicator import communicate  # noqa: E402
from veil.mpc.providers.worker_dealer import dealer_for  # noqa: E402

HERE = Path(__file__).resolve().parent


def _cpu_of(pid: int) -> float:
    """CPU seconds of every thread of process ``pid`` so far (schedstat: nanoseconds, not 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            pass
    return total / 1e9


@contextlib.contextmanager
def network(hook, trace_dir: str | None):
    from veil.workers.websocket_launcher import free_port

    def tok() -> str:
        return "t" + secrets.token_urlsafe(24)

    workers = [sy.NetworkWorker(f"127.0.0.1:{free_port()}", id=f"net{i}") for i in range(2)]
    cp_addr = sy.NetworkWorker(f"127.0.0.1:{free_port()}", id="net_crypto_provider")
    # as bench_crypten's network column: openings party to party unless VEIL_PEER_OPENINGS=0 (the star)
    peer = os.environ.get("VEIL_PEER_OPENINGS", "1") != "0"
    print(f"peer openings: {'on' if peer else 'off (the star)'}", flush=True)
    cluster = sy.Cluster(*workers, crypto_provider=cp_addr, auto_managed=True, owner_token=tok(),
                         client_token=tok(), peer_token=tok(), peer_openings=peer)
    saved = dict(os.environ)
    if trace_dir:
        site = Path(trace_dir) / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(f"import sys; sys.path.insert(0, {str(HERE)!r}); import round_trace\n")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
        os.environ["VEIL_ROUND_TRACE_WORKER"] = trace_dir
    try:
        cluster.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        *parties, cp = cluster.connect(hook, cluster.owner_token)
        dealer_for(cp, hook.local_worker).max_batch = 1
        pids = [cluster.process(w.id).pid for w in workers]
        yield parties, cp, pids
    finally:
        cluster.stop()


def online_call(fn, cp, me, plan, pids, windows: list | None = None, prof=None):
    """One call, its material dealt ahead (untimed): (wall s, CPU s of this process + the party processes)."""
    dealer = dealer_for(cp, me)
    saved = dealer.on_exhausted
    dealer.deal_ahead(plan)
    dealer.on_exhausted = "raise"
    try:
        c0 = [time.process_time()] + [_cpu_of(p) for p in pids]
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        fn()
        if prof is not None:
            prof.disable()
        t1 = time.perf_counter()
        c1 = [time.process_time()] + [_cpu_of(p) for p in pids]
    finally:
        dealer.on_exhausted = saved
    if windows is not None:
        windows.append((t0, t1))
    return t1 - t0, sum(c1) - sum(c0), [b - a for a, b in zip(c0, c1)]


def cases(parties, cp) -> dict:
    out = {n: (lambda s=s, f=f: f(*s)) for n, s, f, _ in op_cases(parties, cp)}
    out.update({n: fn for n, fn, _ in model_cases(parties, cp)})
    return out


def breakdown(records_orch: list[dict], trace_dir: str, windows: list, rounds: int) -> None:
    """Prints the average network request of the calls inside ``windows``, stage by stage (us)."""
    import json

    worker = []
    for f in Path(trace_dir).glob("worker-*.json"):
        worker += [dict(r, pid=f.name) for r in json.loads(f.read_text()) if "t_recv" in r]

    def inside(t):
        return any(a <= t <= b for a, b in windows)

    full = ("t_wire0", "t_ser0", "t_ser1", "t_dec0", "t_dec1", "t_done")  # a request read without decoding lacks some
    reqs = [r for r in records_orch if r.get("kind") == "req" and inside(r["t_call"]) and all(k in r for k in full)]
    rnds = [r for r in records_orch if r.get("kind") == "round" and inside(r["t0"])]
    stages: dict[str, list[float]] = {}

    def add(k, v):
        stages.setdefault(k, []).append(v * 1e6)

    matched = 0
    for r in reqs:
        # the worker request whose receive falls inside this request's transport window
        w = [x for x in worker if r["t_wire0"] <= x["t_recv"] <= r["t_wire1"]
             and x.get("t_send1", 0) <= r["t_wire1"] + 1e-3]
        w = [x for x in w if x.get("n_in") == r["n_out"]]
        add("orch: send_msg -> serialize start (locks, prelude take)", r["t_ser0"] - r["t_call"])
        add("orch: serialize", r["t_ser1"] - r["t_ser0"])
        add("orch: transport total (send, wait, read)", r["t_wire1"] - r["t_wire0"])
        add("orch: decode reply", r["t_dec1"] - r["t_dec0"])
        add("orch: after decode -> send_msg returns", r["t_done"] - r["t_dec1"])
        if len(w) != 1 or not all(k in w[0] for k in ("t_send0", "t_send1")) \
                or ("t_thread_done" if "t_thread" in w[0] else "t_inline_done") not in w[0]:
            continue  # (records of requests served while a peer fetch was served are incomplete)
        x = w[0]
        matched += 1
        start = x.get("t_thread", x.get("t_inline_try"))
        inline = "t_thread" not in x
        end = x["t_thread_done"] if not inline else x["t_inline_done"]
        add("  client send -> worker has the message", x["t_recv"] - r["t_wire0"])
        add("  worker: receive -> handler starts" + (" (inline)" if inline else " (thread hop)"), start - x["t_recv"])
        add("  worker: decode", x.get("t_dec", 0))
        add("  worker: prelude (deferred steps)", x.get("t_prelude", 0))
        add("  worker: handle (monitor + execute)", x.get("t_handle", 0))
        add("  worker: encode", x.get("t_enc", 0))
        add("  worker: rest of handler (lock, inline check)", (end - start) - sum(
            x.get(k, 0) for k in ("t_dec", "t_prelude", "t_handle", "t_enc")))
        add("  worker: handler end -> send starts (hop back)", x["t_send0"] - end)
        add("  worker: send", x["t_send1"] - x["t_send0"])
        add("  worker sent -> client has the reply", r["t_wire1"] - x["t_send1"])
    per_round = len(reqs) / max(1, rounds)
    print(f"\n{len(reqs)} requests ({per_round:.1f} per round, {matched} matched to worker records), "
          f"{len(rnds)} one_round calls; microseconds, mean per request (median):")
    for k, v in stages.items():
        print(f"| {k} | {statistics.mean(v):8.1f} | {statistics.median(v):8.1f} |")
    if rnds:
        span = sum(b - a for a, b in windows)
        in_rounds = sum(r["t1"] - r["t0"] for r in rnds)
        print(f"| one_round wall, per round | {statistics.mean([(r['t1'] - r['t0']) * 1e6 for r in rnds]):8.1f} | "
              f"{statistics.median([(r['t1'] - r['t0']) * 1e6 for r in rnds]):8.1f} |")
        print(f"| whole calls: {span * 1e3:.1f} ms, of which inside one_round {in_rounds * 1e3:.1f} ms, "
              f"outside (orchestrator work between rounds) {(span - in_rounds) * 1e3:.1f} ms | | |")
        hand = []
        for rd in rnds:  # the first request runs on the calling thread, the others on pool threads
            inside = sorted((r for r in reqs if rd["t0"] <= r["t_call"] <= rd["t1"]), key=lambda r: r["t_call"])
            if len(inside) >= 2:
                hand.append((inside[-1]["t_call"] - inside[0]["t_call"]) * 1e6)
        if hand:
            print(f"| pool hand-off: first request -> last request of a round starts | {statistics.mean(hand):8.1f} "
                  f"| {statistics.median(hand):8.1f} |")


#: a party's marks in a peer round (round_trace's peer path), in the order they happen
PEER_MARKS = ("t_thread", "t_prelude0", "t_prelude1", "t_start", "t_run", "t_posted", "t_slot_record0", "t_slot_record",
              "t_slot", "t_step0", "t_step1",
              "t_on_record0", "t_on_record",
              "t_published", "t_fetch0", "t_combined", "t_taken", "t_end", "t_done")


def _first_after(records: list, kind: str, pid: str, t: float, until: float = float("inf")) -> dict | None:
    later = [r for r in records if r["kind"] == kind and r["pid"] == pid and t <= r["t0"] <= until]
    return min(later, key=lambda r: r["t0"]) if later else None


def _party_marks(w: dict, worker: list) -> dict:
    """One party's times in one peer round: its own marks, its fetch's reply, its reply to the
    orchestrator (loop resumed, small send), and the publishing peer's side of its fetch (take
    returned, large reply frames written: ``_send_fragmented`` only, not replies of one frame)."""
    out = {k: w[k] for k in PEER_MARKS if k in w}
    if "prelude_cpu" in w:
        out["prelude_cpu"] = w["prelude_cpu"]
    if w["fetches"]:
        out["fetch reply"] = w["fetches"][-1][1]
    if "t_done" in w:
        loops = [t for t in worker if t["kind"] == "peer_loop" and t["pid"] == w["pid"]
                 and t["t0"] <= w["t_thread"] and t["t1"] >= w["t_done"]]
        back = [t["t1"] for t in loops]
        if back:
            out["loop hands the request on"] = max(t["t0"] for t in loops)
            for kind, label in (("loop_data", "request bytes reach the loop"), ("lane_event", "lane looks at it")):
                seen = [t for t in worker if t["kind"] == kind and t["pid"] == w["pid"]
                        and t["t0"] <= out["loop hands the request on"]]
                if seen:
                    last = max(seen, key=lambda t: t["t0"])
                    out[f"{label} from"], out[f"{label} to"] = last["t0"], last["t1"]
            out["loop has the reply"] = min(back)
            send = _first_after(worker, "peer_small_send", w["pid"], min(back))
            if send:
                out["reply send"], out["reply sent"] = send["t0"], send["t1"]
    if w["fetches"]:  # the other party's loop serving this party's fetch (its last one)
        f0, f1 = w["fetches"][-1]
        for kind, label in (("peer_serve", "peer serves the fetch"), ("peer_take_on_loop", "peer takes"),
                            ("peer_place", "peer places"), ("peer_slot_send", "peer sends its slot")):
            seen = [t for t in worker if t["kind"] == kind and t["pid"] != w["pid"] and f0 <= t["t1"] <= f1]
            if seen:
                out[f"{label} from"], out[f"{label} to"] = seen[-1]["t0"], seen[-1]["t1"]
    served = [t for t in worker if t["kind"] == "peer_take" and t["round"] == w["round"] and t["got"]
              and t["pid"] != w["pid"]]
    if served:
        out["peer's take returned"] = served[-1]["t1"]
        send = _first_after(worker, "peer_send", served[-1]["pid"], served[-1]["t1"], out.get("fetch reply", 0))
        if send:
            out["peer's reply send"], out["peer's reply sent"] = send["t0"], send["t1"]
    return out


#: a fetching party's waits in a peer round, from the later of its fetch and its peer's publish
GAP_LABELS = ("peer published -> its fetch answered", "-> the peer's take returned", "-> the peer sent its slot",
              "fetch answered -> shares summed")


def _add_gaps(out: list, marks: list) -> None:
    """Each party's waits on the other's outputs (two-party rounds with a fetch): ``GAP_LABELS``, in ms."""
    if len(marks) != 2:
        return
    for a, b in ((marks[0], marks[1]), (marks[1], marks[0])):
        if "fetch reply" in a and "t_published" in b and "t_combined" in a:
            start = max(b["t_published"], a.get("t_fetch0", 0.0))
            out.append(tuple((t - start) * 1e3 for t in (a["fetch reply"], a.get("peer takes to", start),
                                                        a.get("peer sends its slot to", start)))
                       + ((a["t_combined"] - a["fetch reply"]) * 1e3,))


def peer_breakdown(records_orch: list[dict], trace_dir: str, windows: list) -> None:
    """Prints the average peer round's timeline per step and party (ms after the orchestrator's round began)."""
    import json

    worker = []
    for f in Path(trace_dir).glob("worker-*.json"):
        worker += [dict(r, pid=f.name) for r in json.loads(f.read_text()) if r.get("kind", "").startswith(("peer", "loop_data", "lane_event"))]
    rnds = [r for r in records_orch if r.get("kind") == "round" and r["what"].startswith("peer opening")
            and any(a <= r["t0"] <= b for a, b in windows)]
    if not rnds:
        return
    rows: dict[str, dict[str, list[float]]] = {}

    def add(row: str, marks: dict, t0: float) -> None:
        for key, t in marks.items():
            # (a duration, not a time: ``*_cpu`` keys are thread CPU seconds)
            rows.setdefault(row, {}).setdefault(key.removeprefix("t_"), []).append(
                t * 1e3 if key.endswith("_cpu") else (t - t0) * 1e3)

    attempts, gaps = [], {}
    for rd in rnds:
        sent = sorted((r for r in records_orch if r.get("kind") == "req" and rd["t0"] <= r["t_call"] <= rd["t1"]),
                      key=lambda r: r["t_call"])
        for k, r in enumerate(sent):
            add(f"{rd['what']}: orchestrator request {k + 1}",
                {key: r[key] for key in ("t_call", "t_ser1", "t_wire0", "t_wire1", "t_done") if key in r}, rd["t0"])
        # a posted round (runtime.POST_PEER_ROUNDS) ends before its parties start: theirs is each party's first
        # step of the round's name that starts after it began and before the next round of that name does
        name = rd["what"].split("'")[1]
        until = min([r["t0"] for r in rnds if r["t0"] > rd["t0"] and r["what"] == rd["what"]]
                    + [b for a, b in windows if a <= rd["t0"] <= b])
        firsts: dict = {}
        for w in sorted((w for w in worker if w["kind"] == "peer" and w["name"] == name
                         and rd["t0"] <= w["t_start"] <= until), key=lambda w: w["t_start"]):
            firsts.setdefault(w.get("worker", w["pid"]), w)
        recs = sorted(firsts.values(), key=lambda w: w["t_start"])
        marks = [_party_marks(w, worker) for w in recs]
        _add_gaps(gaps.setdefault(name, []), marks)
        for w, party in zip(recs, marks):
            add(f"{w['name']}: party {w.get('worker', '?')}", party, rd["t0"])
            attempts.append(len(w["fetches"]))
        add(f"{rd['what']}: orchestrator", {"round ends": rd["t1"]}, rd["t0"])
    print(f"\npeer rounds: {len(rnds)}; ms after the orchestrator's round began (mean):")
    for who, row in rows.items():
        print(f"| {who} | " + ", ".join(f"{k} {statistics.mean(v):.2f}" for k, v in row.items()) + " |")
    print(f"| fetch requests per party and round (mean) | {statistics.mean(attempts):.2f} |")
    print("\nper party and round, ms (median, p25-p75; means above hide a skewed spread):")
    for name, rows_ in gaps.items():
        for k, label in enumerate(GAP_LABELS):
            v = sorted(r[k] for r in rows_)
            if v:
                print(f"| {name}: {label} | {v[len(v) // 2]:.2f} | {v[len(v) // 4]:.2f}-{v[3 * len(v) // 4]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--profile", type=Path, help="cProfile this process's network calls into this file")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    print(f"load average {os.getloadavg()}")
    torch.manual_seed(0)
    hook, me, vparties, vcp = virtual_setup(2)
    trace_dir = tempfile.mkdtemp(prefix="veil-round-trace-") if args.breakdown else None
    records = round_trace.install_orchestrator() if args.breakdown else None
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    with network(hook, trace_dir) as (nparties, ncp, pids):
        vcases, ncases = cases(vparties, vcp), cases(nparties, ncp)
        names = args.names or list(vcases)
        print("| workload | rounds | virtual online s (median, min) | net online s (median, min) | "
              "net/virtual (medians) | CPU s per call virtual / net |")
        print("|---|---|---|---|---|---|")
        windows = {}
        for name in names:
            with communicate() as comm:
                vcases[name]()
            vplan, nplan = dealing_plan(vcases[name], vcp, me), dealing_plan(ncases[name], ncp, me)
            v, n, windows[name] = [], [], []
            for _ in range(args.calls):
                v.append(online_call(vcases[name], vcp, me, vplan, []))
                n.append(online_call(ncases[name], ncp, me, nplan, pids, windows[name], prof))
            vm, nm = statistics.median(x[0] for x in v), statistics.median(x[0] for x in n)
            print(f"| {name} | {comm.rounds} | {vm:.4f}, {min(x[0] for x in v):.4f} | {nm:.4f}, "
                  f"{min(x[0] for x in n):.4f} | {nm / vm:.2f} | {statistics.median(c for _, c, _ in v):.3f} / "
                  f"{statistics.median(c for _, c, _ in n):.3f} (this process, parties: "
                  f"{', '.join(f'{statistics.median(x[2][k] for x in n):.3f}' for k in range(3))}) |", flush=True)
    print(f"load average {os.getloadavg()}")
    if prof is not None:
        prof.dump_stats(str(args.profile))
    if args.breakdown:
        for name in names:
            print(f"\n### {name}")
            # rounds of the network calls only (virtual calls make no network requests)
            breakdown(records, trace_dir, windows[name], 1)
            peer_breakdown(records, trace_dir, windows[name])


if __name__ == "__main__":
    main()
