"""Serving programs: ``megatron-gr export`` writes a ``torch.export`` program of a trained
model (its model type's ``TrainSpec.serving_module``)."""

from megatron_gr.serving.export import export_program

__all__ = ["export_program"]
