"""Fixes for the distributed optimizer's reshardable checkpoints (megatron-core 0.16.1, any
device): each function says what it patches or works around, and why."""

from __future__ import annotations

import functools

from megatron_gr.compat.version import require


def allocate_distributed_optimizer_state(optimizer) -> None:
    """Works around (patches nothing): a ``DistributedOptimizer`` that has not stepped yet
    cannot describe its state for loading when the inner optimizer is torch's Adam (no
    apex/TE, any device): ``state_dict()`` reads the Adam ``step`` of every parameter and
    asserts there is exactly one. Megatron's own dummy step (zero gradients) allocates the
    state; loading then overwrites all of it, main weights included."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    purpose = "allocate optimizer state before a load"
    require(DistributedOptimizer, "_init_optimizer_states_with_dummy_values", purpose=purpose)
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


@functools.lru_cache(maxsize=None)
def keep_adam_step_on_reshardable_load() -> None:
    """Patches ``DistributedOptimizer._set_main_param_and_optimizer_states`` (any device,
    once). With torch's Adam every parameter's state holds a ``step`` tensor. Loading the
    ``fully_reshardable`` format, megatron first sets every parameter's ``step`` to one
    shared tensor (restored from the parameter groups), then copies every state key from
    the loaded tensors, which do not hold ``step`` (KeyError). The patched method keeps the
    restored step and gives each parameter its own copy: Adam increments ``step`` in place,
    so a shared tensor would count one step per parameter and skew the bias correction."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    purpose = "keep Adam's step on a reshardable load"
    require(DistributedOptimizer, "_set_main_param_and_optimizer_states", purpose=purpose)
    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                state["step"] = state["step"].clone()
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


@functools.lru_cache(maxsize=None)
def reshardable_state_in_buffer_coordinates() -> None:
    """Patches ``DistributedOptimizer.sharded_param_state_fully_reshardable`` (any device,
    once). It gathers the optimizer state into one tensor per buffer with the padding at the
    end of each bucket removed (``get_parameter_state_dp_zero``), then cuts each parameter
    out at its offset in the padded buffer (``param_index_map``). With more than one bucket
    (a small ``ddp_bucket_size``; the item table's own bucket under pipeline parallelism)
    every later bucket's parameters get another parameter's state (megatron notes the
    symptom as its issue #504). The patched method lays the gathered state out like the
    buffer, padding included, before cutting."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    purpose = "save reshardable optimizer state of several buckets"
    require(DistributedOptimizer, "sharded_param_state_fully_reshardable", purpose=purpose)
    require(DistributedOptimizer, "get_parameter_state_dp_zero", purpose=purpose)
    original = DistributedOptimizer.sharded_param_state_fully_reshardable

    def in_buffer_coordinates(self, state):
        for gbuf_idx, by_dtype in state.items():
            if not isinstance(gbuf_idx, int):
                continue  # the "buckets_coalesced" flag
            buffer = self.buffers[gbuf_idx]
            for world in by_dtype.values():
                for key in ("param", "exp_avg", "exp_avg_sq"):
                    if key not in world:
                        continue
                    padded = world[key].new_zeros(buffer.grad_data.numel())
                    start = 0
                    for bucket in buffer.buckets:
                        padded[bucket.offset : bucket.offset + bucket.numel_unpadded] = world[key][start : start + bucket.numel_unpadded]
                        start += bucket.numel_unpadded
                    world[key] = padded
        return state

    def sharded_param_state(self, *args, **kwargs):
        gather = self.get_parameter_state_dp_zero

        def gather_in_buffer_coordinates(*a, **k):
            state = gather(*a, **k)
            return None if state is None else in_buffer_coordinates(self, state)

        self.get_parameter_state_dp_zero = gather_in_buffer_coordinates
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero

    DistributedOptimizer.sharded_param_state_fully_reshardable = sharded_param_state
