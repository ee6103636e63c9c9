"""python -m dqc.federated simulate|deploy QC-FLAGS | worker: quality control across Flower nodes.

simulate: one simulated node per center of -fn_train, in Flower's Simulation Engine; each
          node holds its center's -fn_test rows and verifies every update on them.
deploy:   a real SuperLink and one SuperNode per center on 127.0.0.1, with TLS and node
          authentication, keys made in a temporary folder; every process stopped at the end.
Both write the single-machine script's outputs into --out (plus NAME_network.json).
worker:   a center's long-running trainer next to its SuperNode (start the SuperNode with
          --node-config 'worker-socket="SOCKET"'); it holds the images and the compiled model.
app-dir:  the folder of the installed Flower app, for `flwr run APP_DIR CONNECTION`.
"""

from dqc.cli import Parser, add_qc_flags, run_main
from dqc.criteria import own_word_criteria
from dqc.federated.runconfig import NETWORK_DEFAULTS, ON_FAULTY_NODE, VERIFY_AT


def parse_args(argv=None):
    p = Parser(prog="python -m dqc.federated", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, what in (("simulate", "Flower Simulation Engine (Ray), one node per center"),
                       ("deploy", "SuperLink + SuperNodes on loopback with TLS and node auth")):
        q = sub.add_parser(name, help=what, description=what)
        add_qc_flags(q)
        q.add_argument("--verify-at", choices=VERIFY_AT, default=NETWORK_DEFAULTS["verify-at"],
                       help="centers: each node scores its own -fn_test rows (by Study) and "
                       "sends its counts, the server adds them up and holds no image (the "
                       "paper's design); server: the server holds -fn_test and its images")
        q.add_argument("--node-timeout-s", type=float, default=NETWORK_DEFAULTS["node-timeout-s"],
                       help="a node that does not answer a step or a verification within this "
                       "many seconds stops the run (one line naming it; continue with --resume)")
        q.add_argument("--on-faulty-node", choices=ON_FAULTY_NODE,
                       default=NETWORK_DEFAULTS["on-faulty-node"],
                       help="a node whose reply fails the server's check (docs/threat-model.md): "
                       "stop the run (one line naming it; mend it, continue with --resume), or "
                       "exclude its center's images from then on (the summary names it)")
        q.add_argument("--no-own-word", action="store_true", help="accept no update on its own "
                       "center's word alone: refuse criteria that judge a batch by the loss its "
                       f"center reports ({', '.join(own_word_criteria())}) and verification "
                       "at fewer than two centers (docs/threat-model.md)")
        if name == "deploy":
            q.add_argument("--work", default=None, help="folder for keys, certificates, node "
                           "CSVs and process logs (default: a temporary folder, removed after)")
            q.add_argument("--wait-nodes-s", type=float, default=NETWORK_DEFAULTS["wait-nodes-s"],
                           help="how long the server waits for every center's node to connect "
                           "(then one line saying how many are missing)")
            q.add_argument("--ask-truth", action="store_true", help="ask the nodes for their "
                           "Harmful column (ground truth) to score detection; without it no "
                           "node sends it and the summary has no detection rates")
            q.add_argument("--port", type=int, default=0, help="the SuperLink's loopback port "
                           "(default: a free one; nodes always take free ports)")
    sub.add_parser("app-dir", help="print the folder of the Flower app (for `flwr run`)",
                   description="Print the folder of the installed Flower app: "
                   "`flwr run \"$(python -m dqc.federated app-dir)\" CONNECTION`.")
    w = sub.add_parser("worker", help="a center's long-running node worker",
                       description="Serve one center's training steps over a local socket.")
    w.add_argument("--csv", required=True, help="the center's CSV (one Study; its images)")
    w.add_argument("--val-csv", default=None, help="the center's validation CSV (its own "
                   "validation images, which it scores to verify each update)")
    w.add_argument("--socket", required=True, help="Unix socket path to listen on "
                   "(a SOCKET.key secret is written beside it)")
    w.add_argument("--report", default=None, metavar="DIR", help="write this center's own "
                   "page, DIR/NAME_report_CENTER.html, after every cycle: the QC decisions the "
                   "server sends about its images, with their mosaics (the pixels stay here)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "simulate":
        from dqc.federated.simulate import simulate
        simulate(args)
    elif args.command == "deploy":
        from dqc.federated.loopback import deploy
        deploy(args)
    elif args.command == "app-dir":
        from dqc.federated.loopback import APP_DIR
        print(APP_DIR)
    else:
        from dqc.federated.node import serve_worker
        serve_worker(args.csv, args.socket, ready=lambda: print("ready", flush=True),
                     val_csv=args.val_csv, report=args.report)


if __name__ == "__main__":
    run_main(main)
