"""Instructions per stage of the small round trip, in one process (no sockets), under callgrind.

bench_rtt_callgrind.py counts whole processes (client, worker: transport and asyncio included); this
driver splits veil's own work: an in-process client whose transport hands each request to an
in-process server's inline lane (``e2e``), the client alone (the reply is the worker's OkReply bytes),
the server's ``try_inline`` alone (recorded skeleton uses, each freeing the previous result), and the
pieces of both (decode, expand, ``_run_command``, discard, reply, the worker's turn, ``monitor.store``,
torch's add, shape inference, pointer creation and release, the skeleton frame, ``send_skeleton``).
Each stage runs N times between ``callgrind_control -i on`` and a dump named after it:

    cd /tmp && PYTHONPATH=<tree> N=2000 valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=OUT/st.%p <python> <tree>/bench/bench_rtt_stages_callgrind.py
    for f in OUT/st.*.*; do echo "$(grep -m1 '^desc: Trigger' $f) $(grep totals $f)"; done   # / N

``NO_VALGRIND=1`` runs the stages without callgrind (a check of the driver). Counts include ~0.6 K
of loop and toggling overhead per iteration (the ``empty`` stage).
"""
import gc
import os
import subprocess

import torch
import veil as sy
from veil.messaging import messages as m
from veil.messaging import skeleton_frames
from veil.workers import skeletons as sk, handlers as H
from veil.workers.websocket_auth import authenticate
from veil.workers.websocket_server import WebsocketServerWorker
from veil.workers.websocket_client import WebsocketClientWorker
from veil.tensors import shape_inference, remote_ops
from veil.tensors.pointer import PointerTensor

N = int(os.environ.get("N", "2000"))
VG = not os.environ.get("NO_VALGRIND")
torch.set_num_threads(1)
hook = sy.TorchHook(torch)
tokens = sy.TokenTable(); tokens.add("tok-tok-tok-tok", "scientist")
server = WebsocketServerWorker(hook, id="alice", port=0, tokens=tokens)
session = authenticate(tokens, ["tok-tok-tok-tok"]); server.sessions[session.id] = session
import veil.workers.inline_lane as il; il.INLINE_BUDGET_SECONDS = 1e9

client = WebsocketClientWorker(hook, id="alice", port=1, token="tok-tok-tok-tok", lazy=True)
client.pipelining = False
client._conn = object()
client._skeletons = sk.ClientSkeletons(client._conn)
frames = []
def via_server(data):
    data = bytes(data) if not isinstance(data, bytes) else data
    frames.append(data)
    return server.try_inline(data, session)[0]
client._recv_msg = via_server
p = torch.randn(8, 13).send(client)
for _ in range(300):
    p + p
ok = server._reply_bytes(m.OkReply())
results = []
def stage(name, fn, n=N):
    gc.collect(); gc.disable()
    if VG:
        subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], stdout=subprocess.DEVNULL)
    for _ in range(n):
        fn()
    if VG:
        subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], stdout=subprocess.DEVNULL)
        subprocess.run(["callgrind_control", "-d", name, str(os.getpid())], stdout=subprocess.DEVNULL)
    gc.enable()
    results.append(name)

# 1. the whole in-process round trip (client + server veil work, no transport)
stage("e2e", lambda: p + p)
# 2. client alone: the reply is the OkReply bytes
client._recv_msg = lambda data: ok
stage("client", lambda: p + p)
# 3. server alone: replay recorded uses with fresh result ids, each deleting the previous result
principal = server.principal_of(session)
use = skeleton_frames.decode_skeleton_use(frames[-1])[0]
k, ids = use.skeleton, use.ids
prev = [use.return_ids[0]]
from veil.ids import new_id
def mk():
    rid = new_id()
    data = skeleton_frames.serialize_skeleton("me", [prev[0]], k, ids, [rid], None)
    prev[0] = rid
    return data
datas = [mk() for _ in range(N + 5)]
# each use frees the previous use's result (the first: the last e2e result)
it = iter(datas)
stage("server_try_inline", lambda: server.try_inline(next(it), session))
datas2 = [skeleton_frames.serialize_skeleton("me", [], k, ids, [new_id()], None) for _ in range(N)]
it = iter(datas2)
stage("server_decode", lambda: skeleton_frames.decode_skeleton_use(next(it)))
decs = [skeleton_frames.decode_skeleton_use(d)[0] for d in datas2]
it = iter(decs)
stage("server_expand", lambda: sk.expand(session.skeletons, next(it)))
cmds = [sk.expand(session.skeletons, d) for d in decs]
it = iter(cmds)
stage("server_run_command", lambda: H._run_command(server, principal, session.id, *next(it)))
rids = [c[3][0] for c in cmds]
it = iter(rids)
stage("server_discard", lambda: server.monitor.discard(principal, next(it)))
stage("server_reply_bytes", lambda: server._reply_bytes(H._OK))
stage("server_turn", lambda: (server._turn.try_acquire(), server._turn.release()))
x = torch.randn(8, 13)
stage("torch_add", lambda: x + x)
stage("torch_Tensor_add", lambda: torch.Tensor.add(x, x))
# client sub-stages
args = (p, p)
op = remote_ops._OPS_BY_FUNC.get(torch.Tensor.add)
stage("client_collect", lambda: shape_inference.collect(args, {}))
tensors, key = shape_inference.collect(args, {})
stage("client_infer", lambda: shape_inference.infer(op, args, {}, tensors, key))
tmpl = shape_inference.infer(op, args, {}, tensors, key)
spec = tmpl.specs[0]
stage("client_new_pointer", lambda: remote_ops._new_pointer(PointerTensor, client, 5, client, spec[1], spec[2], spec[3], True, (), "", True))
stage("client_serialize_skeleton", lambda: skeleton_frames.serialize_skeleton(client.id, [123456789012], 0, [ids[0]], [98765432109876], None))
stage("client_read_ok", lambda: bytes(ok) in client._ok_replies)
stage("new_id", new_id)
stage("empty", lambda: None)
c0 = cmds[0]
stage("server_resolve_list", lambda: server.monitor.resolve_list(principal, c0[1], H.Purpose.COMPUTE, {}))
y = x + x
rids3 = [new_id() for _ in range(N)]
it = iter(rids3)
stage("server_monitor_store", lambda: server.monitor.store(principal, next(it), y, sources=[], op_name="Tensor.add"))
ents = [server.monitor._find(principal, ids[0])]
it = iter([new_id() for _ in range(N)])
stage("server_monitor_store_src", lambda: server.monitor.store(principal, next(it), y, sources=ents, op_name="Tensor.add"))
stage("server_tracking", lambda: H._tracking(server))
keep = []
stage("client_new_pointer_kept", lambda: keep.append(remote_ops._new_pointer(PointerTensor, client, 5, client, spec[1], spec[2], spec[3], True, (), "", True)))
stage("client_pointer_del", lambda: keep.pop())
stage("wrapper_subclass", lambda: torch.Tensor._make_wrapper_subclass(PointerTensor, (8, 13), dtype=torch.float32, requires_grad=False, device="cpu"))
stage("client_send_skeleton", lambda: client.send_skeleton(client, tmpl, [ids[0], ids[0]], [new_id()], None))
print("stages:", results, "frames", len(frames), "last frame", frames[-1][:80], "op", tmpl)
