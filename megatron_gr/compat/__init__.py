"""Workarounds for megatron-core 0.16.1, kept in one package: no other module of megatron_gr
patches megatron-core, reads its private attributes or calls its private functions.

One module per concern, one function per shim, each saying what it patches and why:

- ``cpu_mode``: megatron-core on the CPU inside ``with cpu_mode():``, restored on exit
  (``cuda_to_cpu`` and ``cpu_rng`` hold its device redirect and RNG tracker);
- ``dist_optimizer``: the distributed optimizer's reshardable checkpoints (any device);
- ``grad_accumulation``: DDP's gradient accumulation, one for-each add per backward pass;
- ``fast_optimizer``: the optimizer step without a host read per parameter, fused Adam,
  one for-each main-to-model copy;
- ``checkpoint_writes``: checkpoint saves without a helper process that outlives the run;
- ``optimizer_step``: megatron's optimizer step in two halves, for dynamic-table rows;
- ``recompute``: ``CheckpointWithoutOutput`` replayed in our order, a block's full recompute;
- ``quiet``: megatron-core's own warnings, silenced around our calls into it;
- ``export``: megatron's blocks traced by ``torch.export`` (serving programs);
- ``te``: whether Transformer Engine is installed;
- ``version``: the megatron-core version the shims were written for, and its guard.
"""

from megatron_gr.compat.checkpoint_writes import checkpoint_writes_without_manager_process
from megatron_gr.compat.cpu_mode import cpu_mode, cpu_mode_active
from megatron_gr.compat.export import traceable_viewless_tensors
from megatron_gr.compat.dist_optimizer import (
    allocate_distributed_optimizer_state,
    keep_adam_step_on_reshardable_load,
    reshardable_state_in_buffer_coordinates,
)
from megatron_gr.compat.grad_accumulation import batched_main_grad_accumulation
from megatron_gr.compat.fast_optimizer import (
    batch_main_to_model_copies,
    fast_optimizer_ops,
    reuse_main_grad_views,
    use_fused_adam,
)
from megatron_gr.compat.optimizer_step import clip_grads_and_step, prepare_grads_and_norm
from megatron_gr.compat.quiet import load_distributed_checkpoint, megatron_collective_deprecations_silenced, zero_grad
from megatron_gr.compat.recompute import (
    checkpoint_without_output_fp8_arg,
    checkpointed_block_forward,
    checkpointed_outputs,
    leave_output_out_of_replay,
    new_checkpoint_without_output,
    replay_checkpoint,
)
from megatron_gr.compat.te import transformer_engine_available
from megatron_gr.compat.version import WRITTEN_FOR, MegatronVersionError, MegatronVersionWarning

__all__ = [
    "WRITTEN_FOR",
    "MegatronVersionError",
    "MegatronVersionWarning",
    "allocate_distributed_optimizer_state",
    "batch_main_to_model_copies",
    "batched_main_grad_accumulation",
    "checkpoint_without_output_fp8_arg",
    "checkpoint_writes_without_manager_process",
    "checkpointed_block_forward",
    "checkpointed_outputs",
    "clip_grads_and_step",
    "cpu_mode",
    "cpu_mode_active",
    "fast_optimizer_ops",
    "keep_adam_step_on_reshardable_load",
    "leave_output_out_of_replay",
    "load_distributed_checkpoint",
    "megatron_collective_deprecations_silenced",
    "new_checkpoint_without_output",
    "prepare_grads_and_norm",
    "replay_checkpoint",
    "reshardable_state_in_buffer_coordinates",
    "reuse_main_grad_views",
    "traceable_viewless_tensors",
    "transformer_engine_available",
    "use_fused_adam",
    "zero_grad",
]
