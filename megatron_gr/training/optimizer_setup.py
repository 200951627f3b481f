"""Megatron's optimizer (fp32 main weights for bf16 models) and LR schedule from the
training section."""

from __future__ import annotations

from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_gr.compat import batch_main_to_model_copies, reuse_main_grad_views, use_fused_adam
from megatron_gr.config.training_config import TrainingConfig
from megatron_gr.training.runtime import Runtime


def build_optimizer(training: TrainingConfig, runtime: Runtime, model_chunks) -> MegatronOptimizer:
    """The distributed optimizer exactly when the model's DDP shards gradients for it
    (decided once, in ``model_setup``); torch's Adam in its fused kernel and the main-to-model
    weight copy as one for-each copy, the main shards' gradient views sliced once
    (``compat.fast_optimizer``)."""
    ddp_config = model_chunks[0].ddp_config
    config = OptimizerConfig(
        optimizer=training.optimizer,
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        bf16=runtime.bf16,
        params_dtype=runtime.params_dtype,
        use_distributed_optimizer=ddp_config.use_distributed_optimizer,
        overlap_param_gather=ddp_config.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    use_fused_adam(optimizer)
    batch_main_to_model_copies(optimizer)
    reuse_main_grad_views(optimizer)
    return optimizer


def build_scheduler(training: TrainingConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Steps are optimizer iterations: warm-up, then decay over ``decay_iters``."""
    warmup = min(training.lr_warmup_iters, training.decay_iters)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else training.lr,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=training.decay_iters,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=training.decay_iters,
        wd_incr_style="constant",
    )
