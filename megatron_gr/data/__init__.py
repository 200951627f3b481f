"""Raw events -> per-user sequences -> jagged batches.

Readers (MovieLens) and the synthetic generator produce :class:`RawEvents` in file order;
:func:`build_sequences` groups them into time-sorted :class:`UserSequences`, which the prepared
format stores on disk and :class:`LeaveOneOutSplit` splits for training and evaluation.
"""

from megatron_gr.data.duplicates import duplicate_events
from megatron_gr.data.errors import DataFormatError
from megatron_gr.data.movielens import MOVIELENS_FORMATS, read_movielens
from megatron_gr.data.prepared import is_prepared, load_prepared, save_prepared
from megatron_gr.data.sequences import LeaveOneOutSplit, RawEvents, UserSequences
from megatron_gr.data.sources import (
    RAW_FORMATS, build_sequences, infer_source, load_events, load_sequences, resolve_source,
)
from megatron_gr.data.summary import DataReport, SequenceSummary
from megatron_gr.data.synthetic import SyntheticSpec, generate


def __getattr__(name):
    # JaggedBatch needs torch (1-2 s to import); loading it on first use keeps numpy-only
    # users such as tools/prepare_data.py quick to start.
    if name == "JaggedBatch":
        from megatron_gr.data.jagged import JaggedBatch

        return JaggedBatch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataFormatError",
    "DataReport",
    "JaggedBatch",
    "LeaveOneOutSplit",
    "MOVIELENS_FORMATS",
    "RAW_FORMATS",
    "RawEvents",
    "SequenceSummary",
    "SyntheticSpec",
    "UserSequences",
    "build_sequences",
    "duplicate_events",
    "generate",
    "infer_source",
    "is_prepared",
    "load_events",
    "load_prepared",
    "load_sequences",
    "read_movielens",
    "resolve_source",
    "save_prepared",
]
