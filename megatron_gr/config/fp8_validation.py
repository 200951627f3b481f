"""Checks of megatron's FP8 fields on ``GRTransformerConfig`` (``fp8``, ``fp8_recipe``,
``fp8_amax_history_len``, ``fp8_amax_compute_algo``, ``fp8_margin``, ``fp8_wgrad`` and the
Transformer Engine-only ones), at construction. What needs the device (a GPU with FP8
tensor cores) is checked when the run is planned:
``megatron_gr.transformer.fp8.backend.check_fp8_runnable``.

FP8 linears come from one of two backends: Transformer Engine when it is installed (its
linears, megatron's FP8 recipes), else the native linears on ``torch._scaled_mm``
(``megatron_gr/transformer/fp8``).
"""

from __future__ import annotations

from megatron_gr.compat import transformer_engine_available
from megatron_gr.config.validation import check_choice, check_int_range, require

FP8_FORMATS = ("e4m3", "hybrid")
NATIVE_FP8_RECIPES = ("delayed", "tensorwise", "rowwise")
TE_FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise", "custom")
AMAX_COMPUTE_ALGOS = ("most_recent", "max")
# megatron wraps these recompute modules in Transformer Engine's checkpoint when fp8 is set
_TE_RECOMPUTE_MODULES = ("mlp", "layernorm", "moe_act", "moe", "shared_experts")


def recipe_name(config) -> str:
    """``fp8_recipe`` as a plain string (megatron may hold its ``Fp8Recipe`` enum)."""
    return str(getattr(config.fp8_recipe, "value", config.fp8_recipe))


def validate_fp8(config) -> None:
    """Raises ConfigError for FP8 settings that cannot run or would be silently ignored."""
    recipe = recipe_name(config)
    if config.fp8 is None:
        _reject_settings_without_fp8(config, recipe)
        return
    check_choice("fp8", config.fp8, FP8_FORMATS)
    check_int_range("fp8_amax_history_len", config.fp8_amax_history_len, low=1)
    check_choice("fp8_amax_compute_algo", config.fp8_amax_compute_algo, AMAX_COMPUTE_ALGOS)
    check_int_range("fp8_margin", config.fp8_margin, low=0, high=32)
    if transformer_engine_available():
        _validate_transformer_engine(config, recipe)
    else:
        _validate_native(config, recipe)


def _reject_settings_without_fp8(config, recipe: str) -> None:
    changed = {
        "fp8_recipe": (recipe, "delayed"),
        "fp8_amax_history_len": (config.fp8_amax_history_len, 1),
        "fp8_amax_compute_algo": (config.fp8_amax_compute_algo, "most_recent"),
        "fp8_margin": (config.fp8_margin, 0),
        "fp8_wgrad": (config.fp8_wgrad, True),
    }
    for name, (value, default) in changed.items():
        require(
            value == default,
            f"{name}={value!r} has no effect without fp8: set fp8 (--fp8-format e4m3 or hybrid) or leave {name} "
            f"at {default!r}",
        )


def _validate_native(config, recipe: str) -> None:
    require(
        recipe in NATIVE_FP8_RECIPES,
        f"fp8_recipe={recipe!r} needs Transformer Engine, which is not installed: the native FP8 linears "
        f"run {', '.join(NATIVE_FP8_RECIPES)}",
    )
    if recipe != "delayed":
        for name, value, default in (
            ("fp8_amax_history_len", config.fp8_amax_history_len, 1),
            ("fp8_amax_compute_algo", config.fp8_amax_compute_algo, "most_recent"),
        ):
            require(
                value == default,
                f"{name}={value!r} has no effect with fp8_recipe={recipe!r} (amax histories belong to "
                f"fp8_recipe='delayed'): leave it at {default!r} or use the delayed recipe",
            )
    te_only = {
        "fp8_param": (config.fp8_param, False),
        "fp8_dot_product_attention": (config.fp8_dot_product_attention, False),
        "fp8_multi_head_attention": (config.fp8_multi_head_attention, False),
        "first_last_layers_bf16": (config.first_last_layers_bf16, False),
        "gradient_accumulation_fusion": (config.gradient_accumulation_fusion, False),
    }
    for name, (value, supported) in te_only.items():
        require(
            value == supported,
            f"{name}={value!r} is not supported by the native FP8 linears (Transformer Engine is not "
            f"installed): use {supported!r}",
        )
    require(
        config.recompute_granularity != "full",
        "recompute_granularity='full' with fp8: megatron recomputes FP8 layers through Transformer Engine, which "
        "is not installed; use selective recompute or unset fp8",
    )
    if config.recompute_granularity == "selective":
        for module in _TE_RECOMPUTE_MODULES:
            require(
                module not in (config.recompute_modules or []),
                f"recompute_modules holds {module!r}: with fp8 megatron recomputes it through Transformer Engine, "
                "which is not installed; drop it or unset fp8",
            )


def _validate_transformer_engine(config, recipe: str) -> None:
    require(
        recipe in TE_FP8_RECIPES,
        f"fp8_recipe={recipe!r} is a recipe of the native FP8 linears, which run only without Transformer "
        f"Engine; with Transformer Engine installed choose one of {', '.join(TE_FP8_RECIPES)}",
    )
    require(
        not config.enable_hyper_connections,
        "fp8 with enable_hyper_connections=True is supported by the native FP8 linears only, not with "
        "Transformer Engine installed: unset fp8 or disable hyper-connections",
    )
