"""Pieces every training task uses: the train/validation split of ``--tables`` and frozen helper networks."""
from __future__ import annotations

from torch import nn

from ...errors import TuwenError

def split_tables(tables: str | None, flag: str = "--tables",
                 what: str = "training (train table, then the validation table)") -> tuple[list[str], list[str]]:
    """EasyNLP's rule: with several comma-separated tables the last one is the validation table.

    Returns (train tables, validation tables); the second is empty for a single table.
    """
    items = [t.strip() for t in (tables or "").split(",") if t.strip()]
    if not items:
        raise TuwenError(f"{flag} is required for {what}")
    return (items[:-1], items[-1:]) if len(items) > 1 else (items, [])


class WithFrozen(nn.Module):
    """A trained module with frozen helper networks beside it (e.g. the VQGAN that encodes images for the GPT).

    The helpers are deliberately not registered as sub-modules: their weights stay out of ``state_dict``, the
    optimizer and DDP's gradient buckets. They still follow ``.to()`` / ``.cuda()`` and stay in eval mode.
    """

    def __init__(self):
        super().__init__()
        self._frozen: dict[str, nn.Module | None] = {}

    def set_frozen(self, name: str, module: nn.Module | None) -> None:
        if module is not None:
            module.eval().requires_grad_(False)
        self._frozen[name] = module

    def frozen(self, name: str) -> nn.Module | None:
        return self._frozen.get(name)

    def _apply(self, fn, *args, **kwargs):
        for module in getattr(self, "_frozen", {}).values():
            if module is not None:
                module._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)
