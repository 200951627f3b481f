"""Optimisation, schedule, evaluation cadence, precision and device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_gr.config.validation import check_choice, check_float_range, check_int_range, require

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
KERNEL_BACKENDS = ("auto", "pytorch", "triton")
CUDA_GRAPH_MODES = ("none", "layers", "step")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainingConfig:
    train_iters: int = 400
    """Total optimizer steps of the run; a resumed run continues up to this number."""

    micro_batch_size: int = 64
    """Sequences (users) per micro-batch on one data-parallel rank."""

    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks; None = micro_batch_size x data-parallel
    size. Larger values accumulate gradients over micro-batches."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """Dense optimizer (megatron's). SGD needs parallel.use_distributed_optimizer=false."""

    lr: float = 1e-3
    """Peak learning rate, reached after warm-up."""

    min_lr: float = 0.0
    """Learning rate at the end of decay."""

    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    """Steps over which the rate decays after warm-up; None = train_iters."""

    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"] = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""

    max_nonfinite_steps: int = 5
    """Stop the run (one line, exit code 2) after this many steps in a row whose loss or
    gradient norm is NaN or infinite. Such a step is always skipped: no weight, row or
    optimizer state moves and the LR schedule does not advance; the metrics file marks it
    ``skipped``. A few in a row can pass (a bad batch); more mean the run has diverged and
    every further step would be skipped too. 0 = never stop."""

    seed: int = 1234
    """Seeds parameters, dropout, negative sampling and data order."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 on a GPU, fp32 on the CPU."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when a GPU is visible, else the CPU."""

    kernel_backend: Literal["auto", "pytorch", "triton"] = "auto"
    """Implementation of every op that has a kernel (jagged attention and the STU output,
    the hyper-connection ops, dynamic-table probing and updates): ``pytorch``, the reference
    (any device); ``triton``, the Triton kernels (CUDA, ``pip install 'megatron_gr[gpu]'``;
    an error elsewhere); ``auto``, Triton on a GPU where it is installed, else PyTorch.
    Resolved once per run. The fused kernels draw other dropout masks than the reference.
    Replaces ``model.attention_kernel``, ``model.use_fused_mhc`` and
    ``embeddings.<table>.dynamic.kernel`` (still read, with a deprecation notice)."""

    cuda_graphs: Literal["none", "layers", "step"] = "none"
    """Replay the layers from CUDA graphs (GPU, Triton backend): ``layers``, each layer's
    forward and backward captured once per static token count; ``step``, the whole stack of
    the stage's layers as one graph per direction (no pipeline parallelism). Training batches
    are padded to those counts with sequences no real token attends to; the embedding
    lookups, the loss and the optimizer step run eagerly. Captured before training, for
    every count; each replay draws the step's keyed dropout masks (the eager step's). The
    native FP8 linears (``model.fp8``, every recipe) are captured too: they cast their
    weights on every replay, keep their amax histories in place and take amaxes over the
    real tokens, so a graphed step scales as the eager one. Not with context parallelism,
    Transformer Engine's FP8 linears, SASRec blocks or the ranking models. See
    ``docs/benchmarks/cuda_graphs.md``."""

    prefetch_batches: bool = True
    """Build the next step's micro-batches on a worker thread while this step runs (and, on
    a GPU, copy them on a side stream). Off: each step builds and copies its batches when it
    starts (the same batches: checkpoints and resumes do not depend on it)."""

    cuda_graph_max_tokens: int = 16384
    """Micro-batches of more tokens than this run eagerly (they keep the GPU busy anyway);
    the largest captured count, which bounds the graphs' memory."""

    eval_interval: int = 100
    """Evaluate on the validation split every N steps (0 = only at the end)."""

    eval_batch_size: int = 256
    """Sequences per evaluation batch."""

    early_stopping_patience: int = 0
    """Stop after this many evaluations without a better validation NDCG@10 (0 = off)."""

    exit_interval: Optional[int] = None
    """Save a checkpoint (with ``checkpoint.save``) and exit after every step that is a
    multiple of N, as Megatron's ``--exit-interval``; None = off."""

    exit_duration_in_mins: Optional[float] = None
    """Save a checkpoint and exit at the first step boundary after this many minutes of
    the run (all ranks agree), as Megatron's ``--exit-duration-in-mins``; None = off."""

    distributed_timeout_minutes: float = 10.0
    """How long a collective waits for the other ranks before the run stops with an error
    naming the rank (Megatron's default, 10). Raise it when one rank legitimately works
    alone for long, e.g. reading a large data set before the first collective."""

    def __post_init__(self):
        check_int_range("train_iters", self.train_iters, low=1)
        check_int_range("micro_batch_size", self.micro_batch_size, low=1)
        if self.global_batch_size is not None:
            check_int_range("global_batch_size", self.global_batch_size, low=1)
            require(
                self.global_batch_size % self.micro_batch_size == 0,
                f"global_batch_size={self.global_batch_size} must be a multiple of "
                f"micro_batch_size={self.micro_batch_size}",
            )
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_float_range("lr", self.lr, low=0.0, low_exclusive=True)
        check_float_range("min_lr", self.min_lr, low=0.0)
        require(self.min_lr <= self.lr, f"min_lr={self.min_lr} must not exceed lr={self.lr}")
        check_int_range("lr_warmup_iters", self.lr_warmup_iters, low=0)
        if self.lr_decay_iters is not None:
            check_int_range("lr_decay_iters", self.lr_decay_iters, low=1)
        require(
            self.lr_warmup_iters < self.decay_iters,
            f"lr_warmup_iters={self.lr_warmup_iters} must be smaller than the decay length "
            f"{self.decay_iters} (lr_decay_iters, or train_iters when unset)",
        )
        check_choice("lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        check_float_range("weight_decay", self.weight_decay, low=0.0)
        check_float_range("adam_beta1", self.adam_beta1, low=0.0, high=1.0)
        check_float_range("adam_beta2", self.adam_beta2, low=0.0, high=1.0)
        check_float_range("adam_eps", self.adam_eps, low=0.0, low_exclusive=True)
        check_float_range("clip_grad", self.clip_grad, low=0.0)
        check_int_range("max_nonfinite_steps", self.max_nonfinite_steps, low=0)
        check_int_range("seed", self.seed, low=0, high=2**63 - 1)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("device", self.device, DEVICES)
        check_choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        check_choice("cuda_graphs", self.cuda_graphs, CUDA_GRAPH_MODES)
        check_int_range("cuda_graph_max_tokens", self.cuda_graph_max_tokens, low=128)
        check_int_range("eval_interval", self.eval_interval, low=0)
        check_int_range("eval_batch_size", self.eval_batch_size, low=1)
        check_int_range("early_stopping_patience", self.early_stopping_patience, low=0)
        if self.exit_interval is not None:
            check_int_range("exit_interval", self.exit_interval, low=1)
        if self.exit_duration_in_mins is not None:
            check_float_range("exit_duration_in_mins", self.exit_duration_in_mins, low=0.0, low_exclusive=True)
        check_float_range("distributed_timeout_minutes", self.distributed_timeout_minutes, low=0.0, low_exclusive=True)

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters
