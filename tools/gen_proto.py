"""Generate Python code and type stubs from proto/ into python/evcore/v1 (never edited by hand).

protoc runs with ``-I proto`` so that ``proto/evcore/v1/x.proto`` becomes the importable module
``evcore.v1.x_pb2``, inside our own package.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # build-time (grpcio-tools)

    sources = sorted(PROTO.rglob("*.proto"))
    if not sources:
        return []
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {len(sources)} files under {PROTO}")
    for pkg in {p.parent for p in out.rglob("*_pb2.py")}:
        (pkg / "__init__.py").touch()
    return sources


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "python"
    generate(out)
