"""Loaded into veil worker processes by PYTHONPATH (bench/party_faults.py GCPROBE=1): SIGUSR2 writes the
cyclic garbage found (tensors and MB, top types) and the resident MB to $VEIL_GC_PROBE_DIR/veil-gc.<pid>.txt."""
import gc, os, signal
def _h(*_):
    import torch
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4 // 1024
    gc.set_debug(gc.DEBUG_SAVEALL)
    r0 = rss()
    n = gc.collect(); gc.set_debug(0)
    ts = [o for o in gc.garbage if type(o) is torch.Tensor]
    mb = sum(t.untyped_storage().nbytes() for t in ts) / 2**20
    types = {}
    for o in gc.garbage: types[type(o).__name__] = types.get(type(o).__name__, 0) + 1
    top = sorted(types.items(), key=lambda kv: -kv[1])[:12]
    with open(os.path.join(os.environ.get("VEIL_GC_PROBE_DIR", "/tmp"), f"veil-gc.{os.getpid()}.txt"), "a") as f:
        f.write(f"collected {n} tensors {len(ts)} {mb:.1f} MB top {top}\n")
    gc.garbage.clear(); gc.collect()
    with open(os.path.join(os.environ.get("VEIL_GC_PROBE_DIR", "/tmp"), f"veil-gc.{os.getpid()}.txt"), "a") as f:
        f.write(f"rss {r0} -> {rss()} MB\n")
signal.signal(signal.SIGUSR2, _h)
