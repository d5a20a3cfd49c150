"""`tandem federate`: command line of the federation simulation (sim/federation/driver.py).

Every federation setting of the ServerApp (FederationConfig, the same keys as `flwr run . --run-config`) is an
option here, e.g. `--num-server-rounds 5 --local-steps 10 --cloud-lora edge`; the simulation adds the devices, the
partitioner, the strategies to compare and the CPUs Ray may use.

    tandem federate --devices 8 --num-server-rounds 5 --partitioner dirichlet --alpha 0.5 --strategies fedavg,ffa
    tandem federate --partitions-only --out runs/fed      # then: flwr run . --run-config 'partition-dir="..."'
    tandem federate --render runs/fed                     # the tables and plot of a finished run

A federation that cannot run exits non-zero with one line naming the cause and the fix: settings that cannot run
together (--peft with a --cloud-lora mode it has no form for, or with the ffa strategy; another method's options),
before anything starts; Ray not up within --backend-timeout, devices that do not answer within --device-timeout, a
device that cannot fit in --cpus.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from cloud.federation.server_app import FederationConfig
from edge.flags import add_flags, build
from sim.federation.driver import PARTITIONERS, FederateOptions

# set by the driver itself, not by the user
_DRIVER_SET = {"strategy", "cloud_address", "cloud_token", "partition_dir", "out_dir", "label", "min_nodes"}
_ALIASES = {"num_server_rounds": ["--rounds"], "cut_bottom": ["--k"], "cut_top": ["--m"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sim = p.add_argument_group("simulation")
    d = FederateOptions()
    sim.add_argument("--devices", type=int, default=d.devices, help="simulated edge devices (default %(default)s)")
    sim.add_argument("--partitioner", choices=PARTITIONERS, default=d.partitioner)
    sim.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration (default %(default)s)")
    sim.add_argument("--labels-per-device", type=int, default=d.labels_per_device, help="pathological partitioner")
    sim.add_argument("--strategies", default=",".join(d.strategies),
                     help="comma-separated, run one after another on the same partitions and cloud: fedavg, ffa "
                          "(FFA-LoRA: --peft lora only)")
    sim.add_argument("--cpus", type=int, default=d.cpus, help="CPUs Ray may use (default %(default)s)")
    sim.add_argument("--cpus-per-device", type=float, default=d.cpus_per_device,
                     help="CPUs each device reserves: at most cpus/cpus-per-device train at once")
    sim.add_argument("--backend-timeout", type=float, default=d.backend_timeout,
                     help="seconds the simulation backend (Ray) may take to start (default %(default)s)")
    sim.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    sim.add_argument("--verbose", action="store_true", help="show the devices' logs")
    sim.add_argument("--partitions-only", action="store_true", help="write the partition files and stop")
    sim.add_argument("--render", metavar="DIR", help="print the report of a finished run in DIR and redraw its plot")
    sim.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    add_flags(p.add_argument_group("federation (the ServerApp's run config)"), FederationConfig, skip=_DRIVER_SET,
              aliases=_ALIASES)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("federate", help="federated LoRA rounds with Flower across simulated edge devices",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def options_of(args: argparse.Namespace) -> tuple[FederateOptions, FederationConfig]:
    opts = FederateOptions(devices=args.devices, partitioner=args.partitioner, alpha=args.alpha,
                           labels_per_device=args.labels_per_device,
                           strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
                           cpus=args.cpus, cpus_per_device=args.cpus_per_device, backend_timeout=args.backend_timeout,
                           out=args.out, quiet=not args.verbose)
    fed = build(FederationConfig, {k: v for k, v in vars(args).items() if k not in _DRIVER_SET})
    return opts, fed


def run(args: argparse.Namespace) -> int:
    from sim.federation import driver as F
    from sim.federation.report import load_summary, render
    if args.render:
        summary = load_summary(args.render)
        print(json.dumps(summary["comparison"], indent=1) if args.json else render(summary, args.render))
        return 0
    opts, fed = options_of(args)
    for name in opts.strategies:  # settings that cannot run: one line now, before partitions, cloud and Ray
        replace(fed, strategy=name).check()
    if args.partitions_only:
        from pathlib import Path

        import tasks as T
        parts = F.partition(T.load_split(fed.task, "train"), opts.devices, opts.partitioner, alpha=opts.alpha,
                            labels_per_device=opts.labels_per_device, min_partition_size=opts.min_partition_size,
                            seed=opts.partition_seed)
        folder = Path(opts.out).expanduser().resolve() / "partitions"
        F.write_partitions(parts, folder)
        print(f"wrote {len(parts)} partitions to {folder}\n"
              f"run them with: flwr run . --run-config 'partition-dir=\"{folder}\"'")
        return 0
    try:
        summary = F.federate(opts, fed)
    except F.FederationFailed as ex:  # SystemExit: `tandem` itself ignores a command's return value
        raise SystemExit(f"tandem federate: {ex}") from None
    print(json.dumps(summary["comparison"], indent=1) if args.json else render(summary, opts.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["federate", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
