#!/usr/bin/env bash
# One H100 call (at most about 5 minutes: every run has a timeout) for docs/benchmarks/mhc.md,
# "Fused merge pairs": the GPU tests of the mHC kernels (the fused pairs with and without the
# keyed dropout, its stream words from a device tensor, CUDA graphs of blocks with mHC), the
# step overhead of mHC n = 4 at the GPU-bound and the host-bound shapes (A/B steps
# alternating), and the per-op times of the pairs beside the separate kernels (merge dropout
# 0, as the STU layers run it, and 0.1) with the alternative blocks of
# mhc_configs.CANDIDATES. Run from the repository root with megatron-core importable; writes
# its logs and JSON files to $OUT (default ./out).
#
# Triton compiles a kernel in the process that first launches it, single-threaded: the runs
# to be timed first take a step (or one repetition) in parallel beside the GPU tests, so the
# timed runs that follow find their kernels in Triton's on-disk cache.
set -u
O=${OUT:-out}; mkdir -p "$O"; B=tools/benchmarks; T=tests/unit/ops
export PYTHONUNBUFFERED=1
# the 8-layer shapes of docs/benchmarks/mhc.md (synthetic data, STU layers, no dropout)
L="--num-layers 8 --hidden-size 1024 --num-attention-heads 8 --max-seq-len 1024
   --set model.qk_head_dim=128 --set model.v_head_dim=128 --set data.synthetic.num_users=20000
   --set data.synthetic.num_items=50000 --set data.synthetic.mean_length=400 --set data.synthetic.max_length=2048
   --kernel-backend triton --set model.hidden_dropout=0.0 --b-set model.enable_hyper_connections=true"
OPS="--ops merge+pre,merge_pre,expand+pre,expand_pre,merge+contract,merge_contract --impls triton --channels 1024"

# 1. compile warm-up (background) beside the GPU tests (three processes: their compiles in parallel)
timeout 120 python3 $B/ab_step_time.py $L --micro-batch-size 128 --steps 1 > "$O/warm_gpu_bound.log" 2>&1 &
timeout 120 python3 $B/ab_step_time.py $L --micro-batch-size 16 --steps 1 > "$O/warm_host_bound.log" 2>&1 &
for p in 0 0.1; do
  timeout 120 python3 $B/mhc_ops.py $OPS --tokens 4096 --dropout $p --candidates --warmup 0 --reps 1 \
    > "$O/warm_ops_$p.log" 2>&1 &
done
timeout 120 python3 -m pytest -q -rfE -m gpu $T/test_triton_mhc_fused.py -k bf16 > "$O/tests_fused_bf16.log" 2>&1 &
timeout 120 python3 -m pytest -q -rfE -m gpu $T/test_triton_mhc_fused.py -k "not bf16" > "$O/tests_fused_fp32.log" 2>&1 &
timeout 120 python3 -m pytest -q -rfE -m gpu tests/unit/training/test_cuda_graphs.py > "$O/tests_graphs.log" 2>&1 &
timeout 120 python3 -m pytest -q -rfE -m gpu $T/test_triton_mhc.py $T/test_triton_keyed_dropout.py \
  $T/test_dropout_device_words.py > "$O/tests_mhc.log" 2>&1
wait
for f in "$O"/tests_*.log; do echo "$f: $(tail -1 "$f")"; done

# 2. timed runs, one at a time: B as the blocks run by default (merge, then pre op), and B
# with the merge-pre kernel pairs (model.mhc_fuse_merge_pre)
for pairs in off on; do
  P=""; [ $pairs = on ] && P="--b-set model.mhc_fuse_merge_pre=true"
  timeout 45 python3 $B/ab_step_time.py $L $P --micro-batch-size 128 --steps 15 \
    --json "$O/mhc_gpu_bound_pairs_${pairs}_h100.json" > "$O/gpu_bound_$pairs.log" 2>&1
  echo "gpu-bound, pairs $pairs: rc=$?"; tail -3 "$O/gpu_bound_$pairs.log"
  timeout 25 python3 $B/ab_step_time.py $L $P --micro-batch-size 16 --steps 30 \
    --json "$O/mhc_host_bound_pairs_${pairs}_h100.json" > "$O/host_bound_$pairs.log" 2>&1
  echo "host-bound, pairs $pairs: rc=$?"; tail -3 "$O/host_bound_$pairs.log"
done
for p in 0 0.1; do
  timeout 25 python3 $B/mhc_ops.py $OPS --tokens 65536 --dropout $p --candidates --json "$O/mhc_fused_ops_p${p}_h100.json" \
    > "$O/ops_p$p.log" 2>&1
  echo "ops dropout $p rc=$?"; grep -E "^\| merge|^\| expand" "$O/ops_p$p.log"
done
