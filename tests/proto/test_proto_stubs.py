"""The committed stubs are what proto/generate.py makes from the committed .proto sources."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"

# The toolchain stamps its own version into the stubs; a different grpcio-tools release making
# otherwise identical code is not staleness.
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*"
    r"|_runtime_version\.ValidateProtobufRuntimeVersion\((?:\n.*?)*?\n\))$",
    re.MULTILINE,
)


def _generator():
    spec = importlib.util.spec_from_file_location("baton_proto_generate", PROTO_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normalized(path: Path) -> str:
    return _VERSION_LINES.sub("<version>", path.read_text())


def test_stubs_are_fresh(tmp_path):
    gen = _generator()
    fresh = {p.relative_to(tmp_path) for p in gen.generate(tmp_path)}
    committed = {p.relative_to(PROTO_DIR) for p in PROTO_DIR.rglob("*")
                 if p.name.endswith(gen.GENERATED_SUFFIXES)}
    assert fresh, "the generator made nothing"
    assert committed == fresh, "stubs missing or left over: run `python proto/generate.py`"
    stale = [str(rel) for rel in sorted(fresh)
             if _normalized(tmp_path / rel) != _normalized(PROTO_DIR / rel)]
    assert not stale, f"stale stubs {stale}: run `python proto/generate.py`"


def test_generated_imports_stay_inside_baton_proto(tmp_path):
    gen = _generator()
    for path in gen.generate(tmp_path):
        for line in path.read_text().splitlines():
            if re.match(r"\s*(from|import) (baton|grpc\.health)\b", line):
                assert line.split()[1].startswith("baton.proto."), f"{path.name}: {line}"


def test_rewrite_leaves_grpc_library_alone():
    gen = _generator()
    assert gen.rewrite_imports("import grpc\n") == "import grpc\n"
    assert (gen.rewrite_imports("from grpc.health.v1 import health_pb2 as h\n")
            == "from baton.proto.grpc.health.v1 import health_pb2 as h\n")
    assert (gen.rewrite_imports("from baton.worker.v1 import worker_pb2\n")
            == "from baton.proto.baton.worker.v1 import worker_pb2\n")


def test_stubs_import_and_follow_buf_enum_style():
    from baton.proto.baton.decode.v1 import decode_pb2
    from baton.proto.baton.transfer.v1 import transfer_pb2
    from baton.proto.baton.worker.v1 import worker_pb2

    for enum in (worker_pb2.Role, transfer_pb2.StateKind, transfer_pb2.DType,
                 decode_pb2.FinishReason):
        zero = enum.Name(0)
        assert zero.endswith("_UNSPECIFIED"), zero
        prefix = zero[: -len("UNSPECIFIED")]
        assert all(name.startswith(prefix) for name in enum.keys()), enum.keys()


@pytest.mark.parametrize("module", ["decode", "prefill", "worker"])
def test_services_have_stubs(module):
    mod = importlib.import_module(f"baton.proto.baton.{module}.v1.{module}_pb2_grpc")
    service = {"decode": "DecodeService", "prefill": "PrefillService", "worker": "WorkerService"}
    assert hasattr(mod, f"{service[module]}Stub")
    assert hasattr(mod, f"add_{service[module]}Servicer_to_server")
