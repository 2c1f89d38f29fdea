"""Count the bytes autograd saves for backward, each storage once.

This is the deterministic measure behind "memory efficient" (spec section 4): run a forward
under :func:`torch.autograd.graph.saved_tensors_hooks`, record every tensor autograd keeps,
and add up the distinct storages. Storages that exist whatever the model does (its
parameters and buffers, and the tensors the caller passed in) are reported apart from the
activations the forward itself created.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SavedBytes:
    """What autograd kept for one forward."""

    activations: int  #: bytes of storages the forward created (the memory the model costs)
    inputs: int  #: bytes of caller-given tensors autograd also kept (the block input, say)
    parameters: int  #: bytes of parameters and buffers autograd kept a reference to
    tensors: int  #: number of distinct storages saved

    @property
    def with_inputs(self) -> int:
        """Activations plus the saved inputs: the cost of one block seen on its own."""
        return self.activations + self.inputs


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def saved_bytes(
    forward: Callable[[], object],
    inputs: Iterable[torch.Tensor] = (),
    modules: Iterable[torch.nn.Module] = (),
) -> SavedBytes:
    """Run ``forward()`` and account for every storage autograd saved while it ran."""
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        saved[key] = key[1]
        return t

    owned_params = {_storage_key(p) for m in modules for p in (*m.parameters(), *m.buffers())}
    owned_inputs = {_storage_key(t) for t in inputs}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    act = sum(n for k, n in saved.items() if k not in owned_params and k not in owned_inputs)
    inp = sum(n for k, n in saved.items() if k in owned_inputs and k not in owned_params)
    par = sum(n for k, n in saved.items() if k in owned_params)
    return SavedBytes(activations=act, inputs=inp, parameters=par, tensors=len(saved))
