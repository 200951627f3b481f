#!/usr/bin/env bash
# One device call (about 4-5 minutes on an H100) verifying the CUDA-graph captures (issue 14:
# the backward capture failed with cudaErrorStreamCaptureImplicit) and timing the ML-100K
# step with and without graphs. Run from the repository root with megatron-core importable;
# ML100K (default .device/ml-100k) holds ML-100K's u.data. Writes its logs and graphs.json
# to $OUT (default ./out); prints one rc line per part.
#
# Each pytest part runs in its own process: a capture that fails leaves the CUDA generator
# mid-capture, and every later capture in that process then fails on its own ("Offset
# increment outside graph capture"), hiding which test failed first.
set -u
O=${OUT:-out}; mkdir -p "$O"; T=tests/unit/training/test_cuda_graphs.py
export PYTHONUNBUFFERED=1
G="--config configs/hstu_ml100k.yaml --data-path ${ML100K:-.device/ml-100k} --variant eager
   --variant layers:training.cuda_graphs=layers --variant step:training.cuda_graphs=step"

# 1. compile the ML-100K runs' Triton kernels (background) beside the GPU tests
timeout 200 python3 tools/benchmarks/e2e_step.py $G --warm-only > "$O/graphs_warm.log" 2>&1 &
timeout 150 python3 -m pytest -q -rfE -m gpu $T -k replayed_parameter_gradients > "$O/graphs_gradients.log" 2>&1
echo "gradients rc=$?"; tail -3 "$O/graphs_gradients.log"
timeout 200 python3 -m pytest -q -rfE -m gpu $T -k "not replayed_parameter_gradients" > "$O/graphs_tests.log" 2>&1
echo "graph tests rc=$?"; tail -3 "$O/graphs_tests.log"
wait; grep -iE "error|Traceback" "$O/graphs_warm.log" | tail -5

# 2. ML-100K: 30 timed steps of each variant, one at a time
timeout 150 python3 tools/benchmarks/e2e_step.py $G --steps 30 --profile-steps 0 --matmul-size 0 \
  --json "$O/graphs.json" > "$O/graphs.log" 2>&1
echo "graphs rc=$?"; grep "^| after" "$O/graphs.log"
python3 - "$O/graphs.json" <<'PY'
import json, sys
for row in json.load(open(sys.argv[1]))["rows"]:
    print(row["variant"], {k: v for k, v in row.items() if k.startswith("cuda_graphs") or k in ("step_ms", "error", "skipped")})
PY
