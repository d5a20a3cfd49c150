"""`tandem offsite ...`: offsite tuning from the command line (also `python -m emulator.cli ...`).

    tandem offsite keygen --keys keys --name cloud          (once per party; hand out the .pub files)
    tandem offsite build  --out cloud --keys keys --me cloud --to owner --drop 0.6
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

from emulator.build import BuildConfig
from emulator.commands import cmd_build, cmd_infer, cmd_keygen, cmd_plug, cmd_tune
from emulator.tune import TuneConfig


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


def _party(p, peer_flag: str, peer_dest: str, peer_help: str, func) -> None:
    """What every party's command takes: its keys, the other party, torch threads."""
    p.add_argument("--keys", help="folder with the identities (`offsite keygen`)")
    p.add_argument("--me", help="your identity's name in --keys (signs what you send)")
    p.add_argument(peer_flag, dest=peer_dest, help=peer_help)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.set_defaults(func=func)


def _received_flags(p, what: str, flag: str, sender: str) -> None:
    """What a party receives: a sealed file, or (testing) a plain folder."""
    p.add_argument("--sealed", help=f"the sealed {what} from {sender}")
    p.add_argument(flag, help=f"an unsealed {what} folder (only with --insecure-unsigned)")
    p.add_argument("--insecure-unsigned", action="store_true", help=f"accept an unsigned {what} folder (testing)")


def _add_keygen(sub) -> None:
    k = sub.add_parser("keygen", help="make a signing + encryption identity (Ed25519, X25519)")
    k.add_argument("--keys", required=True, help="folder to write the keys to")
    k.add_argument("--name", required=True, help="the party's name: files NAME.sign.key/.pub, NAME.box.key/.pub")
    k.set_defaults(func=cmd_keygen)


def _add_build(sub) -> None:
    from cli.main import add_dataclass_args
    from model.load import DTYPES
    b = sub.add_parser("build", help="cloud: cut the backbone into adapter + emulator, distill, write a sealed bundle")
    add_dataclass_args(b, BuildConfig, helps=BUILD_HELPS)
    _refine(b, "dtype", choices=DTYPES)
    b.add_argument("--out", required=True, help="folder for bundle/ and bundle.sealed")
    _party(b, "--to", "to", "the data owner to encrypt the bundle to (omit: signed only)", cmd_build)


def _add_tune(sub, classify: tuple[str, ...]) -> None:
    from cli.main import add_dataclass_args
    from emulator.tune import DEFAULT_LR
    t = sub.add_parser("tune", help="data owner: verify the bundle and tune the adapter on local data")
    add_dataclass_args(t, TuneConfig, helps=TUNE_HELPS)
    _refine(t, "task", choices=classify)
    _refine(t, "mode", choices=DEFAULT_LR)
    _refine(t, "lr", help="learning rate (default: by --mode, "
                          + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    _received_flags(t, "bundle", "--bundle", "the cloud")
    t.add_argument("--out", required=True, help="folder for bundle/, adapter/, adapter.sealed, metrics.json")
    t.add_argument("--onnx", help="also export adapter + emulator to this folder as ONNX")
    _party(t, "--from", "sender", "the cloud that signed the bundle (the adapter is sealed back to it)", cmd_tune)


def _add_plug(sub, classify: tuple[str, ...]) -> None:
    p = sub.add_parser("plug", help="cloud: plug the returned adapter into the full model and print the table")
    p.add_argument("--bundle", required=True, help="the cloud's own copy of the bundle folder")
    _received_flags(p, "adapter", "--adapter", "the data owner")
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
    _party(p, "--from", "sender", "the data owner who signed the adapter", cmd_plug)


def _add_infer(sub, classify: tuple[str, ...]) -> None:
    i = sub.add_parser("infer", help="answer prompts with an exported ONNX model (onnxruntime)")
    i.add_argument("--onnx", required=True, help="model.onnx from `tune --onnx` or `plug --onnx`")
    i.add_argument("--tokenizer", help="tokenizer folder (default: tokenizer/ beside the ONNX file)")
    i.add_argument("--task", choices=classify,
                   help="classify with this task's prompt and label words (default: none, generate text)")
    i.add_argument("--text", action="append", help="a text or prompt (repeatable; default: one per stdin line)")
    i.add_argument("--max-new-tokens", type=int, default=20,
                   help="without --task: tokens generated per prompt (default: %(default)s)")
    i.set_defaults(func=cmd_infer)


def _add_subcommands(sub) -> None:
    classify = _classify_tasks()
    _add_keygen(sub)
    _add_build(sub)
    _add_tune(sub, classify)
    _add_plug(sub, classify)
    _add_infer(sub, classify)


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
