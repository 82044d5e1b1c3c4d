#!/usr/bin/env bash
# The checks and benchmarks that need a GPU, one step per command, each sized to finish within
# about ten minutes on an H100 (run the steps in this order; README.md in this folder says what
# each one reports):
#
#   bash benchmarks/gpu_session.sh check         # GPU kernel, model, CUDA-graph, demo tests
#   bash benchmarks/gpu_session.sh hotpath       # kernels/bench_hot_path.py (Mamba2, attention)
#   bash benchmarks/gpu_session.sh moe           # kernels/bench_moe.py
#   bash benchmarks/gpu_session.sh engine        # engine/bench_engine.py, bf16 weights
#   bash benchmarks/gpu_session.sh engine-nvfp4  # engine/bench_engine.py --weights nvfp4
#   bash benchmarks/gpu_session.sh disagg        # e2e/bench_disagg.py
#   bash benchmarks/gpu_session.sh transfer      # transfer/bench_transfer.py --device cuda
#   bash benchmarks/gpu_session.sh demo-model    # tools/train_demo.py --config demo-gpu, then
#                                                # demo/bench_demo.py on what it trained
#
# Reports go to $OUT when it is set (a folder that is collected after the run), else to
# benchmarks/results/. The engine steps keep their random checkpoints in
# $BATON_BENCH_CHECKPOINTS (default /tmp/baton-bench-checkpoints), so engine-nvfp4 right after
# engine on the same machine reuses the bf16 one. Run from the repository root, on a machine
# whose Python already has
# torch, triton and the other dependencies (the GPU image): baton itself is installed without
# dependencies, so nothing is fetched.
set -uo pipefail

usage() {
    echo "usage: bash benchmarks/gpu_session.sh" \
        "check|hotpath|moe|engine|engine-nvfp4|disagg|transfer|demo-model" >&2
    exit 2
}

[ $# -eq 1 ] || usage
step=$1
case "$step" in check|hotpath|moe|engine|engine-nvfp4|disagg|transfer|demo-model) ;;
    *) usage ;;
esac

cd "$(dirname "$0")/.." || exit 1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Run from the repository root: keep it off sys.path (its kernels/ folder would shadow the
# `kernels` package transformers imports; README.md, "Python in the repository root").
export PYTHONSAFEPATH=1

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
    "$python" -m pytest tests/kernels tests/workers/model/test_model_gpu.py \
        tests/workers/model/test_model_graphs.py tests/tools/test_train_demo.py \
        tests/benchmarks/test_bench_demo.py -m gpu -q \
        -p no:cacheprovider 2>&1 |
        tee "$out/gpu-tests.log"
    ;;
hotpath|moe)
    # These scripts' --out names a file: the name they pick themselves, in $out.
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr 'A-Z' 'a-z' |
          sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
    if [ "$step" = hotpath ]; then
        "$python" benchmarks/kernels/bench_hot_path.py \
            --out "$out/$(date -u +%F)-${gpu:-gpu}-hot-path.md"
    else
        "$python" benchmarks/kernels/bench_moe.py --out "$out/$(date -u +%F)-${gpu:-gpu}-moe.md"
    fi
    ;;
engine|engine-nvfp4)
    checkpoints=${BATON_BENCH_CHECKPOINTS:-/tmp/baton-bench-checkpoints}
    weights=bf16
    [ "$step" = engine-nvfp4 ] && weights=nvfp4
    "$python" benchmarks/engine/bench_engine.py --weights "$weights" \
        --checkpoint "$checkpoints" --out "$out"
    ;;
disagg)
    "$python" benchmarks/e2e/bench_disagg.py --out "$out"
    ;;
transfer)
    "$python" benchmarks/transfer/bench_transfer.py --device cuda --out "$out"
    ;;
demo-model)
    # The demo model trained on the GPU for BATON_DEMO_MINUTES (default 5: the step count
    # follows from the first steps' time and is in the log and training.json), then the demo
    # figures of it (perplexity, parity, 30 agent questions, completions on the CPU, MTP
    # speculation on the GPU, with the Triton kernels' first compiles: a few minutes). The
    # checkpoint comes back as one tar, written before the figures (a folder of files would be
    # over the number of files a run returns).
    # fp32 as the shipped CPU model was trained (at 6 M parameters a step is bound by kernel
    # launches, not by the matrix products that bf16 would speed up).
    checkpoint=${BATON_DEMO_CHECKPOINT:-/tmp/baton-demo-gpu}
    rm -rf "$checkpoint"
    "$python" tools/train_demo.py --config demo-gpu --device cuda --precision fp32 \
        --minutes "${BATON_DEMO_MINUTES:-5}" --out "$checkpoint" \
        --plot "$out/$(date -u +%F)-demo-gpu-loss.png" 2>&1 | tr '\r' '\n' |
        grep -v '^training \[' | tee "$out/demo-gpu-train.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
    tar -C "$checkpoint" -cf "$out/demo-gpu-checkpoint.tar" .
    "$python" benchmarks/demo/bench_demo.py --model "$checkpoint" --questions 30 \
        --spec-device cuda --out "$out"
    ;;
esac
