"""DLRM-HSTU ranking: input encoders and preprocessor, the target-aware STU model, the
multi-task tower, ranking metrics and the ``ranking`` TrainSpec (``spec.py``)."""

from megatron_gr.models.ranking.metrics import auc, grouped_auc, log_loss, mean_squared_error
from megatron_gr.models.ranking.model import CandidateScores, DLRMHSTUModel

__all__ = ["CandidateScores", "DLRMHSTUModel", "auc", "grouped_auc", "log_loss", "mean_squared_error"]
