"""`tandem offsite ...`: offsite tuning from the command line (also `python -m emulator.cli ...`).

    tandem offsite keygen --keys keys --name cloud          (once per party; hand out the .pub files)
    tandem offsite build  --out cloud --keys keys --me cloud --to owner --drop 0.65 --distill-steps 200
                          -> cloud/bundle/ (the cloud keeps it), cloud/bundle.sealed (goes to the data owner)
    tandem offsite tune   --sealed bundle.sealed --keys keys --me owner --from cloud --out owner --task sst2
                          -> owner/bundle/, owner/adapter/, owner/adapter.sealed (goes back), owner/metrics.json
    tandem offsite plug   --bundle cloud/bundle --sealed adapter.sealed --keys keys --me cloud --from owner
                          --out cloud/plug --onnx cloud/plug/onnx   -> the paper's table, table.json, ONNX model
    tandem offsite infer  --onnx owner/onnx/model.onnx --task sst2 --text "a gripping, funny film"

Every file that crosses from one party to the other is sealed (signed, and encrypted to its recipient); a tampered,
unsigned, wrongly signed or wrongly addressed file is refused with the reason.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from emulator.build import BuildConfig
from emulator.tune import TuneConfig


def _keys(args, *, need_peer: bool = True):
    """(my identity, the peer's public identity) from --keys/--me/--from|--to."""
    from privacy.security.seal import load_identity, load_public
    peer_name = getattr(args, "to", None) or getattr(args, "sender", None)
    if not args.keys or not args.me:
        raise SystemExit("give --keys DIR and --me NAME (make them with `tandem offsite keygen`)")
    me = load_identity(args.keys, args.me)
    peer = load_public(args.keys, peer_name) if peer_name else None
    if need_peer and peer is None:
        raise SystemExit("name the other party with --from NAME")
    return me, peer


def _received(args, folder: Path, fmt: str, unsealed: str | None, sender: str, flag: str):
    """(folder, my identity, the sender's) for what the other party sent: --sealed FILE, verified and opened into
    `folder`, or (local tests only) a plain folder given with `flag` and --insecure-unsigned."""
    from emulator.transport import open_sealed_dir
    if args.sealed:
        me, peer = _keys(args)
        open_sealed_dir(args.sealed, folder, fmt, peer, me)
        return folder, me, peer
    if unsealed and args.insecure_unsigned:
        return Path(unsealed), None, None
    raise SystemExit(f"give --sealed FILE from {sender} (or {flag} DIR --insecure-unsigned for local tests)")


def _torch_threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


def cmd_keygen(args) -> None:
    from privacy.security.seal import generate_identity
    generate_identity(args.keys, args.name)
    print(f"wrote {args.name}.sign.key/.pub (Ed25519) and {args.name}.box.key/.pub (X25519) to {args.keys}; "
          f"give others only the .pub files")


def cmd_build(args) -> None:
    from cli.main import dataclass_from_args
    from cli.report import table
    from emulator.build import build
    from emulator.bundle import BUNDLE_FORMAT
    from emulator.transport import seal_dir
    _torch_threads(args.threads)
    me, peer = _keys(args, need_peer=False) if args.keys or args.me else (None, None)
    cfg = dataclass_from_args(BuildConfig, args)
    out = Path(args.out)
    manifest = build(cfg, out / "bundle")
    lay = manifest["layout"]
    size = (out / "bundle" / "weights.safetensors").stat().st_size
    rows = [["adapter blocks", f"{lay['bottom']} + {lay['top']}"],
            ["emulator blocks", f"{lay['emulator']} ({len(lay['emulator'])} of {lay['num_layers'] - len(lay['bottom']) - len(lay['top'])}"
                                f", drop {manifest['drop_ratio']:.2f})"],
            ["parameters", f"{manifest['parameters']['bundle'] / 1e6:.1f} M of {manifest['parameters']['full'] / 1e6:.1f} M"],
            ["weights", f"{size / 1e6:.1f} MB ({manifest['dtype']})"]]
    if manifest["distillation"]:
        d = manifest["distillation"]
        rows.append(["distillation", f"{d['steps']} steps, held-out error {d['held_out_error_before']:.4g} -> "
                                     f"{d['held_out_error_after']:.4g}"])
    align = manifest["gradient_alignment"]
    if align:
        fmt = lambda a: " ".join(f"{b}:{c:.2f}" for b, c in a.items())  # noqa: E731
        rows.append(["gradient cosine", (f"{fmt(align['before_distillation'])} -> " if "before_distillation" in align
                                         else "") + fmt(align["bundle"]) + " (adapter block: emulator vs full)"])
    print(table(["bundle", str(out / "bundle")], rows))
    if me is not None:
        sealed = seal_dir(out / "bundle", out / "bundle.sealed", BUNDLE_FORMAT, me, peer)
        print(f"sealed: {sealed} (signed by {me.name}" + (f", encrypted to {peer.name})" if peer else ", not encrypted)"))


def cmd_tune(args) -> None:
    from cli.main import dataclass_from_args
    from emulator.bundle import ADAPTER_FORMAT, BUNDLE_FORMAT, BundleError
    from emulator.transport import seal_dir
    from emulator.tune import tune
    _torch_threads(args.threads)
    out = Path(args.out)
    try:
        bundle, me, cloud = _received(args, out / "bundle", BUNDLE_FORMAT, args.bundle, "the cloud", "--bundle")
        cfg = dataclass_from_args(TuneConfig, args)
        metrics = tune(cfg, bundle, out / "adapter")
    except BundleError as e:
        raise SystemExit(f"error: {e}") from None
    adapter = metrics.pop("_adapter")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    tr = metrics["training"]
    pct = lambda k: f"{100 * metrics[k]:.1f}%" if k in metrics else "-"  # noqa: E731
    print(f"emulator zero-shot {pct('emulator_zero_shot')}  ->  fine-tuned {pct('emulator_fine_tuned')}  "
          f"({tr['steps']} steps, {tr['step_seconds_median']:.3f} s/step, peak RSS {tr['peak_rss_mb'] or 0:.0f} MB)")
    if cloud is not None:
        sealed = seal_dir(out / "adapter", out / "adapter.sealed", ADAPTER_FORMAT, me, cloud)
        print(f"adapter: {out / 'adapter'}; send {sealed} to {cloud.name} (signed by {me.name}, encrypted to "
              f"{cloud.name})")
    if args.onnx:
        _export(adapter, args.onnx, cfg.task, bundle)


def _export(adapter, onnx_dir, task, bundle) -> None:
    from emulator.onnx_export import export_onnx
    adapter.merge()
    tok = None
    if (Path(bundle) / "tokenizer").is_dir():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(Path(bundle) / "tokenizer"))
    path = export_onnx(adapter.model, onnx_dir, tok, task)
    print(f"onnx: {path} (adapter + emulator)")


def cmd_plug(args) -> None:
    import tasks as T
    from emulator.bundle import ADAPTER_FORMAT, BundleError, load_bundle
    from emulator.onnx_export import export_onnx
    from emulator.plug import format_table, load_adapter, offsite_table
    from model.load import load_model
    _torch_threads(args.threads)
    out = Path(args.out)
    try:
        adapter_dir, _, _ = _received(args, out / "adapter", ADAPTER_FORMAT, args.adapter, "the data owner",
                                      "--adapter")
        adapter = load_adapter(adapter_dir)
        emulated = load_bundle(args.bundle)
        loaded = load_model(emulated.manifest["source"]["model"] if args.model is None else args.model)
        tok = loaded.tokenizer or T.tiny_tokenizer()
        res = offsite_table(loaded.model, tok, emulated, adapter, args.task, args.eval_examples, args.eval_batch_size,
                            args.reference_steps, progress=args.progress)
    except BundleError as e:
        raise SystemExit(f"error: {e}") from None
    plugged = res.pop("_plugged")
    print(format_table(res))
    (out / "table.json").write_text(json.dumps(res, indent=1))
    print(f"table: {out / 'table.json'}")
    if args.save_model:
        plugged.save_pretrained(str(out / "plugged"))
        print(f"plugged model: {out / 'plugged'}")
    if args.onnx:
        path = export_onnx(plugged, args.onnx, loaded.tokenizer, args.task)
        print(f"onnx: {path} (plugged full model)")


def cmd_infer(args) -> None:
    import tasks as T
    from emulator.onnx_export import classify, generate, session
    path = Path(args.onnx)
    if not path.is_file():
        raise SystemExit(f"no ONNX file at {path}")
    tok_dir = Path(args.tokenizer) if args.tokenizer else path.parent / "tokenizer"
    if tok_dir.is_dir():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        print(f"(no tokenizer at {tok_dir}: using the character-level test tokenizer)", file=sys.stderr)
        tok = T.tiny_tokenizer()
    sess = session(path)
    texts = args.text or [line.strip() for line in sys.stdin if line.strip()]
    for text in texts:
        if args.task:
            label, probs = classify(sess, tok, args.task, text)
            print(f"{label}\t{' '.join(f'{p:.3f}' for p in probs)}\t{text}")
        else:
            print(generate(sess, tok, text, args.max_new_tokens))


# Help for the config fields that have no comment in emulator/build.py and emulator/tune.py (by flag dest).
BUILD_HELPS = {
    "model": "the full model to cut: a shipped name (smollm2, tiny-llama) or a Hugging Face folder",
    "distill_lr": "learning rate of the emulator's distillation",
    "distill_batch": "sequences per distillation step",
    "distill_seq": "tokens per distillation sequence",
    "seed": "random seed (distillation data order)",
    "progress": "show progress bars",
}
TUNE_HELPS = {
    "task": "classification task the adapter is tuned and evaluated on",
    "dev_file": "the data owner's own dev set (TSV/CSV/JSONL); default: the shared set",
    "steps": "training steps",
    "batch_size": "examples per training step",
    "lora_r": "LoRA rank (--mode lora)",
    "lora_alpha": "LoRA alpha; the update is scaled by alpha / r (--mode lora)",
    "lora_targets": "projections of the adapter blocks that get LoRA (--mode lora)",
    "eval_examples": "dev examples evaluated",
    "eval_batch_size": "examples per evaluation batch",
    "eval_after": "the emulator's accuracy after tuning",
    "seed": "random seed (data order, LoRA initialisation)",
    "progress": "show progress bars",
}


def _classify_tasks() -> tuple[str, ...]:
    import tasks as T
    return tuple(name for name, task in T.TASKS.items() if task.kind == "classify")


def _refine(parser, dest: str, choices=None, help: str | None = None) -> None:
    """Give a dataclass-made flag its fixed choices (or a better help line) after `add_dataclass_args`."""
    action = next(a for a in parser._actions if a.dest == dest)
    if choices is not None:
        action.choices = tuple(choices)
    if help is not None:
        action.help = help


def _add_subcommands(sub) -> None:
    from cli.main import add_dataclass_args
    from emulator.tune import DEFAULT_LR
    from model.load import DTYPES
    classify = _classify_tasks()

    def party(p, peer_flag: str, peer_dest: str, peer_help: str, func) -> None:
        """What every party's command takes: its keys, the other party, torch threads."""
        p.add_argument("--keys", help="folder with the identities (`offsite keygen`)")
        p.add_argument("--me", help="your identity's name in --keys (signs what you send)")
        p.add_argument(peer_flag, dest=peer_dest, help=peer_help)
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
        p.set_defaults(func=func)

    def received(p, what: str, flag: str, sender: str) -> None:
        """What a party receives: a sealed file, or (testing) a plain folder."""
        p.add_argument("--sealed", help=f"the sealed {what} from {sender}")
        p.add_argument(flag, help=f"an unsealed {what} folder (only with --insecure-unsigned)")
        p.add_argument("--insecure-unsigned", action="store_true", help=f"accept an unsigned {what} folder (testing)")

    k = sub.add_parser("keygen", help="make a signing + encryption identity (Ed25519, X25519)")
    k.add_argument("--keys", required=True, help="folder to write the keys to")
    k.add_argument("--name", required=True, help="the party's name: files NAME.sign.key/.pub, NAME.box.key/.pub")
    k.set_defaults(func=cmd_keygen)

    b = sub.add_parser("build", help="cloud: cut the backbone into adapter + emulator, distill, write a sealed bundle")
    add_dataclass_args(b, BuildConfig, helps=BUILD_HELPS)
    _refine(b, "dtype", choices=DTYPES)
    b.add_argument("--out", required=True, help="folder for bundle/ and bundle.sealed")
    party(b, "--to", "to", "the data owner to encrypt the bundle to (omit: signed only)", cmd_build)

    t = sub.add_parser("tune", help="data owner: verify the bundle and tune the adapter on local data")
    add_dataclass_args(t, TuneConfig, helps=TUNE_HELPS)
    _refine(t, "task", choices=classify)
    _refine(t, "mode", choices=DEFAULT_LR)
    _refine(t, "lr", help="learning rate (default: by --mode, "
                          + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    received(t, "bundle", "--bundle", "the cloud")
    t.add_argument("--out", required=True, help="folder for bundle/, adapter/, adapter.sealed, metrics.json")
    t.add_argument("--onnx", help="also export adapter + emulator to this folder as ONNX")
    party(t, "--from", "sender", "the cloud that signed the bundle (the adapter is sealed back to it)", cmd_tune)

    p = sub.add_parser("plug", help="cloud: plug the returned adapter into the full model and print the table")
    p.add_argument("--bundle", required=True, help="the cloud's own copy of the bundle folder")
    received(p, "adapter", "--adapter", "the data owner")
    p.add_argument("--model", default=None, help="the full model (default: the one named in the bundle)")
    p.add_argument("--task", default="sst2", choices=classify,
                   help="task whose dev set the table is measured on (default: %(default)s)")
    p.add_argument("--eval-examples", type=int, default=500, help="dev examples evaluated (default: %(default)s)")
    p.add_argument("--eval-batch-size", type=int, default=32,
                   help="examples per evaluation batch (default: %(default)s)")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="full-model fine-tuning steps for the reference row (default: the owner's; 0: skip)")
    p.add_argument("--out", required=True, help="folder for adapter/, table.json")
    p.add_argument("--onnx", help="also export the plugged full model to this folder as ONNX")
    p.add_argument("--save-model", action="store_true", help="save the plugged model (Hugging Face format)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show progress bars (default: on)")
    party(p, "--from", "sender", "the data owner who signed the adapter", cmd_plug)

    i = sub.add_parser("infer", help="answer prompts with an exported ONNX model (onnxruntime)")
    i.add_argument("--onnx", required=True, help="model.onnx from `tune --onnx` or `plug --onnx`")
    i.add_argument("--tokenizer", help="tokenizer folder (default: tokenizer/ beside the ONNX file)")
    i.add_argument("--task", choices=classify,
                   help="classify with this task's prompt and label words (default: none, generate text)")
    i.add_argument("--text", action="append", help="a text or prompt (repeatable; default: one per stdin line)")
    i.add_argument("--max-new-tokens", type=int, default=20,
                   help="without --task: tokens generated per prompt (default: %(default)s)")
    i.set_defaults(func=cmd_infer)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `offsite` with its subcommands on the `tandem` command line."""
    p = subparsers.add_parser("offsite", help="offsite tuning: emulator bundles, local tuning, plug-in, ONNX")
    _add_subcommands(p.add_subparsers(dest="offsite_action", required=True))
    return p


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emulator.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_subcommands(parser.add_subparsers(dest="offsite_action", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
