"""`tandem sim predict|calibrate|compare|testbed` (also `python -m sim.cli ...`).

    predict    cost of one step per path: FLOPs, peak memory, exact bytes, round trips, time per step and epoch
    calibrate  measure this machine (GEMM and decoder-block throughput, memory, codec, gRPC loopback round trip)
               for the `here` profiles; documented devices (--edge rtx-4090 --cloud h100-sxm) need none
    compare    what-if table over paths and links, the N at which the cloud saturates, PNG plots
    testbed    namespaces + veth + tbf links: a throughput self-test, or run your cloud and edge commands through it
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from sim.costmodel import PATHS, Workload, path_problem, paths_for
from sim.wire import INPUT_METHODS


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _subset(allowed: tuple[str, ...]):
    """An argparse type: a comma-separated subset of `allowed` (an unknown name is a usage error that lists them)."""
    def parse(text: str) -> tuple[str, ...]:
        items = _csv(text)
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or repr(text)}: use a comma-separated subset of "
                                             f"{','.join(allowed)}")
        return items
    return parse


def _add_workload(p: argparse.ArgumentParser, model: str, edge: str, cloud: str, links: str) -> None:
    from protocol.tensors import WIRE_DTYPES
    from sim.profiles import DEVICE_NAMES, LINKS
    from sim.shape import INPUT_GROUPS, shipped
    w = Workload()
    wires = ("auto", *WIRE_DTYPES)
    p.add_argument("--model", default=model, help=f"model shape: a shipped config ({', '.join(shipped())}) or a "
                                                  "config.json / a folder holding one (default: %(default)s)")
    p.add_argument("--paths", type=_subset(PATHS), default=None, metavar="PATH[,PATH...]",
                   help=f"training paths to cost, comma-separated, from {','.join(PATHS)} (default: every path "
                        "--peft has: prompt and ptuning have no dlora or carried, ia3 and --lora-dora no dlora, "
                        "prefix only carried of the remote paths)")
    _add_method_flags(p, w)
    p.add_argument("--batch", type=int, default=w.batch, help="sequences per training step (default: %(default)s)")
    p.add_argument("--seq", type=int, default=w.seq, help="padded tokens per sequence (default: %(default)s)")
    p.add_argument("--task", choices=["classify", "lm"], default=w.task,
                   help="classify: logits at one position per sequence; lm: at every position (default: %(default)s)")
    p.add_argument("--k", type=int, default=w.k, help="split/DLoRA: decoder blocks at the edge's bottom "
                                                      "(default: %(default)s)")
    p.add_argument("--m", type=int, default=w.m, help="split/DLoRA: decoder blocks at the edge's top "
                                                      "(default: %(default)s)")
    p.add_argument("--rank", type=int, default=w.rank, help="LoRA rank (default: %(default)s)")
    p.add_argument("--targets", type=_subset(tuple(INPUT_GROUPS)), default=w.targets, metavar="PROJ[,PROJ...]",
                   help=f"LoRA target projections, comma-separated, from {','.join(INPUT_GROUPS)} "
                        f"(default: {','.join(w.targets)})")
    p.add_argument("--wire-up", choices=wires, default="auto",
                   help="dtype of the hidden states sent edge -> cloud; auto = bf16 when the edge trains in 16-bit, "
                        "else fp32 (default: %(default)s)")
    p.add_argument("--wire-down", choices=wires, default="auto",
                   help="dtype of the gradients sent cloud -> edge; auto as for --wire-up (default: %(default)s)")
    p.add_argument("--active-fraction", type=float, default=w.active_fraction,
                   help="DLoRA Kill & Revive: share of cloud blocks whose LoRA runs, 0-1 (default: %(default)s)")
    p.add_argument("--emulator-fraction", type=float, default=w.emulator_fraction,
                   help="offsite-tuning: share of the middle blocks the emulator keeps, 0-1 (default: %(default)s)")
    p.add_argument("--local-steps", type=int, default=w.local_steps,
                   help="federated: local training steps per round (default: %(default)s)")
    p.add_argument("--epoch-examples", type=int, default=w.epoch_examples,
                   help="examples per epoch, for the time per epoch (default: %(default)s, SST-2's training set)")
    p.add_argument("--edge", choices=DEVICE_NAMES, default=edge,
                   help="the edge's device profile: here (= here-block) and here-matmul are this machine as measured "
                        "by `tandem sim calibrate` (decoder-block or bare GEMM rate); the others are documented "
                        "devices and need no calibration (default: %(default)s)")
    p.add_argument("--cloud", choices=DEVICE_NAMES, default=cloud,
                   help="the cloud's device profile, as for --edge (default: %(default)s)")
    p.add_argument("--links", type=_csv, default=_csv(links), metavar="LINK[,LINK...]",
                   help=f"edge-cloud links, comma-separated: a named link ({', '.join(LINKS)}), a symmetric rate "
                        "(100mbit, 1gbit, 250kbit; 20 ms round trip) or testbed-<N>mbit (tc tbf on veth; the loopback "
                        f"round trip, calibrated or else assumed) (default: {links})")
    p.add_argument("--rtt-ms", type=float, default=None,
                   help="override every link's round trip, in milliseconds (default: each link's own)")


def _add_method_flags(p: argparse.ArgumentParser, w: Workload) -> None:
    """--peft and each method's own flags, as `tandem edge train` spells them."""
    from sim.shape import INPUT_GROUPS
    from sim.wire import IA3_FEEDFORWARD, IA3_TARGETS, SIM_METHODS
    p.add_argument("--peft", choices=SIM_METHODS, default=w.peft,
                   help="the PEFT method, as `tandem edge train --peft`: lora (--rank, --targets, --lora-dora), ia3 "
                        "((IA)³ vectors, --ia3-targets), adapter (bottleneck adapters, --adapter-reduction), prompt "
                        "(prompt tuning) or ptuning (P-tuning), both --prompt-tokens, or prefix (prefix tuning, "
                        "P-tuning v2: --prefix-tokens, --prefix-projection; --cloud-lora carried only); "
                        "split/dlora/carried are its --cloud-lora none/edge/carried (default: %(default)s)")
    p.add_argument("--lora-dora", action="store_true",
                   help="lora: DoRA (a magnitude per site; the weight norm every step where the site runs; "
                        "no dlora path)")
    p.add_argument("--ia3-targets", type=_subset(tuple(INPUT_GROUPS)), default=w.ia3_targets,
                   metavar="PROJ[,PROJ...]", help="ia3: the projections scaled, comma-separated (default: PEFT's, "
                                                  f"{','.join(IA3_TARGETS)})")
    p.add_argument("--ia3-feedforward", type=_subset(tuple(INPUT_GROUPS)), default=w.ia3_feedforward,
                   metavar="PROJ[,PROJ...]", help="ia3: of those, the ones scaled at their input (default: PEFT's, "
                                                  f"{','.join(IA3_FEEDFORWARD)}, with the default targets; none "
                                                  "with others)")
    p.add_argument("--prompt-tokens", type=int, default=w.prompt_tokens,
                   help="prompt, ptuning: virtual tokens before every sequence; every block runs on --seq + this "
                        "many (default: %(default)s)")
    p.add_argument("--ptuning-hidden", type=int, default=None,
                   help="ptuning: hidden size of the prompt encoder's MLP (default: the model's hidden size)")
    p.add_argument("--prefix-tokens", type=int, default=w.prefix_tokens,
                   help="prefix: virtual keys and values in front of every block's attention; each cloud block's "
                        "ride every step (default: %(default)s)")
    p.add_argument("--prefix-projection", type=int, default=None,
                   help="prefix: make the prefixes with PEFT's encoder MLP of this hidden size (Li & Liang; "
                        "default: none, a table: P-tuning v2)")
    p.add_argument("--adapter-reduction", type=int, default=w.adapter_reduction,
                   help="adapter: bottleneck width = the site's output width / this (default: %(default)s)")


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
                 local_steps=args.local_steps, epoch_examples=args.epoch_examples, peft=args.peft,
                 dora=args.lora_dora, ia3_targets=args.ia3_targets, ia3_feedforward=args.ia3_feedforward,
                 prompt_tokens=args.prompt_tokens, ptuning_hidden=args.ptuning_hidden,
                 prefix_tokens=args.prefix_tokens, prefix_projection=args.prefix_projection,
                 adapter_reduction=args.adapter_reduction)
    _check_method(args, w)
    rtt = None if args.rtt_ms is None else args.rtt_ms / 1e3
    links = [link_profile(s, rtt) for s in args.links]
    return shape, w, edge, cloud, links


def _check_method(args, w: Workload) -> None:
    """The method's own flags only with it, and --paths it has: each mistake a usage error naming the fix. Leaves
    args.paths the paths to cost (every path the method has when none were given)."""
    error = args.parser.error
    given = {"--lora-dora": args.lora_dora and "lora", "--ia3-targets": args.ia3_targets and "ia3",
             "--ia3-feedforward": args.ia3_feedforward and "ia3",
             "--prompt-tokens": args.prompt_tokens != Workload.prompt_tokens and "prompt",
             "--ptuning-hidden": args.ptuning_hidden is not None and "ptuning",
             "--prefix-tokens": args.prefix_tokens != Workload.prefix_tokens and "prefix",
             "--prefix-projection": args.prefix_projection is not None and "prefix",
             "--adapter-reduction": args.adapter_reduction != Workload.adapter_reduction and "adapter"}
    for flag, owner in given.items():
        if owner and not (args.peft == owner or owner == "prompt" and args.peft == "ptuning"):
            error(f"{flag} is an option of --peft {'prompt and ptuning' if owner == 'prompt' else owner}, "
                  f"not of --peft {args.peft}")
    if w.peft in INPUT_METHODS and w.prompt_tokens < 1:
        error(f"--prompt-tokens must be at least 1, got {w.prompt_tokens}")
    if w.ptuning_hidden is not None and w.ptuning_hidden < 1:
        error(f"--ptuning-hidden must be at least 1, got {w.ptuning_hidden}")
    if w.peft == "prefix":
        from sim.wire import check_prefix
        try:
            check_prefix(w.prefix_tokens, w.prefix_projection)
        except ValueError as e:
            error(str(e))
        if w.active_fraction != 1.0:
            error(f"--active-fraction is DLoRA's Kill & Revive: --peft prefix has a prefix in every layer every "
                  f"step (drop --active-fraction {w.active_fraction:g})")
    if stray := [t for t in w.ia3_feedforward if t not in w.sites()[0]]:
        error(f"--ia3-feedforward {','.join(stray)} is not among the (IA)³ targets ({','.join(w.sites()[0])})")
    if args.paths is None:
        args.paths = paths_for(w)
    for path in args.paths:
        if problem := path_problem(path, w):
            error(f"--paths {path}: {problem}")


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
                                                        if c.one_time_bytes else "") + ". " + "; ".join(c.notes))


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

    p = sub.add_parser("predict", help="cost of one step per path",
                       description="Cost of one training step per path. Documented device profiles need no "
                                   "calibration; only `here` / `here-matmul` need `tandem sim calibrate` first.")
    _add_workload(p, "smollm2-135m", "here", "here", "testbed-50mbit")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_predict, parser=p)

    c = sub.add_parser("calibrate", help="measure this machine for the `here` profile")
    c.add_argument("--model", default="smollm2-135m", help="model shape of the GEMM and decoder-block benchmarks: "
                                                           "a shipped config or a config.json (default: %(default)s)")
    c.add_argument("--batch", type=int, default=4, help="sequences per benchmark step; the block curve is measured "
                                                        "at batch x 16..128 and x --seq tokens (default: %(default)s)")
    c.add_argument("--seq", type=int, default=64, help="tokens per sequence of the GEMM and of the reported "
                                                       "block rate (default: %(default)s)")
    c.add_argument("--out", default=None, help="JSON file to save to (default: $TANDEM_HOME/sim/calibration.json, "
                                               "or $TANDEM_SIM_CALIBRATION)")
    c.add_argument("--quick", action="store_true", help="shorter benchmarks (noisier)")
    c.set_defaults(func=cmd_calibrate)

    m = sub.add_parser("compare", help="what-if table, saturation N and plots")
    _add_workload(m, "llama-7b", "rtx-4090", "h100-sxm", "100mbit,1gbit")
    m.set_defaults(batch=8, seq=256)
    m.add_argument("--out-dir", default="runs/sim-compare", help="folder for the PNG plots (default: %(default)s)")
    m.add_argument("--no-plots", action="store_true", help="print the tables only, draw no plots")
    m.add_argument("--ns", default="1,2,4,8,16,32,64,128",
                   help="edge counts for the utilisation plot, comma-separated (default: %(default)s)")
    m.add_argument("--json-out", default=None, help="also write the results to this JSON file (default: none)")
    m.set_defaults(func=cmd_compare, parser=m)

    t = sub.add_parser("testbed", help="namespaces + veth + tbf: self-test, or run cloud/edge commands through it")
    t.add_argument("--edges", type=int, default=1, help="edge namespaces, one link each (default: %(default)s)")
    t.add_argument("--rate-mbit", type=float, default=50.0,
                   help="tbf rate of every link, both ways, in Mbit/s (default: %(default)s)")
    t.add_argument("--prefix", default="tandem", help="namespace names: PREFIX-cloud, PREFIX-edge0, ... "
                                                      "(default: %(default)s)")
    t.add_argument("--selftest", action="store_true", help="measure TCP throughput both ways (default without "
                                                           "--edge-cmd)")
    t.add_argument("--seconds", type=float, default=2.0, help="self-test: about this many seconds per direction "
                                                                "(default: %(default)s)")
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
