"""ddpm_fast.diffusion against diffusers' DDPMScheduler and DDIMScheduler.

Both are fed the same model outputs, samples and noise. Our steps run in float32 on coefficients
gathered from float64 tables. diffusers runs twice:
  - "float64": its step code on float64 inputs with its tables replaced by the float64 tables of the
    same schedule (test_schedules_match_diffusers checks they are diffusers' schedules): the exact
    result of diffusers' algorithm; ours must agree to atol 1e-5 (rtol 1e-6) in every case;
  - "stock": diffusers as shipped, float32 tables and arithmetic. Its own rounding error reaches
    ~3e-5 where the step is ill-conditioned (x0 prediction near t = 0 divides by sqrt(1 - ab) ~ 1e-2;
    unclipped x0 at t ~ T is ~300), so there the tolerance is 1e-4; test_float64_beats_stock_float32
    shows that in those cases ours is the closer one to the float64 result.
Conventions mapped: diffusers "sample" prediction = our "x0", "v_prediction" = "v";
use_clipped_model_output=True = eps_from_x0=True; set_alpha_to_one=True (our last step always goes to
alpha_bar = 1); DDPM variance_type fixed_small / fixed_large / learned_range = ours.
"""
import itertools
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler   # a test dependency (pyproject [test])

from ddpm_fast import Diffusion
from ddpm_fast.diffusion import diffusers_timesteps, reference_sample_loop

ATOL, RTOL = 1e-5, 1e-6
TOL = {"float64": (1e-6, 1e-5), "stock": (1e-5, 1e-4)}     # (rtol, atol) against each diffusers run
PRED = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
SCHEDULE = {"linear": "linear", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("name", list(SCHEDULE))
def test_schedules_match_diffusers(name):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
    ours = Diffusion(schedule=SCHEDULE[name], timesteps=1000)
    torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("spacing,n,offset", [("leading", 50, 0), ("leading", 50, 1), ("leading", 7, 0),
                                              ("trailing", 50, 0), ("trailing", 7, 0), ("trailing", 250, 0),
                                              ("linspace", 50, 0), ("linspace", 7, 0), ("linspace", 1000, 0)])
def test_diffusers_timesteps(spacing, n, offset):
    for cls in (DDPMScheduler, DDIMScheduler):
        sched = cls(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
        sched.set_timesteps(n)
        want = sched.timesteps.tolist()
        assert diffusers_timesteps(1000, n, spacing, offset) == want
        spaced = Diffusion("linear", 1000).respace_diffusers(n, spacing, steps_offset=offset)
        assert spaced.timestep_map.flip(0).tolist() == want
        if offset == 0:
            assert Diffusion("linear", 1000).respace(f"{spacing}{n}").timestep_map.flip(0).tolist() == want


def _float64(sched, base: Diffusion):
    """diffusers' scheduler with its tables replaced by our float64 ones (same schedule)."""
    sched.betas = base.betas.clone()
    sched.alphas = base.alphas.clone()
    sched.alphas_cumprod = base.alphas_cumprod.clone()
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


class Runner:
    """Steps a diffusers scheduler in one precision, from float32 inputs; returns float32 results,
    and the noise a DDPM step drew (rounded to float32) so ours can use the same draw."""

    def __init__(self, sched, base: Diffusion, precision: str):
        self.precision = precision
        self.dtype = torch.float64 if precision == "float64" else torch.float32
        self.sched = _float64(sched, base) if precision == "float64" else sched

    def step(self, out, t, x, seed=None, **kw):
        c = (lambda v: None if v is None else v.to(self.dtype))
        if "variance_noise" in kw:
            kw["variance_noise"] = c(kw["variance_noise"])
        noise = None
        if seed is not None:   # DDPMScheduler draws its own noise with this generator
            kw["generator"] = torch.Generator().manual_seed(seed)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=self.dtype).float()
        r = self.sched.step(c(out), t, c(x), **kw)
        return r.prev_sample.float(), r.pred_original_sample.float(), noise


def _close(got, want, precision, terms=0.0):
    """assert_close at TOL[precision]; `terms`: the magnitude of the float32 terms that cancel in the
    result (x0 = x / sqrt(ab) - eps * sqrt(1 / ab - 1) is ~300 - 300 at t ~ T): 2 float32 ulps of it
    are allowed too, the floor of any float32 evaluation."""
    rtol, atol = TOL[precision]
    torch.testing.assert_close(got, want, rtol=rtol, atol=max(atol, 2.4e-7 * terms))


def _x0_terms(diff, idx, x, out):
    c = x.shape[1]
    return float(diff.sqrt_recip_alphas_cumprod[idx].max()) * float(x.abs().max() + out[:, :c].abs().max())


def _inputs(seed, channels_out=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g) * 1.5
    out = torch.randn(2, channels_out, 8, 8, generator=g)
    if channels_out == 6:
        out[:, 3:] = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=g)
    return x, out, noise


PRECISIONS = ["float64", "stock"]
DDIM_CASES = list(itertools.product([0.0, 1.0], [True, False], ["epsilon", "v_prediction", "sample"],
                                    ["leading", "trailing"], [False, True]))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("eta,clip,prediction,spacing,use_clipped", DDIM_CASES)
def test_ddim_step_matches_diffusers(eta, clip, prediction, spacing, use_clipped, precision):
    n = 10
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                          set_alpha_to_one=True, prediction_type=prediction, timestep_spacing=spacing)
    sched.set_timesteps(n)
    base = Diffusion("linear", 1000, prediction=PRED[prediction])
    ref = Runner(sched, base, precision)
    diff = base.respace_diffusers(n, spacing)
    for k, t in enumerate(sched.timesteps):
        x, out, noise = _inputs(100 + k)
        want, want_x0, _ = ref.step(out, int(t), x, eta=eta, use_clipped_model_output=use_clipped,
                                    variance_noise=noise if eta > 0 else None)
        idx = torch.full((2,), n - 1 - k)
        got, x0 = diff.p_sample_step(x, out, idx, noise, method="ddim", eta=eta, clip_denoised=clip,
                                     eps_from_x0=use_clipped)
        _close(x0, want_x0, precision, _x0_terms(diff, idx, x, out))
        _close(got, want, precision)


DDPM_CASES = ([("fixed_small", c, p, s, 0) for c in (True, False) for p in PRED
               for s in ("leading", "trailing", "linspace")]
              + [("fixed_small", True, "epsilon", "leading", 1)]
              + [(v, c, "epsilon", "leading", 0) for v in ("fixed_large", "learned_range") for c in (True, False)])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variance,clip,prediction,spacing,offset", DDPM_CASES)
def test_ddpm_step_matches_diffusers(variance, clip, prediction, spacing, offset, precision):
    """diffusers adds noise whenever t > 0 even on the last step (a trailing/offset schedule ends at
    t > 0, going to alpha_bar = 1): its fixed_small variance is then 0 (clamped to 1e-20), as ours,
    but fixed_large / learned_range are not, so those are compared on leading spacing ending at t = 0."""
    n = 10
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                          variance_type=variance, prediction_type=prediction, timestep_spacing=spacing,
                          steps_offset=offset)
    sched.set_timesteps(n)
    base = Diffusion("linear", 1000, variance=variance, prediction=PRED[prediction])
    ref = Runner(sched, base, precision)
    diff = base.respace_diffusers(n, spacing, steps_offset=offset)
    learned = variance == "learned_range"
    for k, t in enumerate(sched.timesteps):
        x, out, _ = _inputs(200 + k, 6 if learned else 3)
        want, want_x0, noise = ref.step(out, int(t), x, seed=k)
        idx = torch.full((2,), n - 1 - k)
        got, x0 = diff.p_sample_step(x, out, idx, noise, method="ddpm", clip_denoised=clip)
        _close(x0, want_x0, precision, _x0_terms(diff, idx, x, out))
        _close(got, want, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_dynamic_thresholding_matches_diffusers(method, precision):
    n = 10
    kw = dict(num_train_timesteps=1000, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    sched = DDPMScheduler(**kw) if method == "ddpm" else DDIMScheduler(**kw)
    sched.set_timesteps(n)
    base = Diffusion("linear", 1000)
    ref = Runner(sched, base, precision)
    diff = base.respace_diffusers(n, "leading")
    for k, t in enumerate(sched.timesteps):
        x, out, _ = _inputs(300 + k)
        if method == "ddpm":
            want, want_x0, noise = ref.step(out, int(t), x, seed=k)
        else:
            (want, want_x0, _), noise = ref.step(out, int(t), x, eta=0.0), None
        got, x0 = diff.p_sample_step(x, out, torch.full((2,), n - 1 - k), noise, method=method,
                                     dynamic_threshold=(0.9, 2.0), eps_from_x0=False)
        _close(x0, want_x0, precision)
        _close(got, want, precision)


def test_float64_beats_stock_float32():
    """Where stock diffusers is off by > 1e-5 (x0 prediction near t = 0), ours is within 1e-6 of
    diffusers' own algorithm run in float64: the float64 tables are what make the difference."""
    n = 10
    base = Diffusion("linear", 1000, prediction="x0")
    diff = base.respace_diffusers(n, "leading")
    stock = DDIMScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample=True)
    exact = Runner(DDIMScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample=True),
                   base, "float64")
    stock.set_timesteps(n)
    exact.sched.set_timesteps(n)
    k = 8                                                     # t = 100
    t = int(stock.timesteps[k])
    x, out, _ = _inputs(100 + k)
    want_stock = stock.step(out, t, x, eta=0.0).prev_sample
    want_exact, _, _ = exact.step(out, t, x, eta=0.0)
    got, _ = diff.p_sample_step(x, out, torch.full((2,), n - 1 - k), method="ddim", eps_from_x0=False)
    assert (want_stock - want_exact).abs().max() > 1e-5
    assert (got - want_exact).abs().max() < 1e-6


def test_mixed_step_indices_in_one_batch_match_diffusers():
    """One batch whose samples sit at different timesteps equals per-sample diffusers steps."""
    n = 10
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, timestep_spacing="trailing")
    sched.set_timesteps(n)
    diff = Diffusion("linear", 1000).respace_diffusers(n, "trailing")
    x, out, noise = _inputs(7)
    ks = [1, 6]
    got, _ = diff.p_sample_step(x, out, torch.tensor([n - 1 - k for k in ks]), noise, method="ddim",
                                eta=0.5, eps_from_x0=False)
    for b, k in enumerate(ks):
        want = sched.step(out[b:b + 1], int(sched.timesteps[k]), x[b:b + 1], eta=0.5,
                          variance_noise=noise[b:b + 1]).prev_sample
        torch.testing.assert_close(got[b:b + 1], want, rtol=RTOL, atol=ATOL)


def _model(x, t, **kwargs):
    tt = t.float().reshape(-1, 1, 1, 1) / 1000
    return 0.5 * torch.tanh(x) * (1 + tt) + 0.1 * torch.sin(3 * x + tt)


@pytest.mark.parametrize("method,spacing,eta", [("ddim", "trailing", 0.0), ("ddim", "leading", 1.0),
                                               ("ddpm", "leading", 0.0)])
def test_whole_loop_matches_diffusers(method, spacing, eta):
    """A 20-step loop, stock diffusers (float32) against reference_sample_loop, same model and noise."""
    n = 20
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    noises = torch.randn(n, 2, 3, 8, 8, generator=g)       # noises[s]: the draw of step index s
    if method == "ddim":
        sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, timestep_spacing=spacing)
    else:
        sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=True, timestep_spacing=spacing)
    sched.set_timesteps(n)
    x = x_T.clone()
    for k, t in enumerate(sched.timesteps):
        out = _model(x, torch.full((2,), int(t)))
        if method == "ddim":
            x = sched.step(out, int(t), x, eta=eta, use_clipped_model_output=True,
                           variance_noise=noises[n - 1 - k] if eta > 0 else None).prev_sample
        else:
            # DDPMScheduler draws its own noise: record the draw of its generator for our loop
            noises[n - 1 - k] = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1000 + k))
            x = sched.step(out, int(t), x, generator=torch.Generator().manual_seed(1000 + k)).prev_sample
    diff = Diffusion("linear", 1000).respace_diffusers(n, spacing)
    ours = reference_sample_loop(_model, diff, x_T, method=method, eta=eta, clip_denoised=True, noise=noises)
    torch.testing.assert_close(ours, x, rtol=RTOL, atol=ATOL)
