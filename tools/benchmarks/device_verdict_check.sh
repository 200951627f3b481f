#!/usr/bin/env bash
# One GPU call (under 10 minutes) for the step decided on the device (docs/benchmarks/e2e.md,
# "2026-12-08"): the standard shape with layer graphs, plain and dynamic tables, this tree
# (no wait between steps) beside the package of the tree before it (9e17619: one wait per
# step for the gradient norm; `git archive 9e17619 megatron_gr | tar -x -C DIR`), the loss
# curves of both compared; then the GPU tests of the step's waits and the sparse update
# kernels, then the host time by function, then the eager plain step. Run from the repository root
# with megatron-core importable:
#
#     bash tools/benchmarks/device_verdict_check.sh DIR     # writes logs and JSON to $OUT (default ./out)
source "$(dirname "$0")/device_call_setup.sh"

timeout "$(left 380)" python3 $B/e2e_step.py --standard --data-dir /tmp/e2e_standard --tree "$before" \
  --tree-variants plain_layers,dynamic_layers --variant "plain_layers:$G" --variant "dynamic_layers:$G,$D" \
  --steps 20 --profile-steps 2 --matmul-size 4096 \
  --loss-parity before/plain_layers,after/plain_layers --loss-parity before/dynamic_layers,after/dynamic_layers \
  --json "$O/e2e_device_verdict.json" --markdown "$O/e2e_device_verdict.md" > "$O/e2e.log" 2>&1
echo "e2e rc=$?"; grep -E "^\| (before|after)|^loss parity|idle" "$O/e2e.log"
timeout "$(left 120)" python3 -m pytest -q -rfE $T/training/test_step_device_waits.py $T/training/test_host_copy.py \
  $T/ops/test_triton_dynamic_embedding.py \
  $T/embeddings/test_dynamic_gpu.py > "$O/tests.log" 2>&1
echo "tests rc=$?"; tail -4 "$O/tests.log"
timeout "$(left 90)" python3 $B/host_overhead.py --device cuda --kernel-backend triton --graphs layers \
  --variants plain,dynamic --steps 10 --profile-steps 5 --python-profile 40 --json "$O/host_layers.json" > "$O/host.log" 2>&1
echo "host rc=$?"; grep -E "^== |host reads|Triton launches" "$O/host.log"
# with what is left: the eager plain step (no graphs), whose host time the wait no longer adds to its GPU time
timeout "$(left 150)" python3 $B/e2e_step.py --standard --data-dir /tmp/e2e_standard \
  --variant "plain:model.relative_attention_bias=false" --steps 15 --profile-steps 2 --matmul-size 0 \
  --json "$O/e2e_eager.json" > "$O/e2e_eager.log" 2>&1
echo "eager rc=$?"; grep -E "^\| after|idle" "$O/e2e_eager.log"
