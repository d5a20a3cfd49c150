"""Regenerate protocol/generated/ from protocol/tandem.proto (run: python -m protocol.generate).

The output is committed; tests/test_protocol.py checks it matches a fresh generation, so the .proto is the truth.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "generated"


def generate(out: Path = OUT) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools
    out.mkdir(parents=True, exist_ok=True)
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", str(HERE / "tandem.proto")])
    if rc != 0:
        raise RuntimeError(f"protoc failed with {rc}")
    grpc_file = out / "tandem_pb2_grpc.py"
    # protoc writes an absolute import; the package needs a relative one.
    grpc_file.write_text(re.sub(r"^import tandem_pb2 as", "from . import tandem_pb2 as", grpc_file.read_text(),
                                flags=re.M))
    (out / "__init__.py").write_text('"""Generated from protocol/tandem.proto by protocol/generate.py. Do not edit."""\n')
    return sorted(out.glob("*"))


if __name__ == "__main__":
    files = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
    print("\n".join(str(f) for f in files))
