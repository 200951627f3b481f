"""The training loop: megatron's forward-backward schedule, optimizer and LR schedule,
periodic validation with early stopping, checkpoints, and a final evaluation of the best
validation weights."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_gr.compat import megatron_collective_deprecations_silenced, zero_grad
from megatron_gr.config.experiment import ExperimentConfig
from megatron_gr.data.prefetch import PrefetchingStream
from megatron_gr.models.registry import get_train_spec
from megatron_gr.training import checkpointing
from megatron_gr.training.checkpoint_layout import resolve_load
from megatron_gr.training.evaluation import evaluate
from megatron_gr.training.exit_conditions import ExitConditions
from megatron_gr.training.host_copy import HostCopy
from megatron_gr.training.model_setup import build_model, updated_weights
from megatron_gr.training.nonfinite import NonFiniteGuard, is_better
from megatron_gr.training.optimizer_setup import build_optimizer, build_scheduler
from megatron_gr.training.plan import make_plan
from megatron_gr.training.run_lock import hold_run_lock
from megatron_gr.training.run_logger import RunLogger
from megatron_gr.training.runtime import initialize
from megatron_gr.training.sparse_step import SparseTables
from megatron_gr.training.step_verdict import StepOutcome, choose_verdict
from megatron_gr.training.steps import forward_step_for, schedule_shapes


@dataclass
class _InFlight:
    """A launched step whose outcome the host has not read yet."""

    outcome: StepOutcome
    started: float  # time.perf_counter() at its launch
    number: int  # the step's number in the run (1 for the first)
    statistics: Optional[HostCopy]  # the dynamic tables' counters at its end, on their way to the host


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    best_metric: Optional[float] = None
    best_iteration: Optional[int] = None
    evals_since_best: int = 0


class Trainer:
    """Trains the model family ``config.model.type`` names (its :class:`TrainSpec`)."""

    def __init__(self, config: ExperimentConfig):
        self.config = config
        started = time.time()
        self.spec = get_train_spec(config.model.type)
        self.dataset = self.spec.build_dataset(config)
        self.plan = make_plan(config, table_rows=self.dataset.table_rows())
        self.runtime = initialize(
            config.training,
            tensor_parallel_size=self.plan.layout.tensor,
            pipeline_parallel_size=self.plan.layout.pipeline,
            context_parallel_size=self.plan.layout.context,
        )
        self.run_lock = hold_run_lock(config.checkpoint.save)  # before anything is written there
        self.exits = ExitConditions(config.training, start_time=started, device=self.runtime.device)
        self.model = build_model(self.plan, self.spec, self.dataset)
        self.optimizer = build_optimizer(config.training, self.runtime, self.model)
        self.sparse = SparseTables(self.model)
        self.verdict = choose_verdict(self.optimizer, self.sparse, self.runtime.device)
        self._in_flight: Optional[_InFlight] = None
        self.scheduler = build_scheduler(config.training, self.optimizer)
        # The next step's micro-batches are built (and copied to the GPU) while a step runs.
        stream = self.spec.training_stream(
            self.plan, self.dataset, parallel_state.get_data_parallel_rank(), self.plan.layout.data
        )
        self.loader = PrefetchingStream(stream, self.runtime.device, background=config.training.prefetch_batches)
        self.state = TrainState()
        self.best_weights: Optional[dict] = None
        self._validated_at: Optional[int] = None
        self.forward_backward = get_forward_backward_func()
        self.log = RunLogger(config.logging, enabled=self.runtime.is_main, total_steps=config.training.train_iters, start_step=0)
        self.log.info(self.dataset.describe())  # what the run trains on, once (main rank)
        if not self.verdict.defers:  # say why every step waits (e.g. SGD, or TE's or apex's Adam)
            self.log.info("each training step waits for its gradient norm on the host: the optimizer is not torch's fused Adam")
        self.nonfinite = NonFiniteGuard(config.training.max_nonfinite_steps)
        if config.checkpoint.load:
            self._resume(config.checkpoint.load)
        if config.checkpoint.save and self.runtime.is_main:
            Path(config.checkpoint.save).mkdir(parents=True, exist_ok=True)
            (Path(config.checkpoint.save) / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Trains to ``train_iters`` (or early stopping, or an exit condition); the final
        evaluation's results, or ``{"exited": reason, "iteration": step}``."""
        try:
            with self.exits:  # SIGTERM / SIGUSR1 set a flag checked after each step
                return self._train()
        finally:
            self.loader.close()  # joins the worker building the next step (nothing left running)
            if self.run_lock is not None:
                self.run_lock.release()

    def _train(self) -> dict:
        training = self.config.training
        self.log.advance(self.state.iteration)
        stop = False
        while self.state.iteration < training.train_iters and not stop:
            previous = self.launch_step()
            self.state.iteration += 1
            step = self.state.iteration
            if previous is not None:
                self._book(step - 1, previous)
            evaluate = bool(training.eval_interval) and step % training.eval_interval == 0
            save = bool(self.config.checkpoint.save_interval) and step % self.config.checkpoint.save_interval == 0
            if evaluate or save or step == training.train_iters or not self.verdict.defers:
                self._book(step, self.settle_step())  # what follows reads this step's weights and LR
            if evaluate:
                stop = self.validate()
            if save:
                self.save()
            reason = self.exits.check(step)
            if reason:
                if self._in_flight is not None:
                    self._book(step, self.settle_step())
                return self._exit(reason)
        if self._validated_at != self.state.iteration:
            self.validate()
        if self.config.checkpoint.save and not self._saved_at(self.state.iteration):
            self.save()
        return self.final_evaluation()

    def _book(self, step: int, record: dict) -> None:
        """The logs and the non-finite count of step ``step``, once its record is settled."""
        self.log.advance(step)
        skipped = self.nonfinite.observe(step, record, self.log)  # logs it; stops after N in a row
        if not skipped and self._logged(step, skipped=False):
            self.log.train(step, record)

    def _logged(self, step: int, *, skipped: bool) -> bool:
        return skipped or step % self.config.logging.log_interval == 0 or step == self.config.training.train_iters

    def train_step(self) -> dict:
        """One training step and its record (waits for the device to finish it)."""
        if self._in_flight is not None:
            raise RuntimeError("train_step: a launched step is still in flight (settle_step reads it first)")
        self.launch_step()
        return self.settle_step()

    @megatron_collective_deprecations_silenced()
    def launch_step(self) -> Optional[dict]:
        """Queues one training step on the device. A step still in flight is settled first,
        once this step's forward and backward are queued and before its optimizer reads the
        LR that settling may advance; returns that step's record, or None."""
        start = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        zero_grad(self.optimizer)
        batches = self.loader.next_step()
        outputs = self.forward_backward(
            forward_step_func=forward_step_for(self.spec, self.plan.device, training=True),
            data_iterator=iter(batches),
            model=self.model,
            num_microbatches=len(batches),
            **schedule_shapes(self.model[0].config, batches),
            forward_only=False,
        )
        totals = torch.zeros(3, dtype=torch.float64, device=self.runtime.device)
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            for out in outputs:
                totals[:2] += out["loss_sum_and_tokens"]
        if parallel_state.is_pipeline_first_stage() and parallel_state.get_tensor_model_parallel_rank() == 0 and (
            parallel_state.get_context_parallel_rank() == 0  # context-parallel ranks read the same batches
        ):
            # fill_ takes the count as a kernel argument; an assignment would copy it from
            # pageable host memory, which waits for the forward and backward just queued.
            totals[2].fill_(sum(b.num_tokens for b in batches))
        if dist.get_world_size() > 1:  # every rank knows the loss before the step
            dist.all_reduce(totals)
        previous = self.settle_step(now=start) if self._in_flight is not None else None
        outcome = self.verdict.launch(self.optimizer, totals)  # the dense weights and the tables' rows
        self.state.consumed_samples = self.loader.consumed_samples
        number = self.state.iteration + 1
        # the tables' counters at the step's end; their stored rows only where the step is
        # logged anyway (counting them reads the whole index; a skipped step logged off the
        # interval is logged without them)
        statistics = self.sparse.queue_statistics(occupancy=self._logged(number, skipped=False))
        self._in_flight = _InFlight(outcome, start, number, statistics)
        return previous

    def settle_step(self, now: Optional[float] = None) -> dict:
        """The record of the step in flight: reads its outcome (waiting for the device
        where it was decided there) and advances the LR schedule if it updated the weights
        (as in megatron's loop, a skipped step does not). Its time runs from its launch to
        ``now`` (the next launch, in the loop) or to the end of the read."""
        if self._in_flight is None:
            raise RuntimeError("settle_step: no training step in flight (launch_step queues one)")
        step, self._in_flight = self._in_flight, None
        updated, grad_norm, (loss_sum, count, tokens) = step.outcome.read()
        if updated:
            self.scheduler.step(increment=1)
        elapsed = (now if now is not None else time.perf_counter()) - step.started
        record = {
            "loss": _mean(loss_sum, count),
            "lr": self.optimizer.param_groups[0]["lr"],  # the next step's, as megatron logs it
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
            "skipped": not updated,
        }
        if self.runtime.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.runtime.device) / 2**30
        if self._logged(step.number, skipped=not updated):  # the tables' counters at the step's end
            record.update(self.sparse.statistics(step.statistics))
        return record

    # ------------------------------------------------------------ evaluation
    def evaluate(self, which: str) -> dict:
        with updated_weights(self.model):
            return evaluate(self.model, self.spec, self.plan, self.dataset, which)

    def validate(self) -> bool:
        """Validation metrics, best-weights bookkeeping; True when early stopping fires."""
        metrics = self.evaluate("valid")
        step = self._validated_at = self.state.iteration
        selection = self.spec.selection_metric
        value = metrics[selection]
        improved = is_better(value, self.state.best_metric)  # never a NaN
        if improved:
            self.state.best_metric, self.state.best_iteration, self.state.evals_since_best = value, step, 0
            with updated_weights(self.model):
                self.best_weights = _snapshot(self.model[0])
                if self.config.checkpoint.save and self.config.checkpoint.keep_best:
                    checkpointing.save_best(
                        self.config.checkpoint.save, self.model, {"iteration": step, selection: value}, config=self.config
                    )
        else:
            self.state.evals_since_best += 1
        self.log.evaluation(step, "valid", metrics, note="best so far" if improved else None)
        patience = self.config.training.early_stopping_patience
        if patience and self.state.evals_since_best >= patience:
            self.log.info(f"early stopping at step {step}: no better valid {selection} for {patience} evaluations")
            return True
        return False

    def final_evaluation(self) -> dict:
        """Valid and test metrics of the best validation weights."""
        if self.best_weights is not None:
            self.model[0].load_state_dict(self.best_weights)
        step = self.state.best_iteration if self.state.best_iteration is not None else self.state.iteration
        results = {"best_iteration": step}
        for which in ("valid", "test"):
            metrics = self.evaluate(which)
            results[which] = metrics
            self.log.evaluation(step, which, metrics, note="best validation weights")
        note = f"; {self.spec.evaluation_note}" if self.spec.evaluation_note else ""
        splits = " | ".join(
            f"{which} "
            + " ".join(f"{name.upper()} {results[which][name]:.4f}" for name in self.spec.headline_metrics if name in results[which])
            for which in ("valid", "test")
        )
        self.log.info(f"final (weights of step {step}{note}): {splits}")
        self.log.close()
        return results

    # ----------------------------------------------------------- checkpoints
    def save(self) -> None:
        with updated_weights(self.model):
            checkpointing.save_checkpoint(
                self.config.checkpoint.save, self.state.iteration, self.model, self.optimizer, self.scheduler,
                asdict(self.state), config=self.config,
            )
        self.log.info(f"saved checkpoint of step {self.state.iteration} to {self.config.checkpoint.save}")

    def _saved_at(self, iteration: int) -> bool:
        return checkpointing.latest_iteration(self.config.checkpoint.save) == iteration

    def _exit(self, reason: str) -> dict:
        """Saves (with ``--save``) and ends the run early, as Megatron does on a signal or
        an exit condition: no final evaluation."""
        step = self.state.iteration
        saved = "no --save directory, nothing saved"
        if self.config.checkpoint.save:
            if not self._saved_at(step):
                self.save()
            saved = f"checkpoint of step {step} in {self.config.checkpoint.save}"
        self.log.info(f"{reason} at step {step}: exiting ({saved})")
        self.log.close()
        return {"exited": reason, "iteration": step}

    def _resume(self, root: str) -> None:
        # best/ belongs to the run being resumed: loaded only when a checkpoint is (its
        # weights are snapshot, then the checkpoint's replace them in the model).
        if resolve_load(root, step=self.config.checkpoint.ckpt_step).directory is not None:
            if checkpointing.load_best(root, self.model, config=self.config, log=self.log.info) is not None:
                self.best_weights = _snapshot(self.model[0])
        train_state = checkpointing.load_checkpoint(
            root, self.model, self.optimizer, self.scheduler, config=self.config, log=self.log.info
        )
        if train_state is None:
            return
        self.state = TrainState(**{k: train_state[k] for k in asdict(TrainState())})
        self.loader.load_state_dict({"consumed_samples": self.state.consumed_samples})
        self.log.info(f"resumed from step {self.state.iteration} of {root}")


def _mean(total: float, count: float) -> float:
    return total / count if count else float("nan")


def _snapshot(module: torch.nn.Module) -> dict:
    """A host copy of the weights (non-tensor extra states kept as they are)."""
    return {
        k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
        for k, v in module.state_dict().items()
    }


def pretrain(config: ExperimentConfig) -> dict:
    return Trainer(config).train()
