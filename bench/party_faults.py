"""Page faults and CPU per online call of each `veil worker` party (material dealt ahead, untimed).

Run from /tmp: ``TREE=<tree> PYTHONPATH=<tree> python <tree>/bench/party_faults.py "mul 1e6" 10 /tmp/out``
with ``PERF=0`` (counts only; ``WARM=n`` calls first, not counted; ``RSS=1`` prints each call's
resident MB and faults). With ``PERF=1`` (the default) it also ``perf record``s both parties during
the calls only (perf's control fifo), to ``/tmp/out.net0.data`` / ``.net1.data``; ``PERFARGS``
replaces ``-F 2000`` (``"-e page-faults -c 1"`` to find who faults). ``STRACE=1`` traces party 1's
memory syscalls. ``GCPROBE=1`` asks the workers (started with ``bench/gc_probe_site`` first on ``PYTHONPATH``) to
report their cyclic garbage at calls 12 and 24 (``$VEIL_GC_PROBE_DIR/veil-gc.<pid>.txt``).
"""
import os, sys, time, subprocess, tempfile
tree = os.environ["TREE"]
sys.path.insert(0, tree + "/bench")
os.environ["OMP_NUM_THREADS"] = "1"
import torch
import veil as sy
from bench_crypten import network_workers
from bench_mpc import model_cases, op_cases
from veil.mpc.providers.worker_dealer import dealer_for
from pathlib import Path
name = sys.argv[1]; calls = int(sys.argv[2]); out = sys.argv[3]
torch.manual_seed(0); torch.set_num_threads(1)
hook = sy.TorchHook(torch)
def kids():
    pids = {}
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for p in (task / "children").read_text().split():
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            if b"--id" in cmd: pids[cmd[cmd.index(b"--id") + 1].decode()] = int(p)
    return pids
with network_workers(hook) as (parties, cp):
    me = hook.local_worker
    cases = {n: (lambda s=s, f=f: f(*s)) for n, s, f, _ in op_cases(parties, cp)}
    cases.update({n: fn for n, fn, _ in model_cases(parties, cp)})
    call = cases[name]; dealer = dealer_for(cp, me)
    with dealer.record() as plan:
        call()
    for p in parties: me.flush(p)
    pids = kids()
    procs = []
    perf = os.environ.get("PERF", "1") == "1"
    if os.environ.get("STRACE"):
        st = subprocess.Popen(["strace", "-f", "-e", "trace=mmap,munmap,madvise,brk,mremap,mprotect", "-o", out + ".strace", "-p", str(pids["net1"])])
        time.sleep(2)
    if perf:
        for wid in ("net0", "net1"):
            ctl = f"{out}.{wid}.ctl"; ack = f"{out}.{wid}.ack"
            for f in (ctl, ack):
                if os.path.exists(f): os.unlink(f)
                os.mkfifo(f)
            pr = subprocess.Popen(["perf", "record"] + os.environ.get("PERFARGS", "-F 2000").split() + ["-g", "-D", "-1", f"--control=fifo:{ctl},{ack}",
                                   "-o", f"{out}.{wid}.data", "-p", str(pids[wid])], stderr=subprocess.DEVNULL)
            procs.append((pr, open(ctl, "w"), open(ack)))
        time.sleep(1)
    def ctl(cmd):
        for _, c, a in procs:
            c.write(cmd + "\n"); c.flush(); a.readline()
    def cpu(pid):
        f = open(f"/proc/{pid}/stat").read().split(")")[1].split(); return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    def io(pid):  # TCP bytes received / sent over the process's open sockets (peer links included; ss's tcp_info)
        import re
        out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True).stdout.split("\n")
        r = x = 0
        for line, info in zip(out, out[1:]):
            if f"pid={pid}," in line:
                m1 = re.search(r"bytes_received:(\d+)", info); m2 = re.search(r"bytes_sent:(\d+)", info)
                r += int(m1.group(1)) if m1 else 0; x += int(m2.group(1)) if m2 else 0
        return r, x
    def flt(pid):
        f = open(f"/proc/{pid}/stat").read().split(")")[1].split(); return int(f[7])
    fl = {w: 0 for w in pids}; cp = {w: 0.0 for w in pids}; rw = {w: [0, 0] for w in pids}
    walls = []
    warm = int(os.environ.get("WARM", "0"))
    for i in range(calls + warm):
        if i == warm:
            fl = {w: 0 for w in pids}; cp = {w: 0.0 for w in pids}; rw = {w: [0, 0] for w in pids}; walls = []
        dealer.deal_ahead(plan); dealer.on_exhausted = "raise"
        a = {w: cpu(p) for w, p in pids.items()}; fa = {w: flt(p) for w, p in pids.items()}; ia = {w: io(p) for w, p in pids.items()}
        if perf: ctl("enable")
        t0 = time.perf_counter(); call()
        for p in parties: me.flush(p)
        walls.append(time.perf_counter() - t0)
        if perf: ctl("disable")
        b = {w: cpu(p) for w, p in pids.items()}
        for w in pids:
            fl[w] += flt(pids[w]) - fa[w]; cp[w] += b[w] - a[w]
            ib = io(pids[w]); rw[w][0] += ib[0] - ia[w][0]; rw[w][1] += ib[1] - ia[w][1]
        dealer.on_exhausted = "deal"
        if os.environ.get("GCPROBE") and i in (12, 24):
            import signal as _s
            for w in ("net0", "net1"): os.kill(pids[w], _s.SIGUSR2)
            time.sleep(3)
        if os.environ.get("RSS"):
            rs = {w: int(open(f"/proc/{p}/statm").read().split()[1]) * 4 // 1024 for w, p in pids.items()}
            print("rss MB", rs, "faults", {w: flt(p) - fa[w] for w, p in pids.items()}, flush=True)
    walls.sort()
    print("faults per call", {w: round(fl[w] / calls) for w in pids}, "cpu ms per call", {w: round(cp[w] / calls * 1e3, 1) for w in pids}, "sum", round(sum(cp.values()) / calls * 1e3, 1))
    print("MB received/sent per call", {w: (round(r / calls / 1e6, 2), round(x / calls / 1e6, 2)) for w, (r, x) in rw.items()})
    print(name, "best %.1f ms median %.1f ms" % (walls[0]*1e3, walls[len(walls)//2]*1e3))
    if os.environ.get("STRACE"):
        st.send_signal(2); st.wait()
    for pr, c, a in procs:
        pr.send_signal(2); pr.wait()
