"""Checkpoints of other projects: Meta generative-recommenders' HSTU retrieval models
(``gr_hstu``: the state-dict mapping; ``gr_checkpoint``: ``megatron-gr checkpoint
import-gr`` / ``export-gr``)."""
