"""Compile protos/ into extproc/_pb with grpcio-tools.

    python protos/compile.py          # regenerate extproc/_pb
    python protos/compile.py --check  # exit 1 if the committed code is stale

The generated modules import each other as ``envoy.…``; they are rewritten to
``extproc._pb.envoy.…`` so the package never claims the top-level ``envoy`` name.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "extproc" / "_pb"
PACKAGE = "extproc._pb"
_IMPORT = re.compile(r"^from envoy(\.[\w.]+) import", re.MULTILINE)


def generate(out: Path) -> None:
    from grpc_tools import protoc  # only needed by developers and CI

    include = Path(protoc.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        text = path.read_text()
        path.write_text(_IMPORT.sub(rf"from {PACKAGE}.envoy\1 import", text))
    for directory in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()


def _tree(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*.py*") if "__pycache__" not in p.parts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = _tree(fresh), _tree(OUT_DIR)
        stale = sorted(set(want) ^ set(have))
        stale += [name for name in set(want) & set(have) if not filecmp.cmp(want[name], have[name], shallow=False)]
        if stale:
            print("extproc/_pb is stale; run `python protos/compile.py`:", *stale, sep="\n  ", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
