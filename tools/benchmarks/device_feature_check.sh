#!/usr/bin/env bash
# One H100 call (at most ~9 minutes) for docs/benchmarks/ultra_hstu.md, ranking.md,
# context_parallel.md and fp8.md, and the GPU golden cases: DLRM-HSTU against ULTRA-HSTU
# (speed at 8k histories; their AUC is measured on any device), DLRM-HSTU's step at 4k
# histories, the longest history per rank under context parallelism, the ranking export on
# CUDA, the GPU golden values, the FP8 GEMM table and the FP8 GPU tests (STU, ranking, casts)
# with the prefetcher's. Run from the repository root with megatron-core importable and ML-100K in
# $MEGATRON_GR_ML100K; writes at most 8 files to $OUT. Parts run in order of need, each under
# its own time limit.
set -u
O=${OUT:-out}; mkdir -p "$O"; B=tools/benchmarks; T=tests/unit
export PYTHONUNBUFFERED=1
timeout 120 python3 $B/ultra_hstu.py --out /tmp/ultra --parts speed > "$O/ultra.log" 2>&1
echo "ultra rc=$?"; grep "^|" "$O/ultra.log"; cp /tmp/ultra/summary.json "$O/ultra_summary.json" 2>/dev/null
timeout 50 python3 $B/ranking_step.py --json "$O/ranking_step.json" 2>&1 | grep "^|"
timeout 110 python3 $B/context_parallel_memory.py --device cuda --model benchmark --cp 1,2,4 --search \
  --budget-s 50 --out "$O/cp_memory.jsonl" 2>&1 | grep "^|"
timeout 60 python3 -m pytest -q -rfE tests/unit/serving/test_ranking_export_gpu.py > "$O/tests.log" 2>&1
echo "export gpu tests rc=$?"; tail -2 "$O/tests.log"
timeout 60 python3 tools/make_golden.py --name retrieval_hstu_gpu --name retrieval_hstu_fp8_gpu 2>&1 | tail -2
tar czf "$O/golden_gpu.tgz" tests/functional/golden/*gpu*.json 2>/dev/null
timeout 45 python3 $B/fp8_gemm.py --json "$O/fp8_gemm.json" 2>&1 | grep "^|"
timeout 150 python3 -m pytest -q -rfE -m gpu $T/ops/test_fp8_cast.py $T/transformer/test_fp8_gpu.py \
  $T/models/test_fp8_ranking_gpu.py $T/data/test_prefetch.py >> "$O/tests.log" 2>&1
echo "fp8 tests rc=$?"; tail -3 "$O/tests.log"
