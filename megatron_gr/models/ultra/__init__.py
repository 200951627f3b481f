"""ULTRA-HSTU on the ranking model: mixture of transducers (one STU stack per behaviour
channel), attention truncation and selective rematerialization; ``model.transducers``
(or truncation/rematerialization settings) on a ``model.type: ranking`` config picks it."""

from megatron_gr.models.ultra.model import UltraHSTUModel, channel_config

__all__ = ["UltraHSTUModel", "channel_config"]
