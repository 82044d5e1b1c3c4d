#!/usr/bin/env bash
# The checks and benchmarks that need a GPU, one step per command, each sized to finish within
# about ten minutes on an H100 (run the steps in this order; README.md in this folder says what
# each one reports):
#
#   bash benchmarks/gpu_session.sh check      # GPU kernel and model tests at real shapes
#   bash benchmarks/gpu_session.sh moe        # kernels/bench_moe.py
#   bash benchmarks/gpu_session.sh engine     # engine/bench_engine.py
#   bash benchmarks/gpu_session.sh disagg     # e2e/bench_disagg.py
#   bash benchmarks/gpu_session.sh transfer   # transfer/bench_transfer.py --device cuda
#
# Reports go to $OUT when it is set (a folder that is collected after the run), else to
# benchmarks/results/. Run from the repository root, on a machine whose Python already has
# torch, triton and the other dependencies (the GPU image): baton itself is installed without
# dependencies, so nothing is fetched.
set -uo pipefail

usage() {
    echo "usage: bash benchmarks/gpu_session.sh check|moe|engine|disagg|transfer" >&2
    exit 2
}

[ $# -eq 1 ] || usage
step=$1
case "$step" in check|moe|engine|disagg|transfer) ;; *) usage ;; esac

cd "$(dirname "$0")/.." || exit 1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_session: no CUDA device visible to torch here; these steps need a GPU" >&2
    exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

"$python" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
# The committed stubs need protobuf >= 7.35 and grpcio >= 1.85.1, and say so at import.
if ! "$python" -c 'import baton.proto.baton.decode.v1.decode_pb2_grpc' 2>"$out/import-error.txt"; then
    echo "gpu_session: the gRPC stubs do not import with this machine's protobuf/grpcio" >&2
    echo "(carry newer wheels; see benchmarks/README.md):" >&2
    cat "$out/import-error.txt" >&2
    exit 4
fi
rm -f "$out/import-error.txt"
"$python" - <<'EOF'
import importlib.metadata as m
print("versions:", ", ".join(f"{p} {m.version(p)}" for p in
      ("torch", "triton", "transformers", "grpcio", "protobuf", "xxhash")))
EOF

case "$step" in
check)
    "$python" -m pytest tests/kernels tests/workers/model/test_model_gpu.py -m gpu -q \
        -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
    ;;
moe)
    # This script's --out names a file: the name it picks itself, in $out.
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr 'A-Z' 'a-z' |
          sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
    "$python" benchmarks/kernels/bench_moe.py --out "$out/$(date -u +%F)-${gpu:-gpu}-moe.md"
    ;;
engine)
    "$python" benchmarks/engine/bench_engine.py --out "$out"
    ;;
disagg)
    "$python" benchmarks/e2e/bench_disagg.py --out "$out"
    ;;
transfer)
    "$python" benchmarks/transfer/bench_transfer.py --device cuda --out "$out"
    ;;
esac
