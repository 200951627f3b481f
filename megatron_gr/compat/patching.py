"""``PatchSet``: attributes replaced on torch and megatron-core objects, each put back exactly
as it was (a class's own ``staticmethod``, a module global, an inherited attribute that
had no entry of its own) by :meth:`PatchSet.restore`."""

from __future__ import annotations

from megatron_gr.compat.version import require

_ABSENT = object()  # the owner had no entry of its own (an inherited attribute)


class PatchSet:
    def __init__(self):
        self._originals: list[tuple[object, str, object]] = []

    def __len__(self) -> int:
        return len(self._originals)

    def set(self, owner, name: str, value, *, purpose: str) -> None:
        """``setattr(owner, name, value)``, remembering the original.

        Raises:
            MegatronVersionError: ``owner`` has no ``name`` (another megatron-core version).
        """
        require(owner, name, purpose=purpose)
        self._originals.append((owner, name, vars(owner).get(name, _ABSENT)))
        setattr(owner, name, value)

    def restore(self) -> None:
        """Puts every original back, newest first (an attribute patched twice ends as it began)."""
        while self._originals:
            owner, name, original = self._originals.pop()
            if original is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
