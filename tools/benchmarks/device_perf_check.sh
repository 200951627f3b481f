#!/usr/bin/env bash
# One H100 call (about 6-8 minutes) for docs/benchmarks/e2e.md and docs/benchmarks/cuda_graphs.md:
# the GPU tests of this work, the standard-shape table (this tree's fast step, its reference
# step with the speed-ups off and the loss curves of the two compared, an older tree's step
# for speed), the ML-100K step with and without CUDA graphs, the relative-bias attention
# kernel's two paths, the mHC overhead with graphs. Run from the repository root with
# megatron-core importable; writes 8 logs and JSON files to $OUT (default ./out). Needs
# .device/ml-100k (ML-100K's u.data); .device/baseline (the package at 952dd4b: `git archive
# 952dd4b megatron_gr | tar -x -C .device/baseline`) adds the "before" row (speed only: main's
# numerics changed since), skipped without it.
#
# Triton compiles a kernel in the process that first launches it, single-threaded: every run
# first takes a few steps in parallel (the compile warm-up, beside the GPU tests), so the timed
# runs that follow start with their kernels in Triton's on-disk cache.
set -u
O=${OUT:-out}; mkdir -p "$O"; B=tools/benchmarks; T=tests/unit
export PYTHONUNBUFFERED=1
R="--reference --reference-variants plain,plain_bias --loss-parity reference/plain,after/plain --loss-parity reference/plain_bias,after/plain_bias"
if [ -d .device/baseline ]; then R="$R --tree .device/baseline --tree-variants plain"; fi
S="--standard --data-dir /tmp/e2e_standard $R"
G="--config configs/hstu_ml100k.yaml --data-path .device/ml-100k --variant eager --variant layers:training.cuda_graphs=layers --variant step:training.cuda_graphs=step"
A="--shapes 4x256 --lengths 8192 --dists fixed --impls triton --bias --bias-paths uniform,per_pair"
# the host-bound shape of docs/benchmarks/mhc.md, both variants with graphs
M="--num-layers 8 --hidden-size 1024 --num-attention-heads 8 --max-seq-len 1024 --micro-batch-size 16
   --set model.qk_head_dim=128 --set model.v_head_dim=128 --set data.synthetic.num_users=3000
   --set data.synthetic.num_items=50000 --set data.synthetic.mean_length=400 --set data.synthetic.max_length=2048
   --set model.hidden_dropout=0.0 --set training.cuda_graphs=layers --set training.cuda_graph_max_tokens=10240
   --b-set model.enable_hyper_connections=true"

# 1. compile warm-up (background) and the GPU tests
for w in "e2e_step.py $S --warm-only" "e2e_step.py $G --warm-only" "ab_step_time.py $M --steps 1" \
         "hstu_attention.py $A --warmup 0 --reps 1"; do
  timeout 180 python3 $B/$w >> /tmp/warm.log 2>&1 &
done
timeout 170 python3 -m pytest -q -rfE -m gpu $T/training/test_cuda_graphs.py $T/training/test_resume.py \
  $T/data/test_prefetch.py $T/ops/test_triton_hstu_attention.py $T/ops/test_dropout_device_words.py \
  -k "graph or resume or prefetch or dropout or bucket or uniform_tiles" > "$O/tests.log" 2>&1
echo "tests rc=$?"; tail -4 "$O/tests.log"
wait; grep -iE "error|Traceback" /tmp/warm.log | tail -5

# 2. timed runs, one at a time
timeout 170 python3 $B/e2e_step.py $S --steps 15 --profile-steps 2 --json "$O/e2e.json" > "$O/e2e.log" 2>&1
echo "e2e rc=$?"; grep -E "^\| (before|after|reference)|^loss parity" "$O/e2e.log"
timeout 90 python3 $B/e2e_step.py $G --steps 30 --profile-steps 0 --matmul-size 0 --json "$O/graphs.json" > "$O/graphs.log" 2>&1
echo "graphs rc=$?"; grep "^| after" "$O/graphs.log"
timeout 30 python3 $B/hstu_attention.py $A --warmup 2 --reps 5 > "$O/attn.log" 2>&1
echo "attn rc=$?"; grep "^4x256" "$O/attn.log"
timeout 50 python3 $B/ab_step_time.py $M --steps 20 --json "$O/mhc.json" > "$O/mhc.log" 2>&1
echo "mhc rc=$?"; tail -8 "$O/mhc.log"
