"""Where a run reports: a progress display, a JSON-lines metrics file, tensorboard.

Only the main rank writes; every record is one JSON object per line:
``{"step", "loss", "lr", "tokens_per_s", ...}`` for training and
``{"step", "split", <metric>: value, ...}`` for evaluations (retrieval: ``hr@10``,
``ndcg@10``, ..., ``mrr``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_gr.config.logging_config import LoggingConfig


class RunLogger:
    def __init__(self, config: LoggingConfig, *, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.metrics = None
        self.tensorboard = None
        self.bar = None
        mode = config.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "off"
        if not enabled:
            return
        if config.metrics_file:
            path = Path(config.metrics_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.metrics = path.open("a", buffering=1)
        if config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=config.tensorboard_dir)
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._start = time.perf_counter()
        self._start_step = start_step
        self._total = total_steps

    def _write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def train(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **record}
        self._write(record)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        elif self.mode == "lines":
            done = step - self._start_step
            elapsed = time.perf_counter() - self._start
            eta = elapsed / max(done, 1) * (self._total - step)
            print(
                f"step {step:>6}/{self._total} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
                f"{record['tokens_per_s']:.0f} tok/s | eta {_format_seconds(eta)}",
                flush=True,
            )

    def evaluation(self, step: int, split: str, metrics: dict[str, float], note: Optional[str] = None) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "split": split, **metrics})
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(f"{split}/{key}", value, step)
        summary = " ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        self.info(f"[eval {split} @ step {step}] {summary}" + (f" ({note})" if note else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
