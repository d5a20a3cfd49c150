"""`tandem edge eval` and `tandem edge generate`: use a tuned adapter without training (edge/inference.py).

--adapter is the adapter folder a run wrote (<out-dir>/adapter). When it sits in a run folder, that run's settings
(its config.json: model, task, dev file, cut, --cloud-lora, LoRA shape, evaluation size) are the defaults, so
`tandem edge eval --adapter runs/edge-0/adapter --cloud ... --token-file ...` scores exactly what the run printed.
A flag typed overrides the run's setting; without a run folder the defaults shown apply. --local runs the whole
model here instead of through the cloud (for whoever holds the full model).
"""
from __future__ import annotations

import argparse
import sys

EVAL_HELP = "score a saved adapter on a dev file, through the cloud (or --local), without training"
GENERATE_HELP = "generate text with a saved adapter, through the cloud (forward-only steps) or --local"
_GIVEN = "_edge_flags"  # the parser's default holding the EdgeConfig flags of a subcommand


def _edge_flags(parser, skip: set[str]) -> None:
    """EdgeConfig's flags minus `skip`; their defaults are left out of the namespace, so only typed ones count."""
    from edge.config import EdgeConfig
    from edge.flags import add_flags
    table = add_flags(parser, EdgeConfig, skip=skip)
    dests = {fl.dest for fl in table}
    for action in parser._actions:
        if action.dest in dests:
            action.default = argparse.SUPPRESS
    parser.set_defaults(**{_GIVEN: dests})
    parser.add_argument("--adapter", default=None, help="the PEFT adapter folder to use (a run's <out-dir>/adapter); "
                        "its run's config.json, if next to it, gives the defaults (default: none, the base model)")
    parser.add_argument("--local", action="store_true", help="run the whole model on this machine, not through "
                        "the cloud (needs the full model; no --cloud, no token)")
    parser.add_argument("--token-file", default=None, help="a file with the bearer token, or the JSON table from "
                        "`tandem tokens` (the entry for --name is used)")


def add_parsers(edge_sub) -> None:
    """`edge eval` and `edge generate` under the `tandem edge` subparsers."""
    from edge.config import EdgeConfig
    from edge.flags import add_flags, flags_of
    from edge.inference import SampleOptions
    from edge.runs import TRAIN_ONLY
    kr = {fl.dest for fl in flags_of(EdgeConfig) if fl.path[0] == "kr"}  # Kill & Revive is for training
    usage = __doc__.split("\n\n")[1]
    ev = edge_sub.add_parser("eval", help=EVAL_HELP, description=f"{EVAL_HELP}.\n\n{usage}",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    _edge_flags(ev, TRAIN_ONLY | kr)
    ev.add_argument("--metrics-out", default=None, help="write the scores as JSON here")
    ev.set_defaults(func=cmd_edge_eval)

    gen = edge_sub.add_parser("generate", help=GENERATE_HELP, description=f"{GENERATE_HELP}.\n\n{usage}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _edge_flags(gen, TRAIN_ONLY | kr | {"eval_examples", "eval_batch_size", "dev_file"})
    sampling = gen.add_argument_group("sampling")
    add_flags(sampling, SampleOptions)
    gen.add_argument("--prompt", default=None, help="the text to continue (or --prompt-file; '-' reads stdin)")
    gen.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template, as a "
                     "user turn (instruction-tuned models such as SmolLM2-Instruct)")
    gen.set_defaults(func=cmd_edge_generate)


def _config(args):
    """The EdgeConfig for the adapter and the typed flags, with the token read; (cfg, infer --cloud-lora)."""
    from cli.main import read_token
    from edge.runs import config_for_adapter
    given = {k: v for k, v in vars(args).items() if k in getattr(args, _GIVEN)}
    cfg, from_run = config_for_adapter(args.adapter, given)
    if cfg.link.token is None and args.token_file and not args.local:
        cfg.link.token = read_token(args.token_file, cfg.name)
    return cfg, not from_run and "cloud_lora" not in given


def cmd_edge_eval(args):
    import json
    from dataclasses import replace
    from cli.report import _fmt_eval
    from edge.inference import open_model, score
    cfg, infer = _config(args)
    cfg = replace(cfg, eval=replace(cfg.eval, before=False, after=True))
    tuned = open_model(cfg, args.adapter, local=args.local, infer_cloud_lora=infer)
    try:
        scores = score(tuned, progress=cfg.progress)
    finally:
        tuned.close()
    task = tuned.cfg.data.task_file or tuned.cfg.data.task
    dev = tuned.cfg.data.dev_file or f"the {task} dev set"
    count = f"{scores['examples']} examples" if "examples" in scores else f"{scores['tokens']} tokens"
    print(f"{cfg.name}: dev {_fmt_eval(scores)} on {count} of {dev}, {tuned.where}, adapter "
          f"{args.adapter or '(none: the base model)'}", flush=True)
    if args.metrics_out:
        from privacy.security.files import write_atomic
        record = {"adapter": args.adapter, "where": tuned.where, "config": tuned.cfg.public(), "eval": scores}
        write_atomic(args.metrics_out, json.dumps(record, indent=1).encode(), 0o600)
    return scores


def _prompt(args) -> str:
    if (args.prompt is None) == (args.prompt_file is None):
        raise SystemExit("give the text to continue: --prompt TEXT or --prompt-file FILE (one of them)")
    if args.prompt == "-":
        return sys.stdin.read()
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    return args.prompt


def cmd_edge_generate(args):
    from edge.flags import build
    from edge.inference import SampleOptions, check_sampling, generate, open_model
    opts = build(SampleOptions, vars(args))
    check_sampling(opts)  # a bad option is a ValueError: one line from cli.main
    text = _prompt(args)
    cfg, infer = _config(args)
    tuned = open_model(cfg, args.adapter, local=args.local, infer_cloud_lora=infer)
    tok = tuned.tokenizer
    try:
        if args.chat:
            if not getattr(tok, "chat_template", None):
                raise SystemExit(f"{cfg.model}'s tokenizer has no chat template: drop --chat")
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        decode = getattr(tok, "decode", None)
        out = generate(tuned, ids, opts, getattr(tok, "eos_token_id", None))
    finally:
        tuned.close()
    print(decode(out["ids"], skip_special_tokens=True) if decode else " ".join(map(str, out["ids"])), flush=True)
    wire = (f", {out['bytes_up'] / 1e6:.2f} MB up, {out['bytes_down'] / 1e6:.2f} MB down"
            if tuned.em is not None else "")
    print(f"[{len(out['ids'])} tokens in {out['steps']} forward passes {tuned.where}{wire}]", file=sys.stderr)
    return out
