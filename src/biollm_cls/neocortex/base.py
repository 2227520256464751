"""The neocortex (slow, general base model) as the rest of the library sees it.

A neocortex exposes one forward pass with an optional *injection* callback: the lower layers run up to the
injection point, ``inject(h)`` returns the hippocampal delta, ``h + delta`` continues through the upper
layers. The *system* view (base + hippocampus) and the *base* view (``inject=None``) are the same single
pass; nothing is recomputed from the input ids.

``hidden`` returns the final-normed hidden states, and ``logits`` projects a selection of them onto the
output vocabulary, so losses can project only the supervised positions (cheap with large vocabularies).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

# inject(h [B,T,H], attention_mask [B,T] bool | None) -> delta [B,T,H]
Injection = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@runtime_checkable
class Neocortex(Protocol):
    hidden_size: int
    vocab_size: int  # size of the output space that `logits` projects onto

    def hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, inject: Injection | None = None
    ) -> torch.Tensor:
        """input_ids [B,T] -> final-normed hidden states [B,T,H], adding inject(h) at the injection point."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V]."""

    def runtime_info(self) -> dict:
        """Facts about the split (logged at step 0 and in run_metadata.json)."""

    # plus nn.Module: parameters(), train(), eval(), state_dict(), ...


def full_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                inject: Injection | None = None) -> torch.Tensor:
    """Convenience: logits at every position [B,T,V] (tests and small models)."""
    return model.logits(model.hidden(input_ids, attention_mask, inject))
