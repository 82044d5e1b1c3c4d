"""Regenerates the Python stubs of every .proto under this folder (`make protos`).

    python proto/generate.py [--out DIR]

Sources live at proto/<package path>/<name>.proto (buf layout: baton/<area>/v1/). protoc
names generated modules after the proto package (`baton.worker.v1.worker_pb2`), but this
folder is importable as `baton.proto`, so the generated imports are rewritten to
`baton.proto.baton.worker.v1...` (and `baton.proto.grpc.health.v1...`, which must not be
confused with the grpc library). The stubs are generated, never edited by hand; a test
regenerates them into a temporary folder and fails when the committed ones differ.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# Top-level proto packages whose generated modules live inside baton.proto.
LOCAL_PACKAGES = ("baton", "grpc.health")
_IMPORT = re.compile(
    r"^(\s*)(from|import) (" + "|".join(re.escape(p) for p in LOCAL_PACKAGES) + r")([.\w]*)",
    re.MULTILINE,
)


def proto_sources(root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto below root, as paths relative to it, in a stable order."""
    return sorted(p.relative_to(root) for p in root.rglob("*.proto"))


def rewrite_imports(text: str) -> str:
    """Moves imports of generated modules under the baton.proto package."""
    return _IMPORT.sub(lambda m: f"{m[1]}{m[2]} baton.proto.{m[3]}{m[4]}", text)


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Runs protoc over every source into out_dir; returns the generated files (absolute)."""
    import grpc_tools
    from grpc_tools import protoc

    sources = proto_sources(root)
    if not sources:
        raise ValueError(f"no .proto files under {root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{root}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"] + [str(s) for s in sources]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(map(str, sources))}")
    generated = sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))
    for path in generated:
        # ruff's exclude list names only proto/baton/; generated code is never linted.
        path.write_text("# ruff: noqa\n" + rewrite_imports(path.read_text()))
        # Every folder on the way down must be a package to be importable.
        for folder in path.relative_to(out_dir).parents:
            init = out_dir / folder / "__init__.py"
            if folder != Path(".") and not init.exists():
                init.write_text("")
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT,
                        help="where the stubs go (default: beside the sources)")
    args = parser.parse_args(argv)
    for path in generate(args.out.resolve()):
        print(path.relative_to(args.out.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
