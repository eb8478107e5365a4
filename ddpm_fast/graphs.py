"""Whole-loop CUDA graphs: the reverse loop (x_T draw, every U-Net call and every fused step)
captured once into one torch.cuda.CUDAGraph with static input buffers and a private memory pool,
cached, and replayed for later calls with new seeds / labels / x_T copied into the buffers."""
from __future__ import annotations

import weakref
from typing import Callable, Hashable

import torch

# model -> {key: CapturedLoop}; weak on the model so a freed model's graphs (which read its
# parameters' memory) go with it and can never be replayed for another model at the same id.
_CACHE: "weakref.WeakKeyDictionary[object, dict[Hashable, CapturedLoop]]" = weakref.WeakKeyDictionary()


class CapturedLoop:
    """fn(**static_inputs) -> Tensor or tuple of Tensors, captured in one CUDA graph.

    Construction runs fn once eagerly on a side stream (warm-up: allocator, cuDNN and Triton
    autotuning must not happen during capture), then captures it. `first_result` is that warm-up
    output; calling the object copies new inputs into the static buffers and replays the graph."""

    def __init__(self, fn: Callable, static_inputs: dict[str, torch.Tensor]):
        self.static_inputs = static_inputs
        self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = fn(**static_inputs)
            self.first_result = _clone(warm)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.static_output = fn(**static_inputs)
        self.replays = 0

    def __call__(self, **inputs: torch.Tensor):
        for name, value in inputs.items():
            buf = self.static_inputs[name]
            if value.shape != buf.shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}; the captured graph "
                                 f"was recorded for {tuple(buf.shape)}")
            buf.copy_(value)
        self.graph.replay()
        self.replays += 1
        return _clone(self.static_output)


def _clone(out):
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    return out.clone()


def cached(model, key: Hashable, build: Callable[[], CapturedLoop]) -> tuple[CapturedLoop, bool]:
    """The captured loop of `model` for `key` (shape, dtype, steps, options...), built on first
    use; returns (loop, was_new)."""
    per_model = _CACHE.setdefault(model, {})
    loop = per_model.get(key)
    if loop is not None:
        return loop, False
    loop = build()
    per_model[key] = loop
    return loop, True


def clear_cache() -> None:
    """Drop every captured graph (and its memory pool)."""
    _CACHE.clear()


def cache_size() -> int:
    """Number of captured loops currently cached, over all models."""
    return sum(len(v) for v in _CACHE.values())
