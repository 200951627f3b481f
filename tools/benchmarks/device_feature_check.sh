#!/usr/bin/env bash
# One H100 call (about 8-9 minutes) for docs/benchmarks/fp8.md, ranking.md, ultra_hstu.md and
# context_parallel.md, and the GPU golden cases: the GPU tests of FP8, the keyed-dropout kernels
# and the ranking/ULTRA models on Triton, the FP8 GEMM and step tables, DLRM-HSTU's step at
# long histories, DLRM-HSTU against ULTRA-HSTU (speed and AUC), the longest history per rank
# under context parallelism, the GPU golden values. Run from the repository root with
# megatron-core importable and ML-100K in $MEGATRON_GR_ML100K; writes at most 8 files to $OUT.
# Parts run in order of need, each under its own time limit.
set -u
O=${OUT:-out}; mkdir -p "$O"; B=tools/benchmarks; T=tests/unit
export PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q -rfE -m gpu $T/ops/test_fp8_cast.py $T/transformer/test_fp8_gpu.py \
  $T/ops/test_triton_keyed_dropout.py > "$O/tests.log" 2>&1
echo "gpu tests rc=$?"; tail -2 "$O/tests.log"
timeout 120 python3 -m pytest -q -rfE $T/models/test_ranking_triton.py $T/models/test_ultra_triton.py >> "$O/tests.log" 2>&1
echo "ranking tests rc=$?"; tail -2 "$O/tests.log"
timeout 45 python3 $B/fp8_gemm.py --json "$O/fp8_gemm.json" 2>&1 | grep "^|"
timeout 90 python3 $B/fp8_step.py --steps 20 --json "$O/fp8_step.json" 2>&1 | grep "^|"
timeout 200 python3 $B/ultra_hstu.py --out /tmp/ultra --quality-steps 200 2>&1 | grep "^|"
cp /tmp/ultra/summary.json "$O/ultra_summary.json" 2>/dev/null
timeout 50 python3 $B/ranking_step.py --json "$O/ranking_step.json" 2>&1 | grep "^|"
timeout 80 python3 $B/context_parallel_memory.py --device cuda --model benchmark --cp 1,2,4 --search \
  --out "$O/cp_memory.jsonl" 2>&1 | grep "^|"
timeout 60 python3 tools/make_golden.py --name retrieval_hstu_gpu --name retrieval_hstu_fp8_gpu 2>&1 | tail -3
tar czf "$O/golden_gpu.tgz" tests/functional/golden/*gpu*.json 2>/dev/null; echo done
