"""python -m dqc.federated simulate|deploy QC-FLAGS | worker: quality control across Flower nodes.

simulate: one simulated node per center of -fn_train, in Flower's Simulation Engine.
deploy:   a real SuperLink and one SuperNode per center on 127.0.0.1, with TLS and node
          authentication, keys made in a temporary folder; every process stopped at the end.
Both write the single-machine script's outputs into --out (plus NAME_network.json).
worker:   a center's long-running trainer next to its SuperNode (start the SuperNode with
          --node-config 'worker-socket="SOCKET"'); it holds the images and the compiled model.
"""

from dqc.cli import quiet_backend

quiet_backend()

from dqc.cli import Parser, add_qc_flags, run_main  # noqa: E402


def parse_args(argv=None):
    p = Parser(prog="python -m dqc.federated", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, what in (("simulate", "Flower Simulation Engine (Ray), one node per center"),
                       ("deploy", "SuperLink + SuperNodes on loopback with TLS and node auth")):
        q = sub.add_parser(name, help=what, description=what)
        add_qc_flags(q)
        if name == "deploy":
            q.add_argument("--work", default=None, help="folder for keys, certificates, node "
                           "CSVs and process logs (default: a temporary folder, removed after)")
            q.add_argument("--port", type=int, default=0, help="the SuperLink's loopback port "
                           "(default: a free one; nodes always take free ports)")
    w = sub.add_parser("worker", help="a center's long-running node worker",
                       description="Serve one center's training steps over a local socket.")
    w.add_argument("--csv", required=True, help="the center's CSV (one Study; its images)")
    w.add_argument("--socket", required=True, help="Unix socket path to listen on "
                   "(a SOCKET.key secret is written beside it)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "simulate":
        from dqc.federated.simulate import simulate
        simulate(args)
    elif args.command == "deploy":
        from dqc.federated.loopback import deploy
        deploy(args)
    else:
        from dqc.federated.node import serve_worker
        serve_worker(args.csv, args.socket, ready=lambda: print("ready", flush=True))


if __name__ == "__main__":
    run_main(main)
