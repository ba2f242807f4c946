"""``veil serve``: serve a saved model on a cluster without writing Python.

Examples::

    # start three local workers itself, write the file clients connect with, serve 100 queries
    veil serve mnist.pt --auto 4000,4001,4002 --cluster-file cluster.json --num-requests 100

    # workers already running: parties started with --token OWNER_TOKEN --token-user model-owner
    # --client client=CLIENT_TOKEN (submit/fetch only), the crypto provider with --token and --peer
    # entries for the parties, which accept it with --accept-peer
    VEIL_OWNER_TOKEN=... veil serve model.keras --worker h1:4000 --worker h2:4000 --worker h3:4000 \\
        --client-token ... --cluster-file cluster.json

The model file is the owner's own: ``.pt`` from ``veil.serving.save_model``
(veil's msgpack model format: nothing is unpickled) or ``.keras`` / ``.h5``
(Keras safe mode). The cluster file holds addresses and the *client* token.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from veil.cli_args import seconds, whole_number
from veil.exceptions import CommandLineError


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="saved model: .pt (veil.serving.save_model), .keras or .h5")
    p.add_argument("--auto", metavar="PORTS", default=None,
                   help="start local workers on these comma-separated ports (last one: crypto provider)")
    p.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                   help="an already running cluster worker (repeatable; the last one deals crypto material)")
    p.add_argument("--owner-token", default=os.environ.get("VEIL_OWNER_TOKEN"),
                   help="the workers' owner token (default: $VEIL_OWNER_TOKEN; generated with --auto)")
    p.add_argument("--client-token", default=os.environ.get("VEIL_CLIENT_TOKEN"),
                   help="the clients' token (default: $VEIL_CLIENT_TOKEN; generated with --auto)")
    p.add_argument("--peer-token", default=os.environ.get("VEIL_PEER_TOKEN"), help="worker-to-worker token (--auto)")
    p.add_argument("--cluster-file", default="cluster.json", help="where to write the clients' cluster file")
    p.add_argument("--num-requests", type=whole_number(1), default=None, help="stop after this many queries (default: never)")
    p.add_argument("--max-batch", type=whole_number(1), default=16, help="most queries computed together")
    p.add_argument("--max-batch-rows", type=whole_number(1), default=None, metavar="ROWS",
                   help="most input rows computed together, so also per query: the parties refuse larger "
                        "queries (clients split them) (default: 64)")
    p.add_argument("--fetch-timeout", type=seconds, default=30.0,
                   help="seconds to wait, once done, for clients to fetch their last outputs")


def run(args: argparse.Namespace) -> int:
    """Loads the model, shares it on the cluster, writes the cluster file and serves."""
    import torch

    from veil.hook import TorchHook
    from veil.serving.cluster import Cluster, NetworkWorker
    from veil.serving.model_file import load_model
    from veil.serving.service import ModelService

    if bool(args.auto) == bool(args.worker):
        raise CommandLineError("give either --auto PORTS or --worker HOST:PORT (three or more)")
    model = load_model(args.model)
    if args.auto:
        workers = [NetworkWorker(f"127.0.0.1:{p.strip()}") for p in args.auto.split(",")]
    else:
        workers = [NetworkWorker(a) for a in args.worker]
        if not (args.owner_token and args.client_token):
            raise CommandLineError("running workers need --owner-token and --client-token")
    cluster = Cluster(*workers, auto_managed=bool(args.auto), owner_token=args.owner_token,
                      client_token=args.client_token, peer_token=args.peer_token)
    hook = TorchHook(torch)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        cluster.start()
        rows = {} if args.max_batch_rows is None else {"max_rows": args.max_batch_rows}
        service = ModelService(model, cluster, model.veil_input_shape, max_batch=args.max_batch, hook=hook, **rows)
        cluster.save(args.cluster_file)
        # The ready line comes last (scripts wait for it); it names no token.
        print(f"veil serve: model {os.path.basename(args.model)} input {list(service.input_shape)} "
              f"output {list(service.output_shape)} on {len(cluster.parties)} parties; "
              f"cluster file {args.cluster_file}; serving", flush=True)
        service.serve(args.num_requests, background=True)
        while service._thread.is_alive() and not stopping.wait(0.2):
            pass
        # stop() waits (bounded) while the last clients fetch their outputs; not on SIGTERM
        service.stop(timeout=0.0 if stopping.is_set() else args.fetch_timeout)
        if service.error is not None:
            print(f"veil serve: stopped: {service.error}", flush=True)
            return 1
        print(f"veil serve: stopped after {service.served} queries", flush=True)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.stop()
