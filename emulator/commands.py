"""What each `tandem offsite` subcommand does (emulator/cli.py holds their command line): keygen, build, tune, plug,
infer. Every file that crosses from one party to the other is sealed, and opened only when it verifies."""
from __future__ import annotations

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
    if manifest.get("mlp_pruning"):
        m = manifest["mlp_pruning"]
        rows.append(["MLP neurons kept", f"{m['keep']:.2f} of each emulator block's (widths "
                                         f"{sorted(set(m['widths'].values()))}), down projection refit"])
    if manifest["distillation"]:
        d = manifest["distillation"]
        rows.append(["distillation", f"{d['steps']} steps, held-out error {d['held_out_error_before']:.4g} -> "
                                     f"{d['held_out_error_after']:.4g}"])
        if "held_out_gradient_error_after" in d:
            rows.append(["gradient matching", f"weight {d['gradient_weight']:g}, held-out gradient error "
                         f"{d['held_out_gradient_error_before']:.4g} -> {d['held_out_gradient_error_after']:.4g}"])
    q = manifest.get("quality") or {}
    if "zero_shot" in q:
        z = q["zero_shot"]
        rows.append(["zero-shot", f"{z['task']} dev ({z['examples']}): full {100 * z['full']:.1f}%, emulator "
                                  f"{100 * z['emulator']:.1f}% (gap {100 * z['gap']:+.1f} pt)"])
    if "language_model" in q:
        rows.append(["perplexity", f"emulator / full {q['language_model']['perplexity_ratio']:.3g} (WikiText-2 dev); "
                                   f"distillation error {q['distillation_error']:.4g}"])
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
