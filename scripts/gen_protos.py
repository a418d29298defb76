"""Generate the Python code for protos/ into clients/proto (package herder.clients.proto).

grpcio-tools writes modules that import each other by proto path
(`herder.v1`); they are rewritten to live under `herder.clients.proto`, so the
installed wheel has one generated package and no stray top-level names.

    python scripts/gen_protos.py           # regenerate
    python scripts/gen_protos.py --check   # exit 1 when clients/proto is stale
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "clients" / "proto"
# herder.v1 -> herder.clients.proto.v1, herder.examples.v1 -> herder.clients.proto.examples.v1
_IMPORT = re.compile(r"(?<![\w.])herder\.(v1|examples\.v1)(?= import|\.\w+_pb2\b)")


def _generate(out: Path) -> None:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    # protoc finds the mypy plugins on PATH; they sit beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    generated = out / "herder"
    staged = out / "proto"
    generated.rename(staged)
    for path in staged.rglob("*.py*"):
        text = path.read_text()
        text = _IMPORT.sub(lambda m: f"herder.clients.proto.{m.group(1)}", text)
        path.write_text(text)
    for directory in [staged, *[d for d in staged.rglob("*") if d.is_dir()]]:
        (directory / "__init__.py").write_text('"""Generated from protos/ by scripts/gen_protos.py; do not edit."""\n')
    (staged / "py.typed").write_text("")


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when the generated code is stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        _generate(Path(tmp))
        staged = Path(tmp) / "proto"
        if check:
            if not TARGET.exists() or not _same_tree(staged, TARGET):
                sys.exit("generated code in clients/proto is stale: run `make gen` and commit the result")
            print("generated code is up to date")
            return
        if TARGET.exists():
            shutil.rmtree(TARGET)
        shutil.copytree(staged, TARGET)
        print(f"generated {sum(1 for _ in TARGET.rglob('*.py'))} modules into {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
