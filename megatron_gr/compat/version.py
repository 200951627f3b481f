"""The megatron-core version the shims of this package were written for, and the guard that
says so when another version is installed.

Every shim that patches megatron-core or calls one of its private functions first calls
:func:`require`: on another version it warns once (the shims may no longer fit), and when
the attribute it needs is gone it stops with :class:`MegatronVersionError` naming both
versions, before anything is patched.
"""

from __future__ import annotations

import functools
import warnings

WRITTEN_FOR = "0.16.1"


class MegatronVersionError(RuntimeError):
    """The installed megatron-core lacks something a shim of ``megatron_gr.compat`` needs."""


class MegatronVersionWarning(UserWarning):
    """The installed megatron-core is not the version the shims were written for."""


def installed_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def check_version() -> None:
    """Warns (once per installed version) when megatron-core is not :data:`WRITTEN_FOR`."""
    installed = installed_version()
    if installed != WRITTEN_FOR:
        _warn_once(installed)


@functools.lru_cache(maxsize=None)
def _warn_once(installed: str) -> None:
    # attributed to the package rather than a source line, so the console shows one line
    warnings.warn_explicit(
        f"megatron_gr's megatron-core shims were written for megatron-core {WRITTEN_FOR}, but "
        f"{installed} is installed: if training fails or misbehaves, install megatron-core=={WRITTEN_FOR}",
        MegatronVersionWarning,
        filename="megatron_gr.compat",
        lineno=0,
    )


def require(owner, name: str, *, purpose: str) -> None:
    """Checks the version (see :func:`check_version`) and that ``owner`` has ``name``.

    Args:
        owner: the megatron module, class or object a shim patches or calls into.
        name: the attribute the shim needs.
        purpose: what the shim does with it, for the error message.
    """
    check_version()
    if not hasattr(owner, name):
        owner_name = getattr(owner, "__name__", None) or type(owner).__qualname__
        raise MegatronVersionError(
            f"megatron-core {installed_version()} has no {owner_name}.{name}, which megatron_gr needs to "
            f"{purpose}; its shims were written for megatron-core {WRITTEN_FOR}: install megatron-core=={WRITTEN_FOR}"
        )
