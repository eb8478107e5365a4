"""Capture safety: the function sample() captures into a CUDA graph does no host work a capture
forbids, over sample()'s option matrix, on the CPU.

A CUDA graph capture fails (cudaErrorStreamCaptureUnsupported) or records garbage on a host sync
or a pageable host-to-device copy: a tensor made from a host scalar (`torch.tensor(3,
device="cuda")`), `.item()`, `.tolist()`, `.cpu()`, `bool(tensor)` / `int(tensor)` (all
`aten._local_scalar_dense`). `FlaggingGraph` replaces the capture (graphs.GRAPH_FACTORY): sample()
warms up as usual, then runs the exact function it would capture under `HostWorkDetector` (a
TorchFunctionMode and a TorchDispatchMode), which records every such call with where it came from.
Restoration (ddpm_fast.restore) runs its loop eagerly and captures nothing.
"""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm_fast
from ddpm_fast import graphs
from test_graphs import Shifted, small_unet

_T = torch.Tensor
# Tensor methods that read a value back on the host or copy to the host.
HOST_METHODS = {_T.item: "item()", _T.tolist: "tolist()", _T.cpu: "cpu()", _T.numpy: "numpy()",
                _T.__bool__: "bool(tensor)", _T.__int__: "int(tensor)", _T.__float__: "float(tensor)",
                _T.__index__: "tensor as an index"}
# Functions that make a tensor from host data (on a GPU: a pageable host-to-device copy).
FROM_HOST = {torch.tensor: "torch.tensor", torch.scalar_tensor: "torch.scalar_tensor",
             torch.from_numpy: "torch.from_numpy", _T.new_tensor: "Tensor.new_tensor"}
# The aten ops those reach.
HOST_OPS = {torch.ops.aten._local_scalar_dense.default: "aten._local_scalar_dense",
            torch.ops.aten.lift_fresh.default: "aten.lift_fresh (a tensor from host data)",
            torch.ops.aten.lift_fresh_copy.default: "aten.lift_fresh_copy (a tensor from host data)"}


def _where() -> str:
    """The innermost ddpm_fast frame of the current stack (file:line)."""
    frames = [f for f in traceback.extract_stack()[:-2] if "ddpm_fast" in f.filename and "tests" not in f.filename]
    return f"{frames[-1].filename.split('ddpm_fast')[-1]}:{frames[-1].lineno}" if frames else "?"


class _Functions(TorchFunctionMode):
    def __init__(self, found):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = HOST_METHODS.get(func) or FROM_HOST.get(func)
        if func is torch.as_tensor and not isinstance(args[0] if args else kwargs.get("data"), torch.Tensor):
            what = "torch.as_tensor of host data"
        if func is _T.to and any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
                                 for a in (*args[1:], kwargs.get("device"))
                                 if isinstance(a, (str, torch.device))):
            what = "to('cpu')"
        if what:
            self.found.append(f"{what} at {_where()}")
        return func(*args, **kwargs)


class _Ops(TorchDispatchMode):
    def __init__(self, found):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        what = HOST_OPS.get(func)
        if what:
            self.found.append(f"{what} at {_where()}")
        return func(*args, **(kwargs or {}))


class HostWorkDetector:
    """Context manager: records (in `found`) every host sync / host-data tensor made inside."""

    def __init__(self):
        self.found: list[str] = []
        self._modes = (_Functions(self.found), _Ops(self.found))

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


class FlaggingGraph:
    """graphs.Graph whose capture runs the function under HostWorkDetector (no replay)."""

    def __init__(self, device=None):
        self.detector = HostWorkDetector()

    def warmup(self, fn):
        return fn()

    def capture(self, fn):
        with self.detector:
            return fn()

    def replay(self):
        raise AssertionError("FlaggingGraph is captured once per test; nothing replays")


@pytest.fixture
def flagged(monkeypatch):
    """The detectors of every capture sample() makes."""
    made = []
    monkeypatch.setattr(graphs, "GRAPH_FACTORY", lambda device: made.append(FlaggingGraph()) or made[-1])
    graphs.clear_cache()
    yield made
    graphs.clear_cache()


VARIANTS = {
    "default": {},                                                     # DDPM, learned variance
    "cfg": dict(guidance_scale=2.0),
    "noise_squared_clip": dict(noise="squared", clip=(-1.2, 1.2)),
    "ddim_eta1": dict(method="ddim", eta=1.0),
    "ddim_project_pixel": dict(method="ddim", eta=0.7, project_noise="pixel"),
    "ddim_project_sample": dict(method="ddim", eta=0.7, project_noise="sample"),
    "ddim_eta0": dict(method="ddim", eta=0.0, noise="zero"),
    "skip": dict(steps=None, skip=8),
    "return_x0": dict(return_x0=True),
    "remainder_batch": dict(num_samples=3, batch_size=2),
    "x_T": dict(x_T=torch.randn(2, 3, 8, 8)),
    "model_kwargs": dict(model_kwargs={"shift": torch.randn(2, 3, 8, 8)}),
    # the seed options of issue 18: a per-step noise switch, quadratic spacing, a truncated start
    "noise_until": dict(noise_until=2),
    "quad_spacing": dict(method="ddim", steps="quad4"),
    "truncate": dict(method="ddim", truncate=0.8),
    # diffusers' thresholding (issue 19): a per-sample quantile of |x0| on the device
    "dynamic_threshold": dict(dynamic_threshold=(0.9, 1.5)),
}


# every variant on the default backend (the C++ CPU kernels here, Triton on a GPU); the
# pure-PyTorch step (its own noise draw) on the variants that reach each of its code paths
CASES = [(v, "auto") for v in sorted(VARIANTS)] + [
    (v, "torch") for v in ("default", "ddim_project_pixel", "ddim_project_sample", "noise_squared_clip")]


@pytest.mark.parametrize("variant,backend", CASES)
def test_captured_loop_does_no_host_work(flagged, variant, backend):
    kw = {**dict(steps=4, num_samples=2, batch_size=2, seed=0, progress=False), **VARIANTS[variant]}
    model = small_unet(seed=0)
    model.backend = backend
    if variant == "model_kwargs":
        model = Shifted(model)
    ddpm_fast.sample(model, cuda_graph=True, backend=backend, **kw)
    assert flagged and all(g.detector.found == [] for g in flagged), [g.detector.found for g in flagged]


def test_a_planted_host_tensor_in_the_loop_is_flagged(flagged, monkeypatch):
    real = ddpm_fast.loop.ops.diffusion_step

    def planted(x, *args, **kwargs):
        x = x + torch.tensor(0.0, device=x.device)     # the defect issue 16 found, planted back
        return real(x, *args, **kwargs)

    monkeypatch.setattr(ddpm_fast.loop.ops, "diffusion_step", planted)
    ddpm_fast.sample(small_unet(seed=0), cuda_graph=True, steps=3, num_samples=1, seed=0, progress=False)
    (graph,) = flagged
    assert any(f.startswith("torch.tensor") for f in graph.detector.found)
    assert any("lift_fresh" in f for f in graph.detector.found)


@pytest.mark.parametrize("host_work", [
    lambda t: t.sum().item(), lambda t: t.tolist(), lambda t: t.cpu(), lambda t: bool(t[0] > 0),
    lambda t: int(t[0]), lambda t: torch.as_tensor(3), lambda t: t + torch.tensor([1.0]),
    lambda t: t.to("cpu"),
])
def test_detector_flags_each_kind_of_host_work(host_work):
    t = torch.randn(4)
    with HostWorkDetector() as detector:
        host_work(t)
    assert detector.found


def test_detector_passes_device_side_work():
    t = torch.randn(4)
    with HostWorkDetector() as detector:
        (t * 2 + torch.full((), 3.0)).clamp(-1, 1).expand(2, 4).sum(dim=0)
        torch.as_tensor(t)
    assert detector.found == []
