"""``training.cuda_graphs``: the layers of a stage replayed from CUDA graphs, one capture per
static token count.

Small jagged steps are bound by the host: every layer is dozens of kernel launches, each
costing Python, autograd and driver time. With ``layers`` each STU layer's forward and
backward (``step``: the whole stack of the stage's layers, expansion and contraction of
hyper-connection streams included) are captured once per token bucket and replayed per
micro-batch: one launch per layer and direction.

How it fits the model:

- Static shapes. Training batches are padded to a few token counts, with padding
  sequences no real token attends to (``transformer/graph_buckets.py``, applied by the
  model's ``TokenSplit``), and a fixed number of sequences and longest length, so the
  attention kernels' grids are fixed too. Micro-batches larger than the last bucket
  (``training.cuda_graph_max_tokens``) run eagerly: they are bound by the GPU anyway.
- Autograd. A captured unit is one autograd node: its forward copies the input into the
  graph's static input and replays the forward graph; its backward replays the backward
  graph, which leaves the input and parameter gradients in static buffers; autograd then
  accumulates the parameter gradients as usual, so megatron's DDP hooks add them to the
  main gradients. Consecutive units share their static tensors, so inside a stack no copy
  is made. A unit is captured (and warmed up) on aliases of its parameters made in the
  capture, its gradients taken with respect to them: the parameters' own gradient nodes
  live on the default stream, which a capture on a side stream must not make wait
  (``graph_aliases``).
- Memory. All buckets of one in-flight micro-batch share one graph memory pool (one
  micro-batch runs forward then backward before the next, so the captures never overlap
  in time); under pipeline parallelism each in-flight micro-batch gets its own pool.
- Per-batch inputs. Offsets, timestamps, the tokens' dropout keys and the step's dropout
  stream words of every site live in static tensors written before each replay
  (``graph_inputs.StaticBatch``): keyed dropout reads its words from the device, so a
  replay draws the step's masks, the eager step's. Megatron's RNG tracker is created
  graph-safe (``runtime``) and its generator states are registered with every graph too.
- FP8 linears (every recipe, ``transformer/fp8/graph_capture.py``). Captured, they cast
  their weights on every replay, choose delayed scales on the device and take their amaxes
  over the real tokens only (the batch's keys tell the padding); their amax histories are
  updated in place, and the warm-ups' and captures' amaxes are taken back out (one
  ``state_kept`` around ``capture_all``), so the first graphed step scales as the eager
  first step.
- Capture happens once, before training (``capture_all``): every bucket, every slot.

What the plan refuses (``training/plan.py``): a CPU run, the PyTorch kernel backend (its
reference attention reads lengths on the host), full-layer or mHC recompute, ``step``
under pipeline parallelism, context parallelism, Transformer Engine's FP8 linears (their
FP8 state lives outside the layers, in TE's autocast), SASRec blocks and the ranking
models (``model.type: ranking``).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from megatron.core.tensor_parallel import random as mp_random

from megatron_gr.training.graph_aliases import parameter_aliases, trainable_parameters
from megatron_gr.training.graph_inputs import StaticBatch, WordTables
from megatron_gr.transformer.dropout_sites import num_sites
from megatron_gr.transformer.fp8.graph_capture import Fp8GraphCapture
from megatron_gr.transformer.graph_buckets import TokenBuckets, padded_offsets
from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams

WARMUP_RUNS = 2
"""Eager forward-backward runs before a capture (compile Triton kernels, settle the allocator)."""

_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, GraphRunner]" = weakref.WeakKeyDictionary()


@dataclass
class _Unit:
    """One captured callable: ``run(hidden, batch) -> hidden`` of ``module``."""

    module: torch.nn.Module
    run: Callable[[torch.Tensor, StaticBatch], torch.Tensor]
    params: list[torch.nn.Parameter] = field(init=False)
    """The module's trainable parameters, listed once (every replay hands them to autograd)."""

    def __post_init__(self):
        self.params = trainable_parameters(self.module)

    def run_aliased(self, hidden: torch.Tensor, batch: StaticBatch) -> tuple[torch.Tensor, ...]:
        """``(output, *aliases)``: the unit run on its parameters' aliases made now, in the
        order of :attr:`params` (``graph_aliases``: its gradients are taken with respect to them)."""
        with parameter_aliases(self.module) as aliases:
            return (self.run(hidden, batch), *aliases)


@dataclass
class _Captured:
    """The graphs of every unit for one (bucket, slot) and their static tensors."""

    batch: StaticBatch
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    grad_outputs: list[torch.Tensor] = field(default_factory=list)
    grad_inputs: list[Optional[torch.Tensor]] = field(default_factory=list)
    grad_params: list[list[Optional[torch.Tensor]]] = field(default_factory=list)
    forward_graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    backward_graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    slot: int = 0


class _Replay(torch.autograd.Function):
    """Unit ``index`` of a captured set as one autograd node."""

    @staticmethod
    def forward(ctx, runner, captured, index, hidden, *params):
        _copy_if_other(captured.inputs[index], hidden)
        captured.forward_graphs[index].replay()
        ctx.runner, ctx.captured, ctx.index = runner, captured, index
        return captured.outputs[index].detach()

    @staticmethod
    def backward(ctx, grad_output):
        captured, index = ctx.captured, ctx.index
        _copy_if_other(captured.grad_outputs[index], grad_output)
        captured.backward_graphs[index].replay()
        if index == 0:
            ctx.runner.release(captured)
        grad_input = captured.grad_inputs[index]
        params = [g.detach() if g is not None else None for g in captured.grad_params[index]]
        return (None, None, None, grad_input.detach() if grad_input is not None else None, *params)


def _copy_if_other(static: torch.Tensor, value: torch.Tensor) -> None:
    if value.data_ptr() != static.data_ptr():
        static.copy_(value)


class _EmulatedGraph:
    """CPU tests only: a "graph" that runs the work it recorded again and writes the results
    into the tensors the capture returned, as a replayed CUDA graph writes its static
    outputs; it keeps the fresh autograd graph of a forward for the backward's replay."""

    def __init__(self, work: Callable, outputs):
        self.work, self.outputs, self.fresh = work, outputs, None

    def replay(self) -> None:
        with torch.enable_grad():
            self.fresh = self.work()
        with torch.no_grad():
            for static, value in zip(_as_list(self.outputs), _as_list(self.fresh)):
                if static is not None and value is not None:
                    _copy_if_other(static, value)  # a parameter's alias: already there


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class GraphRunner:
    """Captures a chain of units (the layers of a stage, or the stack as one unit) for
    every token bucket and in-flight slot, and replays them. ``emulate`` (CPU tests): the
    same bookkeeping with :class:`_EmulatedGraph` instead of CUDA graphs."""

    def __init__(self, units: list[_Unit], buckets: TokenBuckets, *, width: int, dtype: torch.dtype,
                 device: torch.device, num_slots: int, split: int, dropout_sites: int, query_time: bool = False,
                 emulate: bool = False):
        self.units = units
        self.buckets = buckets
        self.width, self.dtype, self.device = width, dtype, device
        self.split = split  # sequence-parallel size: each rank holds bucket / split tokens
        self.emulate = emulate
        self.query_time = query_time  # the layers read query timestamps (time_bias_origin='query')
        self.fp8 = Fp8GraphCapture(unit.module for unit in units)
        self.words = WordTables(dropout_sites, pin=not emulate)
        self.pools = [None if emulate else torch.cuda.graph_pool_handle() for _ in range(num_slots)]
        self.captured: dict[tuple[int, int], _Captured] = {}
        self.busy: set[int] = set()
        self.current: Optional[_Captured] = None  # the set of the micro-batch in its forward pass
        self.replays = 0
        self.eager_calls = 0
        self.capture_memory_bytes = 0

    # ------------------------------------------------------------------ replay
    def replay(self, index: int, hidden: torch.Tensor, params: JaggedSeqParams) -> Optional[torch.Tensor]:
        """Unit ``index`` on ``hidden`` from its graph, or None when no captured set fits
        (the caller runs it eagerly)."""
        captured = self._set_for(index, hidden, params)
        if captured is None:
            self.eager_calls += 1
            return None
        self.replays += 1
        if index == 0:  # the units of a set share its batch
            captured.batch.write(params, self.words)
        return _Replay.apply(self, captured, index, hidden, *self.units[index].params)

    def _set_for(self, index: int, hidden: torch.Tensor, params: JaggedSeqParams) -> Optional[_Captured]:
        if not (torch.is_grad_enabled() and hidden.requires_grad and self.units[index].module.training):
            return None
        if index > 0:
            current = self.current
            return current if current is not None and self._fits(current, index, hidden, params) else None
        bucket = hidden.shape[0] * self.split
        self.current = None
        for slot in range(len(self.pools)):
            captured = self.captured.get((bucket, slot))
            if slot not in self.busy and captured is not None and self._fits(captured, index, hidden, params):
                self.busy.add(slot)
                self.current = captured
                break
        return self.current

    def _fits(self, captured: _Captured, index: int, hidden: torch.Tensor, params: JaggedSeqParams) -> bool:
        static = captured.inputs[index]
        return (
            hidden.shape == static.shape and hidden.dtype == static.dtype
            and params.max_len == self.buckets.max_seq_len and captured.batch.fits(params)
        )

    def release(self, captured: _Captured) -> None:
        self.busy.discard(captured.slot)

    # ----------------------------------------------------------------- capture
    def capture_all(self) -> None:
        """Captures every bucket for every slot (before training; a few eager
        forward-backward runs of each chain first)."""
        free_before = None if self.emulate else torch.cuda.mem_get_info(self.device)[0]
        with self.fp8.state_kept():  # FP8 linears as captured; their amax histories untouched
            for slot in range(len(self.pools)):
                for bucket in self.buckets.sizes:
                    self.captured[(bucket, slot)] = self._capture(bucket, slot)
        if not self.emulate:
            torch.cuda.synchronize(self.device)
            self.capture_memory_bytes = max(free_before - torch.cuda.mem_get_info(self.device)[0], 0)

    def _sample(self, bucket: int) -> tuple[torch.Tensor, StaticBatch]:
        """A valid padded batch of ``bucket`` tokens: sequences of the longest length."""
        capacity = self.buckets.capacity(bucket)
        empty = torch.zeros(1, dtype=torch.int64, device=self.device)
        offsets = padded_offsets(empty, padding=bucket, slots=capacity, max_seq_len=self.buckets.max_seq_len)
        hidden = torch.randn(bucket // self.split, 1, self.width, device=self.device, dtype=self.dtype)
        batch = StaticBatch.sample(offsets, bucket=bucket, split=self.split, sites=self.words.sites,
                                   query_time=self.query_time, device=self.device)
        return hidden, batch

    def _capture(self, bucket: int, slot: int) -> _Captured:
        hidden, batch = self._sample(bucket)
        stream = None
        if not self.emulate:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for _ in range(WARMUP_RUNS):
                self.fp8.captured(self._eager_chain, batch.token_keys)(hidden, batch)
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        captured = _Captured(batch=batch, slot=slot)
        aliases = []  # of each unit's parameters, made in its forward capture (graph_aliases)
        value = hidden
        for unit in self.units:  # forward graphs, in replay order
            static_in = value.detach().requires_grad_()
            run = functools.partial(unit.run_aliased, static_in, batch)
            graph, (value, *unit_aliases) = self._record(slot, stream, run, batch)
            captured.inputs.append(static_in)
            captured.outputs.append(value)
            captured.forward_graphs.append(graph)
            aliases.append(unit_aliases)
        grad = torch.zeros_like(value)
        backward = []
        for index in reversed(range(len(self.units))):  # backward graphs, in replay order
            forward = captured.forward_graphs[index]

            def work(index=index, grad=grad, forward=forward):
                # Emulated: the latest forward run's output and aliases (each run makes new ones).
                if isinstance(forward, _EmulatedGraph) and forward.fresh is not None:
                    output, *unit_aliases = forward.fresh
                else:
                    output, unit_aliases = captured.outputs[index], aliases[index]
                inputs = [captured.inputs[index], *unit_aliases]
                return torch.autograd.grad(output, inputs, grad_outputs=grad, allow_unused=True)

            graph, grads = self._record(slot, stream, work, batch)
            backward.append((graph, grad, grads[0], list(grads[1:])))
            grad = grads[0] if grads[0] is not None else torch.zeros_like(captured.inputs[index])
        for graph, grad_out, grad_in, grad_params in reversed(backward):
            captured.backward_graphs.append(graph)
            captured.grad_outputs.append(grad_out)
            captured.grad_inputs.append(grad_in)
            captured.grad_params.append(grad_params)
        return captured

    def _record(self, slot: int, stream, work: Callable, batch: StaticBatch):
        """(graph, outputs) of ``work`` on ``batch`` captured into slot ``slot``'s memory pool."""
        work = self.fp8.captured(work, batch.token_keys)  # FP8 linears as captured (emulated: on every replay)
        if self.emulate:
            outputs = work()
            return _EmulatedGraph(work, outputs), outputs
        graph = torch.cuda.CUDAGraph()
        for state in _rng_states():
            graph.register_generator_state(state)
        with torch.cuda.graph(graph, pool=self.pools[slot], stream=stream, capture_error_mode="thread_local"):
            outputs = work()
        return graph, outputs

    def _eager_chain(self, hidden, batch: StaticBatch) -> None:
        value = hidden.detach().requires_grad_()
        out, aliases = value, []
        for unit in self.units:  # as captured: on aliases (not to touch the parameters' nodes)
            out, *unit_aliases = unit.run_aliased(out, batch)
            aliases += unit_aliases
        torch.autograd.grad(out, [value, *aliases], grad_outputs=torch.ones_like(out), allow_unused=True)

    def statistics(self) -> dict:
        return {
            "cuda_graphs/captured_sets": len(self.captured),
            "cuda_graphs/replays": self.replays,
            "cuda_graphs/eager_calls": self.eager_calls,
            "cuda_graphs/capture_memory_gib": self.capture_memory_bytes / 2**30,
        }


def _rng_states() -> list:
    """Megatron's tracker states (graph-safe generators; ``runtime`` creates them so)."""
    return [state for state in mp_random.get_all_rng_states().values() if isinstance(state, torch.Generator)]


def graph_runner(model: torch.nn.Module) -> Optional[GraphRunner]:
    """The runner of a model whose layers are graphed, else None."""
    return _RUNNERS.get(model)


def apply_cuda_graphs(model: torch.nn.Module, *, mode: str, max_tokens: int, micro_batch_size: int,
                      num_slots: int, sequence_parallel_size: int, emulate: bool = False) -> Optional[GraphRunner]:
    """Graphs ``model``'s layers (``mode`` ``layers``) or its whole stack (``step``), pads its
    training batches to the buckets, captures everything; returns the runner. ``emulate``:
    CPU tests (see :class:`GraphRunner`)."""
    if mode == "none":
        return None
    config = model.config
    split = sequence_parallel_size if config.sequence_parallel else 1
    buckets = TokenBuckets.build(max_tokens=min(max_tokens, micro_batch_size * config.max_seq_len),
                                 max_seq_len=config.max_seq_len, max_sequences=micro_batch_size, multiple_of=split)
    decoder = model.decoder
    streams = config.num_residual_streams if config.enable_hyper_connections else 1
    if mode == "layers":  # every layer reads the n residual streams (expanded before the first)
        # A graphed layer takes and returns the streams as tensors: a hyper-connection block
        # must not leave a merge pending across layers (transformer/mhc_pending.py), so its
        # layers run their own merges (the stack graphed whole, ``step``, keeps the fusion).
        if getattr(decoder, "fuse_merges", False):
            decoder.fuse_merges = False
        originals = [layer.forward for layer in decoder.layers]
        units = [
            _Unit(layer, _run_layer(original, config.max_seq_len)) for layer, original in zip(decoder.layers, originals)
        ]
        width = config.hidden_size * streams
    else:  # the stack reads the stage's input (plan: step runs without pipeline parallelism)
        units = [_Unit(decoder, _run_stack(decoder.forward, config.max_seq_len))]
        width = config.hidden_size
    query_time = config.relative_attention_bias and config.time_bias_origin == "query"
    runner = GraphRunner(units, buckets, width=width, dtype=config.params_dtype,
                         device=next(model.parameters()).device, num_slots=num_slots, split=split,
                         dropout_sites=num_sites(config.num_layers), query_time=query_time, emulate=emulate)
    if mode == "layers":
        for index, (layer, original) in enumerate(zip(decoder.layers, originals)):
            layer.forward = _graphed_layer_forward(runner, index, original)
    else:
        decoder.forward = _graphed_stack_forward(runner, decoder.forward)
    model.token_buckets = buckets
    runner.capture_all()
    _RUNNERS[model] = runner
    return runner


def _run_layer(forward, max_len: int):
    def run(hidden, batch: StaticBatch):
        return forward(hidden_states=hidden, packed_seq_params=batch.seq_params(max_len))[0]

    return run


def _run_stack(forward, max_len: int):
    def run(hidden, batch: StaticBatch):
        return forward(hidden_states=hidden, attention_mask=None, packed_seq_params=batch.seq_params(max_len))

    return run


def _plain_call(attention_mask, packed_seq_params, kwargs: dict, context=None) -> bool:
    """Whether a layer or stack is called as the retrieval model calls it (nothing to
    capture beyond hidden states and jagged metadata)."""
    return (
        attention_mask is None and context is None and isinstance(packed_seq_params, JaggedSeqParams)
        and all(value is None for value in kwargs.values())
    )


def _graphed_layer_forward(runner: GraphRunner, index: int, original):
    def forward(hidden_states, attention_mask=None, context=None, packed_seq_params=None, **kwargs):
        if _plain_call(attention_mask, packed_seq_params, kwargs, context):
            out = runner.replay(index, hidden_states, packed_seq_params)
            if out is not None:
                return out, context
        return original(hidden_states, attention_mask=attention_mask, context=context,
                        packed_seq_params=packed_seq_params, **kwargs)

    return forward


def _graphed_stack_forward(runner: GraphRunner, original):
    def forward(hidden_states, attention_mask=None, packed_seq_params=None, **kwargs):
        if hidden_states is not None and _plain_call(attention_mask, packed_seq_params, kwargs):
            out = runner.replay(0, hidden_states, packed_seq_params)
            if out is not None:
                return out
        return original(hidden_states=hidden_states, attention_mask=attention_mask,
                        packed_seq_params=packed_seq_params, **kwargs)

    return forward
