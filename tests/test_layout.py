"""The tree keeps its promises: edge/ and cloud/ never import each other (they meet only through protocol/ and the
shared code, as the real machines meet only through the wire), and the step's message order is written once."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_edge_and_cloud_never_import_each_other():
    for side, other in (("edge", "cloud"), ("cloud", "edge")):
        offenders = [str(p.relative_to(ROOT)) for p in (ROOT / side).rglob("*.py") if other in imported_packages(p)]
        assert not offenders, f"{side}/ imports {other}/: {offenders}"


KINDS = {"begin", "lora_request", "lora_reply", "hidden", "output_grad", "lora_grad_request", "lora_grad_reply",
         "input_grad"}


def kind_sequences(path: Path) -> list[list[str]]:
    """List and tuple literals (and comparisons chains of them) that name four or more message kinds in a row."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.List, ast.Tuple)):
            names = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in KINDS]
            if len(names) >= 4:
                out.append(names)
    return out


def test_the_step_order_is_written_only_in_protocol_step():
    """Outside protocol/step.py no code lists the step's messages in sequence: walking StepPlan is the only way."""
    offenders = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", ".git") or "generated" in rel.parts or rel == Path("protocol/step.py"):
            continue
        if kind_sequences(path):
            offenders[str(rel)] = kind_sequences(path)
    assert not offenders, offenders
    assert len(kind_sequences(ROOT / "protocol/step.py")) >= 1  # the check can see a sequence where there is one
