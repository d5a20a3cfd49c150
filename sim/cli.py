"""`tandem sim predict|calibrate|compare|testbed` (also `python -m sim.cli ...`).

    predict    cost of one step per path: FLOPs, peak memory, exact bytes, round trips, time per step and epoch
    calibrate  measure this machine (GEMM and decoder-block throughput, memory, codec, gRPC loopback round trip)
    compare    what-if table over paths and links, the N at which the cloud saturates, PNG plots
    testbed    namespaces + veth + tbf links: a throughput self-test, or run your cloud and edge commands through it
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from sim.costmodel import PATHS, Workload


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _add_workload(p: argparse.ArgumentParser, model: str, edge: str, cloud: str, links: str) -> None:
    w = Workload()
    p.add_argument("--model", default=model, help=f"shipped config (smollm2-135m, llama-7b, llama-70b) or a "
                                                  f"config.json / folder (default {model})")
    p.add_argument("--paths", type=_csv, default=PATHS, help=f"comma-separated subset of {','.join(PATHS)}")
    p.add_argument("--batch", type=int, default=w.batch)
    p.add_argument("--seq", type=int, default=w.seq, help="padded tokens per sequence")
    p.add_argument("--task", choices=["classify", "lm"], default=w.task)
    p.add_argument("--k", type=int, default=w.k)
    p.add_argument("--m", type=int, default=w.m)
    p.add_argument("--rank", type=int, default=w.rank)
    p.add_argument("--targets", type=_csv, default=w.targets)
    p.add_argument("--wire-up", default="auto", help="fp32|bf16|fp16|int8; auto = bf16 on 16-bit edges, else fp32")
    p.add_argument("--wire-down", default="auto")
    p.add_argument("--active-fraction", type=float, default=w.active_fraction, help="DLoRA Kill & Revive")
    p.add_argument("--emulator-fraction", type=float, default=w.emulator_fraction, help="offsite-tuning")
    p.add_argument("--local-steps", type=int, default=w.local_steps, help="federated: steps per round")
    p.add_argument("--epoch-examples", type=int, default=w.epoch_examples)
    p.add_argument("--edge", default=edge, help="device profile: here (calibrated), here-matmul, h100-sxm, "
                                                "a100-80gb, rtx-4090, apple-m2, raspberry-pi-5")
    p.add_argument("--cloud", default=cloud, help="device profile for the cloud")
    p.add_argument("--links", type=_csv, default=_csv(links),
                   help="comma-separated: 100mbit, 1gbit, lte, wifi-100mbit, fiber-1gbit, testbed-50mbit, ...")
    p.add_argument("--rtt-ms", type=float, default=None, help="override every link's round trip")


def _setup(args):
    from sim.profiles import device_profile, link_profile
    from sim.shape import load_shape
    shape = load_shape(args.model)
    edge, cloud = device_profile(args.edge), device_profile(args.cloud)
    auto = "bf16" if edge.dtype_bytes == 2 else "fp32"
    w = Workload(batch=args.batch, seq=args.seq, task=args.task, k=args.k, m=args.m, rank=args.rank,
                 targets=args.targets, wire_up=auto if args.wire_up == "auto" else args.wire_up,
                 wire_down=auto if args.wire_down == "auto" else args.wire_down,
                 active_fraction=args.active_fraction, emulator_fraction=args.emulator_fraction,
                 local_steps=args.local_steps, epoch_examples=args.epoch_examples)
    rtt = None if args.rtt_ms is None else args.rtt_ms / 1e3
    links = [link_profile(s, rtt) for s in args.links]
    return shape, w, edge, cloud, links


def cmd_predict(args) -> None:
    from sim.compare import assumptions, format_table
    from sim.costmodel import predict_all
    shape, w, edge, cloud, links = _setup(args)
    rows = [(link, c) for link in links for c in predict_all(shape, w, edge, cloud, link, args.paths)]
    if args.json:
        print(json.dumps([{
            "path": c.path, "link": link.name, "edge_flops": c.edge.flops, "cloud_flops": c.cloud.flops,
            "edge_peak_bytes": c.edge.peak_bytes, "cloud_peak_bytes": c.cloud.peak_bytes,
            "bytes_up": c.bytes_up, "bytes_down": c.bytes_down, "messages": c.messages,
            "round_trips": c.round_trips, "edge_s": c.edge.seconds, "cloud_s": c.cloud.seconds,
            "transfer_s": c.transfer_s, "codec_s": c.codec_s, "latency_s": c.latency_s, "step_s": c.step_s,
            "epoch_s": c.epoch_s, "one_time_bytes": c.one_time_bytes, "edge_fits": c.edge_fits,
            "cloud_fits": c.cloud_fits, "notes": list(c.notes)} for link, c in rows], indent=1))
        return
    print(assumptions(shape, w, edge, cloud, links))
    print()
    print(format_table(rows))
    print()
    for link, c in rows:
        if link is links[0]:
            print(f"{c.path:<11} edge {c.edge.flops / 1e12:.3g} TFLOP, cloud {c.cloud.flops / 1e12:.3g} TFLOP, "
                  f"round trips {c.round_trips:.3g}" + (f", one-time {c.one_time_bytes / 1e9:.2f} GB"
                                                        if c.one_time_bytes else "") + ". " + " ".join(c.notes))


def cmd_calibrate(args) -> None:
    from sim.calibrate import calibrate, save_calibration
    cal = calibrate(args.model, args.batch, args.seq, quick=args.quick)
    path = save_calibration(cal, args.out)
    print(cal.summary())
    print(f"saved to {path}")


def cmd_compare(args) -> None:
    from sim.compare import compare
    shape, w, edge, cloud, links = _setup(args)
    result = compare(shape, w, edge, cloud, links, args.paths, None if args.no_plots else args.out_dir,
                     tuple(int(n) for n in _csv(args.ns)))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


def cmd_testbed(args) -> None:
    from sim.profiles import LinkProfile
    from sim.testbed import Testbed, TestbedConfig, permitted
    ok, why = permitted()
    if not ok:
        raise SystemExit(f"testbed not available: {why}")
    cfg = TestbedConfig(edges=args.edges, rate_mbit=args.rate_mbit, prefix=args.prefix)
    with Testbed(cfg) as tb:
        print(tb.qdiscs())
        if args.selftest or not args.edge_cmd:
            eff = LinkProfile("x", 1, 1, 0, "").efficiency
            nbytes = int(args.rate_mbit * 1e6 / 8 * args.seconds)
            for d in ("up", "down"):
                bps = tb.measure_throughput(nbytes, d)
                print(f"{d:>4}: {bps / 1e6:.2f} Mbit/s of TCP payload; set {args.rate_mbit:g} Mbit/s x "
                      f"{eff:.4f} = {args.rate_mbit * eff:.2f} ({bps / (args.rate_mbit * 1e6 * eff) - 1:+.1%})")
        if args.edge_cmd:
            fill = lambda cmd, i: shlex.split(cmd.format(cloud=tb.cloud_ip(i), edge=i, edge_ip=tb.edge_ip(i)))  # noqa
            server = tb.popen(tb.cloud_ns, fill(args.cloud_cmd, 0)) if args.cloud_cmd else None
            if server is not None and args.port:
                tb.wait_port(0, args.port, proc=server)
            edges = [tb.popen(tb.edge_ns[i], fill(args.edge_cmd, i)) for i in range(args.edges)]
            codes = [p.wait() for p in edges]
            print(f"edge commands exited with {codes}")
            if any(codes):
                sys.exit(1)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sim` and its subcommands on the `tandem` command line."""
    sim = subparsers.add_parser("sim", help="cost simulator: predict, calibrate, compare, testbed",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = sim.add_subparsers(dest="sim_command", required=True)

    p = sub.add_parser("predict", help="cost of one step per path")
    _add_workload(p, "smollm2-135m", "here", "here", "testbed-50mbit")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_predict)

    c = sub.add_parser("calibrate", help="measure this machine for the `here` profile")
    c.add_argument("--model", default="smollm2-135m", help="shape of the GEMM and decoder-block benchmarks")
    c.add_argument("--batch", type=int, default=4)
    c.add_argument("--seq", type=int, default=64)
    c.add_argument("--out", default=None, help="where to save (default $TANDEM_HOME/sim/calibration.json)")
    c.add_argument("--quick", action="store_true", help="shorter benchmarks (noisier)")
    c.set_defaults(func=cmd_calibrate)

    m = sub.add_parser("compare", help="what-if table, saturation N and plots")
    _add_workload(m, "llama-7b", "rtx-4090", "h100-sxm", "100mbit,1gbit")
    m.set_defaults(batch=8, seq=256)
    m.add_argument("--out-dir", default="runs/sim-compare", help="where the PNG plots go")
    m.add_argument("--no-plots", action="store_true")
    m.add_argument("--ns", default="1,2,4,8,16,32,64,128", help="edge counts for the utilisation plot")
    m.add_argument("--json-out", default=None)
    m.set_defaults(func=cmd_compare)

    t = sub.add_parser("testbed", help="namespaces + veth + tbf: self-test, or run cloud/edge commands through it")
    t.add_argument("--edges", type=int, default=1)
    t.add_argument("--rate-mbit", type=float, default=50.0)
    t.add_argument("--prefix", default="tandem", help="namespace names: PREFIX-cloud, PREFIX-edge0, ...")
    t.add_argument("--selftest", action="store_true", help="measure TCP throughput both ways (default without "
                                                           "--edge-cmd)")
    t.add_argument("--seconds", type=float, default=2.0, help="self-test: about this long per direction")
    t.add_argument("--cloud-cmd", default=None, help="run in the cloud namespace, e.g. 'tandem cloud serve --host "
                                                     "0.0.0.0 --port 50051 --tokens tokens.json'")
    t.add_argument("--port", type=int, default=None, help="wait until the cloud command listens on this port")
    t.add_argument("--edge-cmd", default=None, help="run in every edge namespace; {cloud} = the cloud's address "
                                                    "on that link, {edge} = edge index, {edge_ip}")
    t.set_defaults(func=cmd_testbed)
    return sim


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sim", *(sys.argv[1:] if argv is None else argv)])
    args.func(args)


if __name__ == "__main__":
    main()
