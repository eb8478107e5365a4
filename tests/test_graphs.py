"""The whole-loop graph and its cache (ddpm_fast.graphs, sample(cuda_graph=...)).

A CUDA graph replays fixed addresses: a cached graph gives wrong images silently when something
it reads was freed, moved or changed. On the CPU `TapeGraph` stands in for torch.cuda.CUDAGraph
(through graphs.GRAPH_FACTORY): its capture records every aten op the captured function runs
(a TorchDispatchMode), and its replay re-runs those ops on the same memory, as a graph re-runs
its kernels. Tensors made during the capture are the graph's pool (kept); tensors read from
outside are held only by a weak reference to their storage, so a replay that reads a freed one
raises StaleRead, and one that reads changed memory gives another output than an eager run.
The same cases run with the real graph on a GPU (marked cuda).
"""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

import ddpm_fast
from ddpm_fast import Diffusion, UNet, graphs, reference
from ddpm_fast._registry import resolve
from conftest import randomize_weights


class StaleRead(RuntimeError):
    """A replay read memory that was freed (or moved away) since the capture."""


def _storage_id(t: torch.Tensor):
    """The StorageImpl of a dense tensor (an int), None for opaque tensors (oneDNN weights)."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


class TapeGraph:
    """CPU stand-in for a CUDA graph (the graphs.Graph protocol); see the module docstring."""

    def __init__(self, device=None):
        self.tape = []            # (op, flat argument slots, argument spec, output slots)
        self.pool = {}            # storage id -> a tensor of the pool (kept alive, like the pool)
        self.pool_objects = {}    # id -> opaque tensor made during the capture
        self.external = {}        # storage id -> StorageWeakRef: memory read from outside
        self.external_objects = {}  # id -> weakref of an opaque tensor read from outside
        self.captures = self.replays = 0

    # -- Graph protocol --
    def warmup(self, fn):
        return fn()

    def capture(self, fn):
        self.captures += 1
        with _Recorder(self):
            return fn()

    def replay(self):
        self.replays += 1
        with torch.no_grad():
            for op, slots, spec, out_slots in self.tape:
                args, kwargs = tree_unflatten([self._load(s, op) for s in slots], spec)
                new = op(*args, **kwargs)
                for slot, value in zip(out_slots, tree_flatten(new)[0]):
                    if slot is not None and slot[0] == "pool" and slot[1] is not value:
                        slot[1].copy_(value)

    # -- recording --
    def _slot(self, t: torch.Tensor):
        sid = _storage_id(t)
        if sid is None:
            if id(t) in self.pool_objects:
                return ("pool", t)
            self.external_objects.setdefault(id(t), weakref.ref(t))
            return ("ext_object", self.external_objects[id(t)])
        if sid in self.pool:
            return ("pool", t)
        if sid not in self.external:
            self.external[sid] = StorageWeakRef(t.untyped_storage())
        return ("ext", sid, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)

    def _record(self, op, args, kwargs, out):
        flat, spec = tree_flatten((args, kwargs))
        slots = [self._slot(a) if isinstance(a, torch.Tensor) else ("const", a) for a in flat]
        out_slots = []
        for o in tree_flatten(out)[0]:
            if not isinstance(o, torch.Tensor):
                out_slots.append(None)
                continue
            sid = _storage_id(o)
            if sid is None:
                self.pool_objects[id(o)] = o
            elif sid not in self.external:
                self.pool.setdefault(sid, o)
            out_slots.append(self._slot(o) if sid is None or sid in self.pool else None)
        self.tape.append((op, slots, spec, out_slots))

    def _load(self, slot, op):
        kind = slot[0]
        if kind in ("const", "pool"):
            return slot[1]
        if kind == "ext_object":
            obj = slot[1]()
            if obj is None:
                raise StaleRead(f"replay of {op} reads an opaque tensor that was freed after the capture")
            return obj
        _, sid, offset, shape, stride, dtype, device = slot
        ref = self.external[sid]
        if ref.expired():
            raise StaleRead(f"replay of {op} reads freed memory: a {dtype} tensor of shape {shape} "
                            "read from outside the capture")
        storage = torch.UntypedStorage._new_with_weak_ptr(ref.cdata)
        return torch.empty(0, dtype=dtype, device=device).set_(storage, offset, shape, stride)



class _Recorder(TorchDispatchMode):
    def __init__(self, graph: TapeGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.graph._record(func, args, kwargs, out)
        return out


@pytest.fixture
def fake_graphs(monkeypatch):
    """Every sample() capture goes through TapeGraph (on any device); returns the graphs made."""
    made = []

    def factory(device):
        made.append(TapeGraph(device))
        return made[-1]

    monkeypatch.setattr(graphs, "GRAPH_FACTORY", factory)
    graphs.clear_cache()
    yield made
    graphs.clear_cache()


def small_unet(seed: int = 0, **overrides) -> UNet:
    """Class-conditional ADM U-Net (8x8 RGB, learned variance, attention at 4x4, a conv Upsample:
    merged upsampling weights; the fused timestep projection) with random weights, in eval mode,
    carrying its diffusion (cosine, T = 20) and null label 4."""
    cfg = dict(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
               attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16, num_classes=5,
               use_scale_shift_norm=True, resblock_updown=False)
    model = randomize_weights(UNet(**{**cfg, **overrides}), seed=seed).eval()
    model.null_label = 4
    model.diffusion = Diffusion("cosine", 20, variance="learned_range")
    return model


RUN = dict(steps=2, num_samples=2, batch_size=2, progress=False)


def graph_and_eager(model, **kw):
    """sample() through the captured loop (cuda_graph=True), and eagerly on a fresh copy of the
    model (no derived weight copies carried over: a stale one cannot hide in both runs)."""
    kw = {**RUN, **kw}
    graph = ddpm_fast.sample(model, cuda_graph=True, **kw)
    return graph, ddpm_fast.sample(copy.deepcopy(model), cuda_graph=False, **kw)


def replay_matches_eager(model, **kw):
    """Capture (first call), then check a replay (second call) equals the eager run."""
    ddpm_fast.sample(model, cuda_graph=True, **{**RUN, **kw})
    graph, eager = graph_and_eager(model, **kw)
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)


# ---- replays equal eager runs ----------------------------------------------------------------------

def test_replays_for_new_seeds_labels_x_T_and_later_batches_equal_eager(fake_graphs):
    model = small_unet()
    kw = dict(steps=2, num_samples=5, batch_size=3, progress=False)  # batches of 3, then 2
    ddpm_fast.sample(model, seed=0, cuda_graph=True, **kw)               # captures both
    assert len(fake_graphs) == 2 and all(g.captures == 1 for g in fake_graphs)
    for extra in (dict(seed=1), dict(seed=2, class_labels=[3, 1, 0, 2, 2], start_index=7)):
        graph = ddpm_fast.sample(model, cuda_graph=True, **kw, **extra)
        eager = ddpm_fast.sample(model, cuda_graph=False, **kw, **extra)
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert len(fake_graphs) == 2 and all(g.replays == 2 for g in fake_graphs)  # replayed, not recaptured
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(steps=2, batch_size=2, progress=False, seed=3)
    ddpm_fast.sample(model, cuda_graph=True, x_T=x_T + 1, **kw)           # a graph with an x_T input
    torch.testing.assert_close(ddpm_fast.sample(model, cuda_graph=True, x_T=x_T, **kw),
                               ddpm_fast.sample(model, cuda_graph=False, x_T=x_T, **kw), rtol=1e-5, atol=1e-5)
    assert len(fake_graphs) == 3 and fake_graphs[-1].replays == 1


@pytest.mark.parametrize("options", [
    dict(method="ddim", eta=1.0, return_x0=True),
    dict(guidance_scale=2.0),
    dict(method="ddim", eta=0.5, project_noise="sample", clip=(-1.5, 1.5)),
])
def test_replay_equals_eager_over_options(fake_graphs, options):
    model = small_unet(seed=1)
    ddpm_fast.sample(model, cuda_graph=True, seed=0, **RUN, **options)
    graph = ddpm_fast.sample(model, cuda_graph=True, seed=4, **RUN, **options)
    eager = ddpm_fast.sample(model, cuda_graph=False, seed=4, **RUN, **options)
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)


# ---- staleness: every way a cached graph could replay stale memory ---------------------------------

def _change(model, change: str):
    """Change the model the ways a user does between sample() calls."""
    if change == "load_state_dict":
        model.load_state_dict(small_unet(seed=9).state_dict())
    elif change == "bias":     # an EMA-like in-place update of one upsampling conv's bias
        conv = next(m.conv for m in model.modules() if isinstance(m, ddpm_fast.unet.Upsample))
        with torch.no_grad():
            conv.bias.add_(0.5)
    elif change == "fp16":
        model.convert_to_fp16()
    elif change == "channels_last":
        model.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("change", ["load_state_dict", "bias", "fp16", "channels_last"])
def test_derived_copies_follow_their_sources_eagerly(change):
    model = small_unet(seed=0)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 17]), torch.tensor([1, 4])
    with torch.no_grad():
        model(x, t, y)                       # fills the derived copies
        assert len(model.derived_tensors()) >= 4
        _change(model, change)
        torch.testing.assert_close(model(x, t, y), copy.deepcopy(model)(x, t, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["load_state_dict", "bias", "fp16", "channels_last"])
def test_changed_model_recaptures(fake_graphs, change):
    # load_state_dict / a bias update: same storage, new values (the derived copies go stale);
    # fp16 / channels_last: new storage (the captured addresses are freed)
    model = small_unet(seed=0)
    ddpm_fast.sample(model, cuda_graph=True, seed=0, **RUN)
    _change(model, change)
    gc.collect()
    replay_matches_eager(model, seed=1)                      # same sample() arguments: same key
    assert graphs.cache_size(model) == 1                     # the stale graph was dropped


def test_changed_diffusion_recaptures(fake_graphs):
    model = small_unet(seed=0)
    ddpm_fast.sample(model, cuda_graph=True, seed=0, **RUN)
    for other in (Diffusion("linear", 100, variance="learned_range"),
                  Diffusion("cosine", 20, variance="learned_range", rescale_timesteps=True)):
        graph, eager = graph_and_eager(model, seed=1, diffusion=other)
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert len(fake_graphs) == 3


def test_freed_plan_is_owned_by_the_captured_loop(fake_graphs):
    model = small_unet(seed=0)
    ddpm_fast.sample(model, cuda_graph=True, seed=0, **RUN)
    gc.collect()                                             # the first call's plan is gone
    replay_matches_eager(model, seed=2)
    assert len(fake_graphs) == 1


class Shifted(nn.Module):
    """A model taking a per-sample model_kwargs tensor: unet(x + shift, t, y)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.diffusion, self.null_label = unet.diffusion, unet.null_label
        self.in_channels, self.image_size, self.num_classes = 3, 8, unet.num_classes

    def forward(self, x, t, y=None, shift=None):
        return self.unet(x + shift, t, y)


def test_new_model_kwargs_are_static_inputs(fake_graphs):
    model = Shifted(small_unet(seed=0))
    gen = torch.Generator().manual_seed(0)
    ddpm_fast.sample(model, cuda_graph=True, seed=0, model_kwargs={"shift": torch.randn(2, 3, 8, 8, generator=gen)},
                     **RUN)
    gc.collect()
    graph, eager = graph_and_eager(model, seed=1, model_kwargs={"shift": torch.randn(2, 3, 8, 8, generator=gen)})
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert len(fake_graphs) == 1                             # new values replay; a new shape would not
    graph, eager = graph_and_eager(model, seed=1, model_kwargs={"shift": torch.randn(1, 3, 8, 8, generator=gen)})
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert len(fake_graphs) == 2


def test_per_sample_model_kwargs_split_into_batches():
    model = Shifted(small_unet(seed=0))
    shift = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(steps=2, num_samples=3, progress=False, seed=0, model_kwargs={"shift": shift})
    # sample i sees shift[i] whatever its batch (and its noise does not depend on the batch)
    torch.testing.assert_close(ddpm_fast.sample(model, batch_size=2, **kw), ddpm_fast.sample(model, batch_size=3, **kw),
                               rtol=1e-5, atol=1e-5)


def test_captured_loop_owns_every_tensor_it_reads(fake_graphs):
    """Everything the replay reads from outside the capture is a static input, a tensor the
    CapturedLoop owns (plan, derived weight copies) or a parameter/buffer of the model."""
    model = small_unet(seed=0)
    ddpm_fast.sample(model, cuda_graph=True, seed=0, **RUN)
    (graph,), (loop,) = fake_graphs, graphs._CACHE[model].values()
    allowed = {_storage_id(t) for t in (*loop.static_inputs.values(), *loop.owned, *loop.derived,
                                        *model.parameters(), *model.buffers())}
    assert graph.external and set(graph.external) - allowed == set()
    assert set(graph.external_objects) <= {id(t) for t in loop.derived}


def test_cache_holds_at_most_its_bound(fake_graphs):
    model = small_unet(seed=0)
    old = graphs.cache_limit()
    try:
        graphs.set_cache_limit(2)
        for b in (1, 2, 3):
            ddpm_fast.sample(model, cuda_graph=True, seed=0, steps=2, num_samples=b, batch_size=b, progress=False)
            assert graphs.cache_size(model) == min(b, 2)
        ddpm_fast.sample(model, cuda_graph=True, seed=0, steps=2, num_samples=2, batch_size=2, progress=False)
        assert len(fake_graphs) == 3                         # batch 2 was kept (recently used)
        ddpm_fast.sample(model, cuda_graph=True, seed=0, steps=2, num_samples=1, batch_size=1, progress=False)
        assert len(fake_graphs) == 4 and graphs.cache_size(model) == 2   # batch 1 had been evicted
        with pytest.raises(ValueError, match="limit"):
            graphs.set_cache_limit(0)
    finally:
        graphs.set_cache_limit(old)
    graphs.clear_cache()
    assert graphs.cache_size() == 0


class FailingGraph(TapeGraph):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_failed_capture_warns_once_and_runs_eagerly_with_auto(monkeypatch):
    made = []
    monkeypatch.setattr(graphs, "GRAPH_FACTORY", lambda device: made.append(FailingGraph()) or made[-1])
    graphs.clear_cache()
    model = small_unet(seed=0)
    eager = ddpm_fast.sample(model, cuda_graph=False, seed=0, **RUN)
    with pytest.warns(RuntimeWarning, match="capture failed") as caught:
        auto = ddpm_fast.sample(model, cuda_graph="auto", seed=0, **RUN)
        again = ddpm_fast.sample(model, cuda_graph="auto", seed=0, **RUN)
    assert len([w for w in caught if "capture failed" in str(w.message)]) == 1
    assert len(made) == 1                                    # not tried again
    torch.testing.assert_close(auto, eager)
    torch.testing.assert_close(again, eager)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        ddpm_fast.sample(model, cuda_graph=True, seed=0, **RUN)
    graphs.clear_cache()


def test_tape_graph_sees_a_freed_input():
    """The fake itself: a replay that reads a tensor freed after the capture raises."""
    keep = {"w": torch.randn(4)}
    graph = TapeGraph()
    x = torch.randn(4)
    out = graph.capture(lambda: x * keep["w"])
    graph.replay()
    torch.testing.assert_close(out, x * keep["w"])
    keep["w"].mul_(2)                                        # changed in place: the replay reads it
    graph.replay()
    torch.testing.assert_close(out, x * keep["w"])
    del keep["w"]
    gc.collect()
    with pytest.raises(StaleRead, match="freed"):
        graph.replay()


# ---- cond_fn: only the classifier takes gradients ----------------------------------------------------

def test_cond_fn_alone_takes_gradients(monkeypatch):
    """sample(cond_fn=...): the model runs under no_grad (so, though its parameters require grad,
    on the fused kernels where they exist), cond_fn with gradients enabled."""
    model = small_unet(seed=0)
    assert all(p.requires_grad for p in model.parameters())
    model_grad, cond_grad = [], []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: model_grad.append(torch.is_grad_enabled()) or forward(*a, **k))

    def cond_fn(x, t, y=None):
        cond_grad.append(torch.is_grad_enabled())
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad((x.sin() * (1 + y.view(-1, 1, 1, 1))).sum(), x)
        return 0.1 * grad

    kw = dict(steps=3, num_samples=2, batch_size=2, progress=False, seed=0, cond_fn=cond_fn)
    real = reference.group_norm_scale_shift
    reference_calls = []
    monkeypatch.setattr(reference, "group_norm_scale_shift",
                        lambda *a, **k: reference_calls.append(1) or real(*a, **k))
    guided = ddpm_fast.sample(model, **kw)
    assert model_grad == [False] * 3 and cond_grad == [True] * 3
    if resolve("group_norm_scale_shift", "auto", torch.device("cpu")) != "torch":
        assert reference_calls == []        # the fused CPU kernel ran every GroupNorm
    for p in model.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(guided, ddpm_fast.sample(model, **kw), rtol=1e-6, atol=1e-6)
    unguided = ddpm_fast.sample(model, **{**kw, "cond_fn": None})
    assert (guided - unguided).abs().max() > 1e-3


# ---- the real CUDA graph ---------------------------------------------------------------------------------

@pytest.fixture
def cuda_graphs():
    graphs.clear_cache()
    yield
    graphs.clear_cache()


@pytest.mark.cuda
def test_cuda_replays_for_new_seeds_labels_x_T_and_later_batches_equal_eager(cuda_graphs):
    model = small_unet(seed=0).cuda()
    kw = dict(steps=5, num_samples=5, batch_size=3, progress=False)   # batches of 3, then 2
    ddpm_fast.sample(model, seed=0, cuda_graph=True, **kw)               # captures both
    x_T = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for extra in (dict(seed=1), dict(seed=2, class_labels=[3, 1, 0, 2, 2], start_index=7),
                  dict(seed=3, x_T=x_T), dict(seed=4, x_T=-x_T)):
        graph = ddpm_fast.sample(model, cuda_graph=True, **kw, **extra)
        eager = ddpm_fast.sample(model, cuda_graph=False, **kw, **extra)
        torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
    assert [loop.replays for loop in graphs._CACHE[model].values()] == [2, 2, 1, 1]
    for options in (dict(guidance_scale=2.0), dict(method="ddim", eta=1.0, return_x0=True)):
        ddpm_fast.sample(model, cuda_graph=True, seed=0, **RUN, **options)
        graph = ddpm_fast.sample(model, cuda_graph=True, seed=5, **RUN, **options)
        eager = ddpm_fast.sample(model, cuda_graph=False, seed=5, **RUN, **options)
        torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("change", ["load_state_dict", "fp16", "channels_last", "bias", "model_kwargs",
                                    "plan", "diffusion"])
def test_cuda_staleness(cuda_graphs, change):
    base = small_unet(seed=0)
    model = (Shifted(base) if change == "model_kwargs" else base).cuda()
    gen = torch.Generator().manual_seed(0)
    kw = dict(RUN)
    if change == "model_kwargs":
        kw["model_kwargs"] = {"shift": torch.randn(2, 3, 8, 8, generator=gen).cuda()}
    ddpm_fast.sample(model, cuda_graph=True, seed=0, **kw)
    ddpm_fast.sample(model, cuda_graph=True, seed=0, **kw)
    _change(model, change)
    if change == "model_kwargs":
        kw["model_kwargs"] = {"shift": torch.randn(2, 3, 8, 8, generator=gen).cuda()}
    elif change == "diffusion":
        kw["diffusion"] = Diffusion("linear", 100, variance="learned_range")
    gc.collect()
    torch.cuda.empty_cache()
    junk = [torch.full((n,), float("nan"), device="cuda") for n in (1 << 10, 1 << 14, 1 << 18)]  # noqa: F841
    # (NaN in the freed blocks, as later work would leave there: a stale read shows)
    ddpm_fast.sample(model, cuda_graph=True, seed=1, **kw)
    graph = ddpm_fast.sample(model, cuda_graph=True, seed=1, **kw)
    eager = ddpm_fast.sample(copy.deepcopy(model), cuda_graph=False, seed=1, **kw)
    tol = 2e-2 if change == "fp16" else 1e-4
    torch.testing.assert_close(graph, eager, rtol=tol, atol=tol)


@pytest.mark.cuda
def test_cuda_graph_captures_on_the_models_device(cuda_graphs):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = small_unet(seed=0).to("cuda:1")
    with torch.cuda.device(0):
        ddpm_fast.sample(model, cuda_graph=True, seed=0, **RUN)       # capture
        graph, eager = graph_and_eager(model, seed=1)                # replay
    assert graph.device == torch.device("cuda:1")
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
