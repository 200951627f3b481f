#!/usr/bin/env bash
# One GPU call (under 10 minutes) for the "dynamic table within 10% of plain" row of
# docs/benchmarks/e2e.md: the standard shape with layer graphs, the plain table beside the
# dynamic one, the dynamic one also with the package of an older tree (c002eae: four
# device reads per step in its lookups; `git archive c002eae megatron_gr | tar -x -C DIR`)
# and the loss curves of the two compared; then the GPU tests of the lookup paths and the
# host profile with graphs (the tests get what is left of the call's ten minutes: on an H100
# that is about 80% of them; the rest need a call of their own). Run from the repository root with megatron-core importable:
#
#     bash tools/benchmarks/dynamic_reads_check.sh DIR     # writes logs and JSON to $OUT (default ./out)
source "$(dirname "$0")/device_call_setup.sh"

timeout "$(left 330)" python3 $B/e2e_step.py --standard --data-dir /tmp/e2e_standard --tree "$before" \
  --tree-variants dynamic_layers --variant "plain_layers:$G" --variant "dynamic_layers:$G,$D" \
  --steps 15 --profile-steps 2 --matmul-size 4096 --loss-parity before/dynamic_layers,after/dynamic_layers \
  --json "$O/e2e_dynamic_reads.json" --markdown "$O/e2e_dynamic_reads.md" > "$O/e2e.log" 2>&1
echo "e2e rc=$?"; grep -E "^\| (before|after)|^loss parity" "$O/e2e.log"
timeout "$(left 100)" python3 $B/host_overhead.py --device cuda --kernel-backend triton --graphs layers \
  --variants plain,dynamic --steps 20 --json "$O/host_layers.json" > "$O/host.log" 2>&1
echo "host rc=$?"; grep -E "^== |host reads|Triton launches" "$O/host.log"
timeout "$(left 400)" python3 -m pytest -q -rfE $T/training/test_step_device_waits.py $T/ops/test_padded_groups.py \
  $T/embeddings/test_dynamic_lookup_many.py $T/embeddings/test_dynamic_gpu.py $T/ops/test_triton_dynamic_embedding.py \
  $T/ops/test_uvqk_activation.py $T/ops/test_stu_output.py $T/transformer/test_stu_layer_triton.py \
  $T/ops/test_triton_mhc.py > "$O/tests.log" 2>&1
echo "tests rc=$?"; tail -4 "$O/tests.log"
