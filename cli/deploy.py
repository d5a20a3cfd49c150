"""`tandem deploy`: the secrets and the per-edge services of the docker-compose topology, for N edges.

Compose cannot tell a scaled replica its index, so instead of `--scale edge=N` this writes, under --out:

    secrets/cloud/             ca.pem, server.pem/.key, health.pem/.key (the health check's client), tokens.json
                               (every edge's token: the cloud checks them all)
    secrets/edge-<i>/          ca.pem, edge-<i>.pem/.key, token: this edge's own secrets, nobody else's
    secrets/superlink/         ca.pem, server.pem/.key (federation profile: Flower's TLS)
    secrets/cloud-federation/  ca.pem, server.pem/.key, tokens.json (every device's token): TLS to the devices
    secrets/supernode-<i>/     ca.pem, token: this device's own
    secrets/ca.key             the CA's key: mounted nowhere (keep it offline)
    docker-compose.edges.yml   one service per edge (shard i of N) and per SuperNode (partition i of N)

    docker-compose -f docker-compose.yml -f deploy/docker-compose.edges.yml up
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

EDGES_FILE = "docker-compose.edges.yml"
SERVER_NAMES = "cloud,superlink,cloud-federation,localhost,127.0.0.1"  # the compose services' names, and loopback for the tests


def edge_names(n: int) -> list[str]:
    return [f"edge-{i}" for i in range(n)]


def node_names(n: int) -> list[str]:
    return [f"supernode-{i}" for i in range(n)]


def _edge_service(name: str, i: int, n: int, secrets: str) -> str:
    return f"""  {name}:
    <<: *tandem
    depends_on:
      cloud:
        condition: service_healthy
    environment:
      TANDEM_DATA: /data
      TANDEM_TLS: ${{TANDEM_TLS:-on}}
    volumes:
      - ${{TANDEM_DATA_DIR:-../shared/data}}:/data:ro
      - ${{TANDEM_RUNS_DIR:-./runs}}/{name}:/runs
      - {secrets}/{name}:/run/secrets/tandem:ro
    command: >-
      edge train --cloud cloud:${{TANDEM_PORT:-50051}} --tls-dir /run/secrets/tandem
      --token-file /run/secrets/tandem/token --name {name} --shard {i} --num-shards {n}
      --model ${{TANDEM_MODEL:-smollm2}} --task ${{TANDEM_TASK:-sst2}} --cloud-lora ${{TANDEM_CLOUD_LORA:-edge}}
      --steps ${{TANDEM_STEPS:-80}} --batch-size ${{TANDEM_BATCH:-8}} --eval-examples ${{TANDEM_EVAL_EXAMPLES:-500}}
      --out-dir /runs/run --no-progress --metrics-out /runs/metrics.json
"""


def _node_service(name: str, i: int, n: int, secrets: str) -> str:
    return f"""  {name}:
    <<: *tandem
    profiles: [federation]
    depends_on: [superlink, cloud-federation]
    entrypoint: ["sh", "/app/deploy/supernode.sh"]
    environment:
      TANDEM_DATA: /data
      FLWR_HOME: /var/lib/flwr
      FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION: "1"
      SUPERLINK: superlink:${{TANDEM_SUPERLINK_PORT:-9091}}
      CLOUD: cloud-federation:${{TANDEM_FEDERATION_PORT:-50052}}
      PARTITION: "{i}"
      PARTITIONS: "{n}"
    volumes:
      - ${{TANDEM_DATA_DIR:-../shared/data}}:/data:ro
      - {secrets}/{name}:/run/secrets/tandem:ro
    tmpfs: [/tmp, /var/lib/flwr]
    command: ["--host", "0.0.0.0", "--port", "9094"]
"""


def compose_override(edges: int, nodes: int, secrets: str) -> str:
    head = (f"# Written by `tandem deploy --edges {edges}`: do not edit, run it again (--overwrite).\n"
            f"# docker-compose -f docker-compose.yml -f deploy/{EDGES_FILE} up\n"
            'version: "3.8"\n\n'
            "x-tandem: &tandem\n  image: tandem:latest\n  user: \"${TANDEM_UID:-1000}:${TANDEM_GID:-1000}\"\n"
            "  read_only: true\n  tmpfs: [/tmp]\n\nservices:\n")
    body = "".join(_edge_service(e, i, edges, secrets) for i, e in enumerate(edge_names(edges)))
    body += "".join(_node_service(s, i, nodes, secrets) for i, s in enumerate(node_names(nodes)))
    return head + body


def write_deployment(out: str | Path, edges: int, nodes: int | None = None, *, overwrite: bool = False,
                     server_names: str = SERVER_NAMES, project_dir: str | Path = ".") -> dict[str, Path]:
    """Write the secrets and docker-compose.edges.yml for `edges` edges and `nodes` SuperNodes (default: as many).
    Refuses (ValueError) N < 1, and without `overwrite` any file it would replace. Returns {service: its secrets folder}."""
    from privacy.security.certs import make_certs
    from privacy.security.files import write_atomic
    from privacy.security.tokens import make_tokens
    nodes = edges if nodes is None else nodes
    if edges < 1 or nodes < 1:
        raise ValueError(f"tandem deploy needs at least one edge and one SuperNode (got --edges {edges}, "
                         f"--supernodes {nodes})")
    out = Path(out)
    targets = [out / "secrets", out / EDGES_FILE]
    present = [str(p) for p in targets if p.exists()]
    if present and not overwrite:
        raise ValueError(f"{', '.join(present)} already exist: pass --overwrite to replace them (every "
                              "edge then needs its new secrets)")
    edge, node = edge_names(edges), node_names(nodes)
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_certs(Path(tmp) / "certs", server_names=tuple(n for n in server_names.split(",") if n),
                           clients=(*edge, "health"))
        edge_tok = make_tokens(Path(tmp) / "edges.json", edge)  # client -> token
        node_tok = make_tokens(Path(tmp) / "nodes.json", node)
        if out.joinpath("secrets").exists():
            shutil.rmtree(out / "secrets")
        sec = out / "secrets"
        dirs: dict[str, Path] = {}

        def folder(name: str, files: dict[str, Path]) -> Path:
            d = sec / name
            d.mkdir(parents=True, mode=0o700)
            for dst, src in files.items():
                shutil.copyfile(src, d / dst)
                (d / dst).chmod(0o600 if dst.endswith((".key", "token", ".json")) else 0o644)
            dirs[name] = d
            return d

        sec.mkdir(parents=True, mode=0o700)
        ca, srv = {"ca.pem": certs.ca_cert}, {"server.pem": certs.server_cert, "server.key": certs.server_key}
        h_pem, h_key = certs.clients["health"]
        folder("cloud", {**ca, **srv, "health.pem": h_pem, "health.key": h_key, "tokens.json": Path(tmp) / "edges.json"})
        folder("superlink", {**ca, **srv})
        folder("cloud-federation", {**ca, **srv, "tokens.json": Path(tmp) / "nodes.json"})
        for name in edge:
            pem, key = certs.clients[name]
            d = folder(name, {**ca, f"{name}.pem": pem, f"{name}.key": key})
            write_atomic(d / "token", edge_tok[name].encode(), 0o600)
        for name in node:
            d = folder(name, ca)
            write_atomic(d / "token", node_tok[name].encode(), 0o600)
        shutil.copyfile(certs.ca_key, sec / "ca.key")
        (sec / "ca.key").chmod(0o600)
    import os
    rel = os.path.relpath(sec.resolve(), Path(project_dir).resolve())
    secrets = "${TANDEM_SECRETS:-./" + rel + "}"
    write_atomic(out / EDGES_FILE, compose_override(edges, nodes, secrets).encode(), 0o644)
    return dirs


def cmd_deploy(args):
    dirs = write_deployment(args.out, args.edges, args.supernodes, overwrite=args.overwrite,
                            server_names=args.server_names, project_dir=args.project_dir)
    f = Path(args.out) / EDGES_FILE
    print(f"wrote {len(dirs)} secret folders under {Path(args.out) / 'secrets'} (each service mounts only its own) "
          f"and {f}\n  edges:      docker-compose -f docker-compose.yml -f {f} up\n"
          f"  federation: docker-compose -f docker-compose.yml -f {f} --profile federation up superlink "
          f"cloud-federation {' '.join(node_names(args.supernodes or args.edges))}")


def add_parser(sub, help="docker-compose for N edges: per-edge secrets (token, certificate) and one service each"):
    d = sub.add_parser("deploy", help=help)
    d.add_argument("--edges", type=int, required=True, help="how many edges: edge-0 .. edge-(N-1), shard i of N")
    d.add_argument("--supernodes", type=int, default=None, help="SuperNodes of the federation profile "
                   "(default: --edges)")
    d.add_argument("--out", default="deploy", help="folder for secrets/ and docker-compose.edges.yml (default: deploy)")
    d.add_argument("--project-dir", default=".", help="where docker-compose.yml is: the override's paths are "
                   "relative to it (default: .)")
    d.add_argument("--server-names", default=SERVER_NAMES, help="names the cloud's and the SuperLink's certificate "
                   f"is valid for (default: {SERVER_NAMES})")
    d.add_argument("--overwrite", action="store_true", help="replace secrets/ and the override if they exist")
    d.set_defaults(func=cmd_deploy)
