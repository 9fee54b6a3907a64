"""Where and how the tensors saved for backward are kept: int8 (Mesa), host offload, counting.

`ActivationStore` owns `torch.autograd.graph.saved_tensors_hooks` for one model: inside
`store.forward()` every tensor an autograd node saves passes through `_pack` (at save time)
and comes back through `_unpack` (when the backward needs it). The forward computes with the
exact tensors either way; only the stored copy changes:

- int8: a floating activation is stored as int8 with one float32 scale (absmax / 127) per
  group of `group_size` consecutive values (a head's D values for q, k, v and attention
  outputs; a channel group for hidden states), and dequantized in the backward. Elementwise
  error <= absmax(group) / 254.
- offload: the stored copy goes to pinned host memory with a non-blocking copy (CUDA only).
- counting (always): bytes the saved tensors would hold (each storage once) and bytes actually
  stored, on the device and on the host. The activation-memory model is checked against it.

What is never quantized: parameters (saved by reference, no extra memory), integer and bool
tensors, small tensors, and tensors whose last dim is below 16 (per-row statistics such as
RMSNorm's rstd). Inside attention (`store.attention(head_dim)`) only tensors whose last dim is
the head dim are quantized: q, k, v, outputs, received K/V blocks and LASP states, never the
log-sum-exp or masks, whose errors the softmax recomputation would amplify.
A tensor saved several times in one forward (RoPE's cos / sin, shared by every layer) is
stored once.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from longtrain_kernels.int8_quant import dequantize, quantize

# Below this many elements a tensor is stored as is: the scale overhead and the call cost
# outweigh the saving.
_MIN_QUANT_NUMEL = 1024
_MIN_LAST_DIM = 16


@dataclass
class StoreStats:
    """Bytes of one forward's saved tensors (reset by each `forward()`)."""

    # what autograd would have kept: each distinct storage once (a view keeps its whole base)
    raw_bytes: int = 0
    # what is kept instead: on the compute device, and in host memory (offload)
    device_bytes: int = 0
    host_bytes: int = 0
    quantized_tensors: int = 0
    kept_tensors: int = 0
    # storage key -> a weak reference to a tensor on it: a key whose tensor died (a quantized
    # original freed) may be reused by a new storage at the same address, which counts anew
    _storages: dict = field(default_factory=dict, repr=False)
    _kept: set = field(default_factory=set, repr=False)


class _Int8:
    """A stored int8 copy: values, per-group scales and how to rebuild the tensor."""

    __slots__ = ("q", "scale", "shape", "dtype", "device", "group_size", "kernels")

    def __init__(self, x: torch.Tensor, group_size: int, offload: bool, kernels: str) -> None:
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.group_size, self.kernels = group_size, kernels
        q, scale = quantize(x.detach(), group_size, backend=kernels)
        self.q, self.scale = (_to_host(q), _to_host(scale)) if offload else (q, scale)

    def nbytes(self) -> int:
        return self.q.numel() + 4 * self.scale.numel()

    def unpack(self) -> torch.Tensor:
        q = self.q.to(self.device, non_blocking=True)
        scale = self.scale.to(self.device, non_blocking=True)
        return dequantize(q, scale, shape=self.shape, dtype=self.dtype,
                          group_size=self.group_size, backend=self.kernels)


class _Host:
    """A tensor offloaded to pinned host memory as is."""

    __slots__ = ("x", "device")

    def __init__(self, x: torch.Tensor) -> None:
        self.device = x.device
        self.x = _to_host(x.detach())

    def unpack(self) -> torch.Tensor:
        return self.x.to(self.device, non_blocking=True)


class _Reshaped:
    """A stored copy of a base tensor, handed back in the shape of a view of it."""

    __slots__ = ("packed", "shape")

    def __init__(self, packed: Any, shape: torch.Size) -> None:
        self.packed, self.shape = packed, shape

    def unpack(self) -> torch.Tensor:
        return self.packed.unpack().view(self.shape)


def _to_host(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    out.copy_(x, non_blocking=True)
    return out


def _storage_key(x: torch.Tensor) -> tuple[int, int]:
    storage = x.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class ActivationStore:
    """The saved-tensor policy of one model (see the module docstring).

    int8: store floating activations as int8; offload: keep stored copies in pinned host
    memory (ignored for tensors not on CUDA); params: the model's parameters (never packed);
    kernels: the int8 kernels (auto | triton | torch, `train.kernels`).
    """

    def __init__(self, *, int8: bool = False, offload: bool = False, group_size: int = 64,
                 params: Iterable[torch.Tensor] = (), kernels: str = "auto") -> None:
        self.int8, self.offload, self.group_size = int8, offload, group_size
        self.kernels = kernels
        self._param_ptrs = {p.data_ptr() for p in params}
        # storages kept as is and counted once (`share`: RoPE's cos / sin)
        self._shared: set[int] = set()
        self.stats = StoreStats()
        self._active = False
        # id(tensor) -> (weakref, version, packed): one stored copy per tensor per forward
        self._seen: dict[int, tuple[Any, int, Any]] = {}

    @property
    def transforms(self) -> bool:
        """Whether stored copies differ from the tensors (int8 or offload)."""
        return self.int8 or self.offload

    @contextlib.contextmanager
    def forward(self) -> Iterator[StoreStats]:
        """Hooks over one model forward; its saved-tensor bytes land in `stats` (a fresh one)."""
        if self._active:  # a nested call (e.g. a recomputed layer under checkpointing)
            yield self.stats
            return
        self.stats = StoreStats()
        self._active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._packer(self._general),
                                                          self._unpack):
                yield self.stats
        finally:
            self._active = False
            self._seen.clear()
            self._shared.clear()
            self.stats._storages.clear()
            self.stats._kept.clear()

    def share(self, *tensors: torch.Tensor) -> None:
        """Tensors (and views of them) that many layers save, alive for the whole forward:
        kept as is (not quantized, not offloaded), counted once."""
        self._shared.update(t.untyped_storage().data_ptr() for t in tensors)

    @contextlib.contextmanager
    def attention(self, head_dim: int) -> Iterator[None]:
        """Inside attention only tensors whose last dim is `head_dim` are quantized."""
        if not self._active:
            yield
            return
        pred = lambda x: x.shape[-1] == head_dim  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(self._packer(pred), self._unpack):
            yield

    @staticmethod
    def _general(x: torch.Tensor) -> bool:
        return x.dim() >= 2 and x.shape[-1] >= _MIN_LAST_DIM

    def _quantizable(self, x: torch.Tensor, pred: Callable[[torch.Tensor], bool]) -> bool:
        return (self.int8 and x.is_floating_point() and x.numel() >= _MIN_QUANT_NUMEL
                and pred(x))

    def _packer(self, pred: Callable[[torch.Tensor], bool]) -> Callable[[torch.Tensor], Any]:
        def pack(x: torch.Tensor) -> Any:
            # parameters and views of them (a transposed weight), also the ones FSDP gathers
            # for one layer's compute (optim.zero=3), which are parameters of their own
            if (x.data_ptr() in self._param_ptrs or isinstance(x, torch.nn.Parameter)
                    or isinstance(x._base, torch.nn.Parameter)):
                return x
            # a view covering all of its base (a reshape) shares the base's stored copy
            base = x._base
            canon = base if (base is not None and x.is_contiguous() and base.is_contiguous()
                             and x.numel() == base.numel()
                             and x.storage_offset() == base.storage_offset()) else x
            seen = self._seen.get(id(canon))
            if seen is not None and seen[0]() is canon and seen[1] == canon._version:
                packed = seen[2]
            else:
                packed = self._pack(canon, pred)
                self._seen[id(canon)] = (weakref.ref(canon), canon._version, packed)
            if isinstance(packed, torch.Tensor):  # kept as is
                return x
            return packed if canon is x else _Reshaped(packed, x.shape)

        return pack

    def _pack(self, x: torch.Tensor, pred: Callable[[torch.Tensor], bool]) -> Any:
        stats = self.stats
        key = _storage_key(x)
        seen = stats._storages.get(key)
        if seen is None or seen() is None:
            stats._storages[key] = weakref.ref(x)
            stats.raw_bytes += key[1]
        offload = self.offload and x.is_cuda
        if key[0] in self._shared:
            offload = False
        elif self._quantizable(x, pred):
            packed = _Int8(x, self.group_size, offload, self.kernels)
            stats.quantized_tensors += 1
            if offload:
                stats.host_bytes += packed.nbytes()
            else:
                stats.device_bytes += packed.nbytes()
            return packed
        stats.kept_tensors += 1
        if offload and x.numel() >= _MIN_QUANT_NUMEL:
            stats.host_bytes += x.numel() * x.element_size()
            return _Host(x)
        if key not in stats._kept:  # kept as is: its whole storage stays alive
            stats._kept.add(key)
            stats.device_bytes += key[1]
        return x

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed if isinstance(packed, torch.Tensor) else packed.unpack()


def null_store() -> ActivationStore:
    """A store that keeps every tensor as is (counting only)."""
    return ActivationStore()


def store_for(memory_cfg: Any, params: Iterable[torch.Tensor], *,
              kernels: str = "auto") -> ActivationStore:
    """The store `memory.activations` / `memory.offload` ask for, quantizing with `kernels`."""
    return ActivationStore(int8=memory_cfg.activations == "int8", offload=memory_cfg.offload,
                           group_size=memory_cfg.group_size, params=params, kernels=kernels)


__all__ = ["ActivationStore", "StoreStats", "null_store", "store_for"]
