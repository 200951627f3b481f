"""The one call stage_build.py times (kept apart so the benchmark survives API moves)."""

from megatron_gr.models.registry import get_train_spec
from megatron_gr.training.model_setup import build_model
from megatron_gr.training.plan import make_plan
from megatron_gr.training.runtime import initialize


def build_stage(config):
    spec = get_train_spec(config.model.type)
    dataset = spec.build_dataset(config)
    plan = make_plan(config, num_items=dataset.num_items)
    initialize(config.training, pipeline_parallel_size=plan.layout.pipeline)
    return build_model(plan, spec, dataset)
