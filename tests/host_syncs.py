"""Host syncs in a piece of the hot loop, counted on either device."""

from __future__ import annotations

import warnings

import torch
from torch.overrides import TorchFunctionMode

# torch calls whose result the host must wait for: a value read back, or an output sized from
# the data (see the lean-dispatch section of docs/performance.md)
SYNCING = frozenset(
    {
        "item",
        "tolist",
        "nonzero",
        "argwhere",
        "unique",
        "unique_consecutive",
        "masked_select",
        "bincount",
        "equal",
        "allclose",
        "cpu",
        "numpy",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
    }
)


def _is_to_host(name: str, args, kwargs) -> bool:
    """x.to("cpu") of a tensor that is elsewhere."""
    if name != "to" or not isinstance(args[0], torch.Tensor) or args[0].device.type == "cpu":
        return False
    return any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))


def _is_masked_index(name: str, args) -> bool:
    """x[mask] with a boolean mask: its size is the mask's count."""
    if name != "__getitem__" or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


class HostSyncs(TorchFunctionMode):
    """In its scope (this thread), `syncs` lists the torch calls that make the host wait for
    the device: the calls named in SYNCING made from Python, and on CUDA whatever torch's sync
    debug mode reports (a synchronising CUDA call from anywhere, C++ included)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.is_cuda = device.type == "cuda"
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        if name in SYNCING or _is_to_host(name, args, kwargs) or _is_masked_index(name, args):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        if self.is_cuda:
            self._warnings = warnings.catch_warnings(record=True)
            self._recorded = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self.is_cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            recorded = [str(w.message) for w in self._recorded]
            self.syncs += [f"cuda: {m}" for m in recorded if "synchroniz" in m]
        return False
