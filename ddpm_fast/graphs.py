"""Whole-loop CUDA graphs: the reverse loop (x_T draw, every U-Net call and every fused step)
captured once into one torch.cuda.CUDAGraph with static input buffers and a private memory pool,
cached per model, and replayed for later calls with new seeds / labels / x_T / model_kwargs
copied into the buffers.

A graph replays fixed device addresses, so a cached one is only correct while everything it
reads is still where it was and holds what it should. This module keeps that true:

- a `CapturedLoop` owns every tensor its graph reads that is not the model's: its static inputs,
  the plan it was captured with (coefficients, timesteps, step ids) and the model's derived
  weight copies (`model.derived_tensors()`: fused projections, merged upsampling weights) as
  they were at capture, so none of them can be freed and reused while the graph is cached;
- each entry records the model's state at capture: every parameter's and buffer's
  `fast_layers.version_key` (data pointer, in-place version, dtype, device, shape, strides).
  A lookup whose model state differs (load_state_dict, an EMA update, `convert_to_fp16`,
  channels_last, `.to()`), or whose captured derived copies are no longer the model's,
  drops the stale graphs and recaptures (the capture's eager warm-up refreshes the copies);
- the caller's key covers everything else the captured function depends on (shapes, dtypes,
  options, a digest of the plan's values: betas, respacing, eta, rescaling);
- at most `cache_limit()` graphs per model (least recently used evicted; `set_cache_limit`),
  and `clear_cache()` drops them all.

The capture itself is injectable (`GRAPH_FACTORY`) so that all of this is tested on the CPU with
a fake graph (tests/test_graphs.py replays recorded ops on the captured memory).
"""
from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Callable, Hashable, Protocol

import torch

from .fast_layers import version_key

DEFAULT_CACHE_LIMIT = 4  # captured loops kept per model (each holds a memory pool)


class Graph(Protocol):
    """What CapturedLoop needs of a graph: `warmup(fn)` runs fn eagerly (before capture: the
    allocator, cuDNN and Triton autotuning must not run during capture) and returns its result;
    `capture(fn)` records fn and returns its (static) output; `replay()` re-runs the recording."""

    def warmup(self, fn: Callable): ...

    def capture(self, fn: Callable): ...

    def replay(self) -> None: ...


class CudaGraph:
    """torch.cuda.CUDAGraph behind the Graph protocol, everything under `device`'s guard (a model
    on cuda:1 is captured and replayed on cuda:1 whatever the current device)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        with torch.cuda.device(self.device):
            self.graph = torch.cuda.CUDAGraph()
            self.pool = torch.cuda.graph_pool_handle()

    def warmup(self, fn: Callable):
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = fn()
            torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self, fn: Callable):
        with torch.cuda.device(self.device), torch.cuda.graph(self.graph, pool=self.pool):
            return fn()

    def replay(self) -> None:
        with torch.cuda.device(self.device):
            self.graph.replay()


GRAPH_FACTORY: Callable[[torch.device], Graph] | None = None
"""Injectable capture (tests): None captures CudaGraph on CUDA devices only; a factory
device -> Graph is used instead for every device (the CPU included)."""


def capturable(device: torch.device) -> bool:
    """Whether sample() can capture its loop for a model on `device`."""
    return GRAPH_FACTORY is not None or torch.device(device).type == "cuda"


def new_graph(device: torch.device) -> Graph:
    return GRAPH_FACTORY(device) if GRAPH_FACTORY is not None else CudaGraph(device)


class CapturedLoop:
    """fn(**static_inputs) -> Tensor or tuple of Tensors, captured in one graph.

    Construction runs fn once eagerly (warm-up), then captures it. `first_result` is the warm-up
    output (the first call's result); calling the object copies new inputs into the static
    buffers, replays the graph and returns a copy of its output.

    static_inputs: name -> tensor, the buffers the graph reads its inputs from (owned here).
    owned: other tensors the graph reads (the plan), kept alive as long as the graph.
    device: where to capture (the model's device). graph: a Graph (default new_graph(device)).
    """

    def __init__(self, fn: Callable, static_inputs: dict[str, torch.Tensor], *,
                 owned: tuple[torch.Tensor, ...] = (), device: torch.device | None = None,
                 graph: Graph | None = None):
        self.static_inputs = dict(static_inputs)
        self.owned = tuple(owned)
        self.model_state = None      # set by `cached`: the model's state at capture
        self.derived = ()            # set by `cached`: the model's derived copies at capture
        if graph is None:
            if device is None:
                device = next(iter(self.static_inputs.values())).device
            graph = new_graph(device)
        self.graph = graph
        self.first_result = _clone(graph.warmup(lambda: fn(**self.static_inputs)))
        self.static_output = graph.capture(lambda: fn(**self.static_inputs))
        self.replays = 0

    def __call__(self, **inputs: torch.Tensor):
        if set(inputs) != set(self.static_inputs):
            raise ValueError(f"inputs {sorted(inputs)} differ from the captured {sorted(self.static_inputs)}")
        for name, value in inputs.items():
            buf = self.static_inputs[name]
            if value.shape != buf.shape or value.dtype != buf.dtype:
                raise ValueError(f"{name} is a {value.dtype} tensor of shape {tuple(value.shape)}; the "
                                 f"captured graph was recorded for {buf.dtype} {tuple(buf.shape)}")
            buf.copy_(value)
        self.graph.replay()
        self.replays += 1
        return _clone(self.static_output)


def _clone(out):
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    return out.clone()


# ---- the cache ------------------------------------------------------------------------------------

# model -> OrderedDict{key: CapturedLoop}, least recently used first; weak on the model so a
# freed model's graphs (which read its parameters' memory) go with it. Entries hold no reference
# to the model (nor to the captured function, which closes over it).
_CACHE: "weakref.WeakKeyDictionary[object, OrderedDict[Hashable, CapturedLoop]]" = weakref.WeakKeyDictionary()
_FAILED: "weakref.WeakKeyDictionary[object, set]" = weakref.WeakKeyDictionary()
_WARNED: set[str] = set()
_limit = DEFAULT_CACHE_LIMIT


def model_state(model: torch.nn.Module) -> tuple:
    """What a captured graph assumes of `model`: version_key of every parameter and buffer."""
    return tuple((name, version_key(t)) for name, t in (*model.named_parameters(), *model.named_buffers()))


def model_derived(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """The derived weight copies held now by the model and its submodules (each module's
    `derived_tensors()`, e.g. ddpm_fast.UNet's; a wrapped U-Net counts)."""
    out = []
    for m in model.modules():
        get = getattr(m, "derived_tensors", None)
        if callable(get):
            out.extend(get())
    return tuple(out)


def _current(loop: CapturedLoop, state: tuple, derived_ids: set[int]) -> bool:
    return loop.model_state == state and all(id(t) in derived_ids for t in loop.derived)


def cached(model, key: Hashable, build: Callable[[], CapturedLoop]) -> tuple[CapturedLoop, bool]:
    """The captured loop of `model` for `key` (shapes, dtypes, options, plan digest...), built on
    first use or when the cached one is stale (the model's parameters, buffers or derived copies
    changed since its capture); returns (loop, was_new). Stale entries of the model are dropped,
    and at most cache_limit() entries are kept (least recently used evicted)."""
    per_model = _CACHE.setdefault(model, OrderedDict())
    state = model_state(model)
    derived_ids = {id(t) for t in model_derived(model)}
    for k in [k for k, v in per_model.items() if not _current(v, state, derived_ids)]:
        del per_model[k]
    loop = per_model.get(key)
    if loop is not None:
        per_model.move_to_end(key)
        return loop, False
    loop = build()
    loop.model_state = model_state(model)
    loop.derived = model_derived(model)
    per_model[key] = loop
    while len(per_model) > _limit:
        per_model.popitem(last=False)
    return loop, True


def capture_failed(model, key: Hashable, error: BaseException) -> None:
    """Remember that capturing `key` failed for `model` (later calls run eagerly without trying
    again) and warn once per distinct error."""
    _FAILED.setdefault(model, set()).add(key)
    message = f"CUDA graph capture failed ({type(error).__name__}: {error}); sampling eagerly"
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def failed_before(model, key: Hashable) -> bool:
    """Whether a capture of `key` failed for `model` (since the last clear_cache)."""
    return key in _FAILED.get(model, ())


def set_cache_limit(limit: int) -> None:
    """Keep at most `limit` (>= 1) captured loops per model; evicts the excess now."""
    global _limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1; got {limit!r}")
    _limit = limit
    for per_model in _CACHE.values():
        while len(per_model) > _limit:
            per_model.popitem(last=False)


def cache_limit() -> int:
    """The most captured loops kept per model (default DEFAULT_CACHE_LIMIT)."""
    return _limit


def clear_cache() -> None:
    """Drop every captured graph (and its memory pool) and forget failed captures."""
    _CACHE.clear()
    _FAILED.clear()
    _WARNED.clear()


def cache_size(model=None) -> int:
    """Number of captured loops cached for `model`, or over all models."""
    if model is not None:
        return len(_CACHE.get(model, ()))
    return sum(len(v) for v in _CACHE.values())
