"""ddpm_fast.diffusion: step skipping, the seed's identities, float64 tables, coefficients,
timesteps, guidance (classifier and classifier-free), the reference loop and option checks."""
import math

import numpy as np
import pytest
import torch

from ddpm_fast import Diffusion
from ddpm_fast.diffusion import (cfg_model_inputs, combine_cfg, guided_model_output, reference_sample_loop,
                                 skip_sequence, space_timesteps)
from ddpm_fast.step_layout import (DDIM_DIR, DDIM_SIGMA, LOG_VAR_MAX, LOG_VAR_MIN, NONZERO, NUM_COEFS,
                                   POST_COEF1, POST_COEF2, SQRT_1M_AB, SQRT_AB, SQRT_AB_PREV, SQRT_RECIP_AB,
                                   SQRT_RECIPM1_AB, VARIANCE, VARIANCES)


def fake_model(x, t, **kwargs):
    tt = t.float().reshape(-1, 1, 1, 1) / 1000
    return 0.5 * torch.tanh(x) * (1 + tt) + 0.1 * torch.sin(3 * x + tt)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- step skipping ---------------------------------------------------------------------------------

def test_skip_acceptance_example():
    assert skip_sequence(10, 3) == [9, 8, 5, 2, 1, 0]
    d = Diffusion("cosine", timesteps=10).skip(3)
    assert d.timestep_map.tolist() == [0, 1, 2, 5, 8, 9]
    assert d.num_timesteps == 6


@pytest.mark.parametrize("n,k", [(10, 1), (10, 2), (10, 4), (10, 9), (10, 20), (1000, 3), (7, 5), (2, 1), (1, 3)])
def test_skip_sequence_shape(n, k):
    seq = skip_sequence(n, k)
    assert seq[0] == n - 1 and seq[-1] == 0
    assert all(a > b for a, b in zip(seq, seq[1:]))             # strictly descending, no duplicates
    strided = list(range(n - 2, 0, -k))                         # N-2, N-2-K, ... while > 0
    assert [s for s in seq if s in strided] == strided
    assert set(seq) == ({n - 1, 0} | set(strided) | ({1} if n > 1 else set()))
    if k == 1:
        assert seq == list(range(n - 1, -1, -1))


def test_skip_quadratic():
    assert skip_sequence(10, "quadratic") == [9, 7, 3, 1, 0]
    assert skip_sequence(16, "quadratic") == [15, 7, 3, 1, 0]
    assert skip_sequence(17, "quadratic") == [16, 15, 7, 3, 1, 0]
    assert skip_sequence(1000, "quadratic") == [999, 511, 255, 127, 63, 31, 15, 7, 3, 1, 0]
    assert skip_sequence(2, "quadratic") == [1, 0]
    assert Diffusion("cosine", 10).skip("quadratic").timestep_map.tolist() == [0, 1, 3, 7, 9]


def test_skip_is_respacing_with_the_visited_list():
    base = Diffusion("cosine", timesteps=100)
    skipped = base.skip(7)
    listed = base.respace(skip_sequence(100, 7))
    assert torch.equal(skipped.timestep_map, listed.timestep_map)
    assert torch.equal(skipped.betas, listed.betas)
    kept = skipped.timestep_map
    ab = base.alphas_cumprod[kept]
    torch.testing.assert_close(skipped.alphas_cumprod, ab, rtol=1e-14, atol=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    torch.testing.assert_close(skipped.betas, 1 - ab / prev, rtol=1e-14, atol=0)
    assert skipped.alphas_cumprod_prev[0] == 1.0   # the last step goes to the clean image


def test_counting_model_called_once_per_visited_step():
    d = Diffusion("cosine", timesteps=10).skip(3)
    seen = []

    def model(x, t, **kw):
        seen.append(t.tolist())
        return fake_model(x, t)

    for method in ("ddpm", "ddim"):
        seen.clear()
        reference_sample_loop(model, d, (2, 3, 4, 4), method=method, noise=torch.Generator().manual_seed(0))
        assert seen == [[t, t] for t in (9, 8, 5, 2, 1, 0)]


# ---- respacing ------------------------------------------------------------------------------------------

def test_space_timesteps_forms():
    kept = space_timesteps(1000, 250)
    assert kept == space_timesteps(1000, "250") and len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(10, "10") == list(range(10))
    assert space_timesteps(100, "2,3") == [0, 49, 50, 74, 99]
    d = Diffusion("linear", 1000)
    assert torch.equal(d.respace("").timestep_map, d.timestep_map)        # guided-diffusion's "" = all


def test_respace_of_respaced_composes():
    base = Diffusion("cosine", 1000)
    twice = base.respace("100").respace("ddim10")
    once = base.respace(twice.timestep_map.tolist())
    assert torch.equal(twice.timestep_map, once.timestep_map)
    torch.testing.assert_close(twice.betas, once.betas, rtol=1e-13, atol=0)
    assert twice.original_num_steps == 1000


def test_respaced_shares_options():
    base = Diffusion("cosine", 400, variance="learned_range", prediction="v", rescale_timesteps=True)
    spaced = base.respace("ddim20")
    assert (spaced.variance, spaced.prediction, spaced.rescale_timesteps) == ("learned_range", "v", True)
    assert spaced.original_num_steps == 400 and spaced.num_timesteps == 20


# ---- the seed's identities ------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,k", [("linear", 1), ("cosine", 1), ("cosine", 3)])
@pytest.mark.parametrize("noise_mode", ["normal", "zero"])
def test_ddim_eta1_equals_ddpm_per_step(schedule, k, noise_mode):
    """DDIM with stochasticity 1 is DDPM with the posterior (fixed_small) variance: sigma^2 is the
    posterior variance and the DDIM mean is the posterior mean; at step index 0 neither adds noise,
    so the clipped log variance of guided-diffusion (index 0 replaced) changes nothing."""
    d = Diffusion(schedule, 100, variance="fixed_small").skip(k)
    x, eps, z = randn(8, 3, 6, 6, seed=1), randn(8, 3, 6, 6, seed=2), randn(8, 3, 6, 6, seed=3)
    for start in range(0, d.num_timesteps, 8):
        idx = torch.arange(start, start + 8) % d.num_timesteps
        ddpm, x0a = d.p_sample_step(x, eps, idx, z, method="ddpm", noise_mode=noise_mode)
        ddim, x0b = d.p_sample_step(x, eps, idx, z, method="ddim", stochasticity=1.0, noise_mode=noise_mode)
        torch.testing.assert_close(x0a, x0b, rtol=0, atol=0)
        torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4])
def test_ddim_eta1_equals_ddpm_over_a_loop(k):
    d = Diffusion("linear", 100, variance="fixed_small").skip(k)
    x_T = randn(2, 3, 8, 8, seed=4)
    zero = dict(noise_mode="zero", noise=torch.Generator().manual_seed(1))
    ddpm = reference_sample_loop(fake_model, d, x_T, method="ddpm", **zero)
    ddim = reference_sample_loop(fake_model, d, x_T, method="ddim", stochasticity=1.0, **zero)
    other_noise = dict(noise_mode="zero", noise=torch.Generator().manual_seed(2))
    assert torch.equal(ddpm, reference_sample_loop(fake_model, d, x_T, method="ddpm", **other_noise))
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-6)
    # and with the same normal noise on every step
    noises = randn(d.num_timesteps, 2, 3, 8, 8, seed=5)
    ddpm = reference_sample_loop(fake_model, d, x_T, method="ddpm", noise=noises)
    ddim = reference_sample_loop(fake_model, d, x_T, method="ddim", eta=1.0, noise=noises)
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=5e-6)   # 100 noisy float32 steps: ~1e-6 of rounding


@pytest.mark.parametrize("method,eta", [("ddim", 1.0), ("ddim", 0.5), ("ddpm", 0.0)])
@pytest.mark.parametrize("project", ["pixel", "sample"])
def test_projection_changes_nothing_without_noise(method, eta, project):
    d = Diffusion("cosine", 50).skip(2)
    x_T = randn(2, 3, 8, 8, seed=6)
    plain = reference_sample_loop(fake_model, d, x_T, method=method, eta=eta, noise_mode="zero")
    projected = reference_sample_loop(fake_model, d, x_T, method=method, eta=eta, noise_mode="zero",
                                      project_noise=project)
    torch.testing.assert_close(projected, plain, rtol=0, atol=1e-6)
    # ... whereas with noise it does change the result
    noises = randn(d.num_timesteps, 2, 3, 8, 8, seed=7)
    a = reference_sample_loop(fake_model, d, x_T, method=method, eta=eta, noise=noises)
    b = reference_sample_loop(fake_model, d, x_T, method=method, eta=eta, noise=noises, project_noise=project)
    assert (a - b).abs().max() > 1e-3


def test_stochasticity_0_and_1_differ():
    d = Diffusion("linear", 100).skip(6)
    x_T = randn(2, 3, 8, 8, seed=8)
    for mode in ("zero", "normal"):
        noises = randn(d.num_timesteps, 2, 3, 8, 8, seed=9)
        a = reference_sample_loop(fake_model, d, x_T, method="ddim", stochasticity=0.0, noise=noises, noise_mode=mode)
        b = reference_sample_loop(fake_model, d, x_T, method="ddim", stochasticity=1.0, noise=noises, noise_mode=mode)
        assert (a - b).abs().max() > 1e-2


def test_noise_modes_scale_the_ddim_noise():
    d = Diffusion("cosine", 100).skip(5)
    x, eps, z = randn(4, 3, 5, 5, seed=10), randn(4, 3, 5, 5, seed=11), randn(4, 3, 5, 5, seed=12)
    idx = torch.tensor([1, 5, 10, 19])
    sigma = d.coefficients(0.7)[idx, DDIM_SIGMA].float().reshape(-1, 1, 1, 1)
    run = {m: d.p_sample_step(x, eps, idx, z, method="ddim", eta=0.7, noise_mode=m)[0]
           for m in ("zero", "normal", "correct", "squared")}
    torch.testing.assert_close(run["normal"] - run["zero"], sigma * z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run["squared"] - run["zero"], sigma * sigma * z, rtol=1e-5, atol=1e-6)
    assert torch.equal(run["correct"], run["normal"])          # the seed's alias


def test_learned_variances_reduce_to_the_fixed_ones():
    """learned_range with v = -1 is fixed_small, with v = +1 fixed_large (from step 1 on: at step 0 no
    noise is added and fixed_large's index 0 is post_var[1]); learned with v = the posterior log
    variance is fixed_small."""
    kinds = {v: Diffusion("cosine", 100, variance=v).skip(3) for v in VARIANCES}
    x, eps, z = randn(4, 3, 5, 5, seed=30), randn(4, 3, 5, 5, seed=31), randn(4, 3, 5, 5, seed=32)
    idx = torch.tensor([1, 7, 20, kinds["fixed_small"].num_timesteps - 1])
    ones = torch.ones_like(x)

    def run(v, out):
        return kinds[v].p_sample_step(x, out, idx, z, method="ddpm", clip_denoised=False)[0]

    small, large = run("fixed_small", eps), run("fixed_large", eps)
    assert (small - large).abs().max() > 1e-3
    torch.testing.assert_close(run("learned_range", torch.cat([eps, -ones], 1)), small, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run("learned_range", torch.cat([eps, ones], 1)), large, rtol=1e-6, atol=1e-6)
    log_var = kinds["fixed_small"].posterior_log_variance_clipped[idx].float().reshape(-1, 1, 1, 1) * ones
    torch.testing.assert_close(run("learned", torch.cat([eps, log_var], 1)), small, rtol=1e-6, atol=1e-6)


# ---- float64 tables and coefficients ----------------------------------------------------------------------

def test_tables_are_float64_and_differ_from_float32():
    d = Diffusion("linear", 1000)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
                 "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1"):
        assert getattr(d, name).dtype == torch.float64, name
    ab32 = torch.cumprod(1 - d.betas.float(), 0)
    rel = ((ab32.double() - d.alphas_cumprod) / d.alphas_cumprod).abs()
    assert rel.max() > 1e-7           # float32 tables carry errors far above float32's rounding of the value
    ab64 = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ab64, rtol=1e-14)


def test_library_uses_the_float64_coefficients():
    d = Diffusion("linear", 1000)
    idx = torch.tensor([0, 1, 10, 500, 998, 999])
    got = d.gather_coefficients(idx, eta=0.3)
    assert got.dtype == torch.float32 and got.shape == (6, NUM_COEFS)
    assert torch.equal(got, d.coefficients(0.3).float()[idx])            # float64 computation, cast
    ab32 = torch.cumprod(1 - d.betas.float(), 0)
    recipm1_32 = torch.sqrt(1 / ab32 - 1)[idx]
    assert not torch.equal(got[:, SQRT_RECIPM1_AB], recipm1_32)           # not the float32 computation
    recipm1_64 = torch.sqrt(1 / d.alphas_cumprod - 1)[idx].float()
    assert torch.equal(got[:, SQRT_RECIPM1_AB], recipm1_64)
    # and the step uses those: a step with the float32-computed coefficients gives another answer
    x, eps = randn(6, 3, 4, 4, seed=13), randn(6, 3, 4, 4, seed=14)
    out, _ = d.p_sample_step(x, eps, idx, method="ddim", eta=0.3, clip_denoised=False)
    wrong = got.clone()
    wrong[:, SQRT_RECIPM1_AB] = recipm1_32
    wrong[:, SQRT_RECIP_AB] = torch.sqrt(1 / ab32)[idx]
    out32, _ = d.p_sample_step(x, eps, idx, method="ddim", clip_denoised=False, coef=wrong)
    out64, _ = d.p_sample_step(x, eps, idx, method="ddim", clip_denoised=False, coef=got)
    assert torch.equal(out, out64) and not torch.equal(out, out32)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_coefficient_columns(variance):
    d = Diffusion("cosine", 200, variance=variance).respace("ddim20")
    eta = 0.6
    c = d.coefficients(eta)
    assert c.shape == (20, NUM_COEFS) and c.dtype == torch.float64
    ab, abp, beta = d.alphas_cumprod, d.alphas_cumprod_prev, d.betas
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)  # noqa: E731
    close(c[:, SQRT_RECIP_AB], 1 / ab.sqrt())
    close(c[:, SQRT_RECIPM1_AB], (1 / ab - 1).sqrt())
    close(c[:, SQRT_AB], ab.sqrt())
    close(c[:, SQRT_1M_AB], (1 - ab).sqrt())
    close(c[:, POST_COEF1], beta * abp.sqrt() / (1 - ab))
    close(c[:, POST_COEF2], (1 - abp) * (1 - beta).sqrt() / (1 - ab))
    post = beta * (1 - abp) / (1 - ab)
    if variance == "fixed_large":
        large = torch.cat([post[1:2], beta[1:]])
        close(c[:, LOG_VAR_MIN], large.log())
        close(c[:, VARIANCE], large)
    else:
        close(c[1:, LOG_VAR_MIN], post[1:].log())
        close(c[0, LOG_VAR_MIN], post[1].log())      # index 0 replaced by index 1 (guided-diffusion)
        close(c[:, VARIANCE], post)
    close(c[:, LOG_VAR_MAX], beta.log())
    sigma = eta * ((1 - abp) / (1 - ab)).sqrt() * (1 - ab / abp).sqrt()
    close(c[:, DDIM_SIGMA], sigma)
    close(c[:, SQRT_AB_PREV], abp.sqrt())
    close(c[:, DDIM_DIR], (1 - abp - sigma ** 2).sqrt())
    assert c[:, NONZERO].tolist() == [0.0] + [1.0] * 19
    close(d.coefficients(1.0)[:, DDIM_SIGMA] ** 2, post)          # eta 1: sigma^2 = posterior variance


def test_coefficient_table_on_device_and_cached_copy():
    d = Diffusion("linear", 100)
    t = d.coefficient_table(0.0, device="cpu")
    assert t.dtype == torch.float32 and t.shape == (100, NUM_COEFS)
    c = d.coefficients(0.0)
    c.zero_()                                                          # callers get a copy
    assert d.coefficients(0.0).abs().sum() > 0


# ---- timesteps --------------------------------------------------------------------------------------------

def test_model_timesteps():
    d = Diffusion("linear", 4000).respace("250")
    idx = torch.tensor([0, 3, 249])
    t = d.model_timesteps(idx)
    assert t.dtype == torch.int64 and t.tolist() == d.timestep_map[idx].tolist()
    r = Diffusion("linear", 4000, rescale_timesteps=True).respace("250")
    tr = r.model_timesteps(idx)
    assert tr.dtype == torch.float32
    assert torch.equal(tr, d.timestep_map[idx].float() * (1000.0 / 4000))
    assert torch.equal(r.model_timestep_table(), r.model_timesteps(torch.arange(250)))
    assert Diffusion("cosine", 10).model_timesteps(torch.tensor([3])).tolist() == [3]


def test_q_sample():
    d = Diffusion("cosine", 100)
    x0, z = randn(3, 3, 4, 4, seed=15), randn(3, 3, 4, 4, seed=16)
    idx = torch.tensor([0, 50, 99])
    ab = d.alphas_cumprod[idx].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, idx, z).double(), ab.sqrt() * x0.double() + (1 - ab).sqrt() * z.double(),
                               rtol=1e-6, atol=1e-6)


# ---- schedules ---------------------------------------------------------------------------------------------

def test_named_schedules():
    lin = Diffusion("linear", 250).betas
    torch.testing.assert_close(lin, torch.from_numpy(np.linspace(4e-4, 0.08, 250)), rtol=1e-14, atol=0)
    cos = Diffusion("cosine", 1000).betas
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cos[10].item() == pytest.approx(1 - f(11 / 1000) / f(10 / 1000), rel=1e-14)
    assert cos.max().item() == 0.999
    sig = Diffusion("sigmoid", 100).betas
    z = np.linspace(-6, 6, 100)
    np.testing.assert_allclose(sig.numpy(), 1 / (1 + np.exp(-z)) * (0.02 - 1e-4) + 1e-4, rtol=1e-14)
    custom = Diffusion(np.full(10, 0.1))
    assert custom.num_timesteps == 10 and custom.schedule == "custom"
    torch.testing.assert_close(custom.alphas_cumprod[-1], torch.tensor(0.9 ** 10, dtype=torch.float64))


# ---- guidance -----------------------------------------------------------------------------------------------

def _cond_fn(x, t, **kwargs):
    return -0.3 * x + 0.05 * t.float().reshape(-1, 1, 1, 1) / 1000


def test_ddim_classifier_guidance_is_condition_score():
    """DDIM guidance: eps' = eps - sqrt(1 - ab) * grad, x0 recomputed from eps' (guided-diffusion's
    condition_score), then the DDIM update; checked against a float64 evaluation."""
    d = Diffusion("linear", 1000).respace("ddim50")
    x, eps = randn(2, 3, 8, 8, seed=17), randn(2, 3, 8, 8, seed=18)
    idx = torch.tensor([40, 7])
    grad = _cond_fn(x, d.model_timesteps(idx))
    got, x0 = d.p_sample_step(x, eps, idx, method="ddim", clip_denoised=True, guidance_grad=grad)
    ab = d.alphas_cumprod[idx].reshape(-1, 1, 1, 1)
    abp = d.alphas_cumprod_prev[idx].reshape(-1, 1, 1, 1)
    xd, ed, gd = x.double(), eps.double(), grad.double()
    x0c = ((xd - (1 - ab).sqrt() * ed) / ab.sqrt()).clamp(-1, 1)
    e = (xd / ab.sqrt() - x0c) / (1 / ab - 1).sqrt() - (1 - ab).sqrt() * gd
    x0g = xd / ab.sqrt() - (1 / ab - 1).sqrt() * e
    want = abp.sqrt() * x0g + (1 - abp).sqrt() * e
    torch.testing.assert_close(x0.double(), x0g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,rescale", [("ddpm", False), ("ddim", True)])
def test_loop_classifier_guidance(method, rescale):
    """cond_fn receives x_t and the model's timesteps (original, scaled when rescale_timesteps) and
    model_kwargs; the loop equals manual steps with guidance_grad."""
    d = Diffusion("cosine", 100, variance="learned_range", rescale_timesteps=rescale).skip(9)
    y = torch.tensor([1, 2])
    calls = []

    def model(x, t, y=None):
        out = fake_model(x, t)
        return torch.cat([out, torch.tanh(out)], dim=1)

    def cond_fn(x, t, y=None):
        calls.append((t.clone(), y.clone()))
        return _cond_fn(x, t)

    x_T = randn(2, 3, 4, 4, seed=19)
    noises = randn(d.num_timesteps, 2, 3, 4, 4, seed=20)
    got = reference_sample_loop(model, d, x_T, method=method, noise=noises, cond_fn=cond_fn, class_labels=y)
    x = x_T
    for i in reversed(range(d.num_timesteps)):
        idx = torch.full((2,), i)
        t = d.model_timesteps(idx)
        x, _ = d.p_sample_step(x, model(x, t), idx, noises[i], method=method, guidance_grad=_cond_fn(x, t))
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    scale = 1000 / 100 if rescale else 1
    assert [c[0].tolist() for c in calls] == [[t * scale] * 2 for t in d.timestep_map.flip(0).tolist()]
    assert all(c[1].tolist() == [1, 2] for c in calls)
    unguided = reference_sample_loop(model, d, x_T, method=method, noise=noises, class_labels=y)
    assert (unguided - got).abs().max() > 1e-3


def test_combine_cfg():
    cond, uncond = randn(2, 6, 4, 4, seed=21), randn(2, 6, 4, 4, seed=22)
    out = combine_cfg(torch.cat([cond, uncond]), 3.0, 3)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])                      # conditional variance channels
    torch.testing.assert_close(combine_cfg(torch.cat([cond, uncond]), 1.0, 6), cond)   # scale 1: conditional


def test_classifier_free_guidance_one_doubled_call():
    calls = []

    def model(x, t, y=None, mask=None):
        calls.append((x.shape[0], t.tolist(), y.tolist(), None if mask is None else mask.shape[0]))
        return fake_model(x, t) * (1 + y.float().reshape(-1, 1, 1, 1))

    x, t, y = randn(2, 3, 4, 4, seed=23), torch.tensor([7, 9]), torch.tensor([1, 4])
    x2, t2, kw = cfg_model_inputs(x, t, {"y": y, "mask": torch.ones(2, 5), "flag": 3}, null_label=10)
    assert x2.shape[0] == 4 and t2.tolist() == [7, 9, 7, 9] and kw["y"].tolist() == [1, 4, 10, 10]
    assert kw["mask"].shape[0] == 4 and kw["flag"] == 3
    out = guided_model_output(model, x, t, {"y": y}, guidance_scale=2.5, null_label=0)
    assert calls == [(4, [7, 9, 7, 9], [1, 4, 0, 0], None)]
    cond, uncond = model(x, t, y=y), model(x, t, y=torch.zeros_like(y))
    torch.testing.assert_close(out, uncond + 2.5 * (cond - uncond))


def test_loop_classifier_free_guidance():
    d = Diffusion("linear", 50, variance="learned_range").skip(5)
    n_calls = []

    def model(x, t, y=None):
        n_calls.append(x.shape[0])
        base = fake_model(x, t) * (1 + 0.1 * y.float().reshape(-1, 1, 1, 1))
        return torch.cat([base, torch.tanh(base + y.float().reshape(-1, 1, 1, 1))], dim=1)

    x_T = randn(2, 3, 4, 4, seed=24)
    noises = randn(d.num_timesteps, 2, 3, 4, 4, seed=25)
    y = torch.tensor([3, 5])
    got = reference_sample_loop(model, d, x_T, noise=noises, class_labels=y, guidance_scale=3.0, null_label=9,
                                num_classes=9)
    assert n_calls == [4] * d.num_timesteps
    x = x_T
    for i in reversed(range(d.num_timesteps)):
        idx = torch.full((2,), i)
        t = d.model_timesteps(idx)
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 9))
        out = torch.cat([uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
        x, _ = d.p_sample_step(x, out, idx, noises[i])
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)


# ---- the loop -----------------------------------------------------------------------------------------------

def test_loop_clip_clamps_x_T_and_samples():
    d = Diffusion("cosine", 20)
    first = []

    def model(x, t, **kw):
        if not first:
            first.append(x.clone())
        return fake_model(x, t) * 3

    x_T = randn(2, 3, 8, 8, seed=26) * 3
    out = reference_sample_loop(model, d, x_T, clip=(-0.5, 0.5), clip_denoised=False,
                                noise=torch.Generator().manual_seed(1))
    assert first[0].abs().max() <= 0.5 and x_T.abs().max() > 0.5
    assert out.abs().max() <= 0.5
    out2 = reference_sample_loop(model, d, x_T, clip={"min": -0.5, "max": 0.5}, clip_denoised=False,
                                 noise=torch.Generator().manual_seed(1))
    assert torch.equal(out, out2)                                    # the seed's dict form


def test_loop_noise_sources():
    d = Diffusion("cosine", 30).skip(4)
    # a generator: reproducible, x_T drawn from it first
    a = reference_sample_loop(fake_model, d, (2, 3, 4, 4), noise=torch.Generator().manual_seed(3))
    b = reference_sample_loop(fake_model, d, (2, 3, 4, 4), noise=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # None: torch's global RNG in guided-diffusion's order (x_T, then one randn_like per step)
    torch.manual_seed(11)
    c = reference_sample_loop(fake_model, d, (2, 3, 4, 4), device="cpu")
    torch.manual_seed(11)
    x = torch.randn(2, 3, 4, 4)
    for i in reversed(range(d.num_timesteps)):
        idx = torch.full((2,), i)
        x, _ = d.p_sample_step(x, fake_model(x, d.model_timesteps(idx)), idx, torch.randn_like(x))
    assert torch.equal(c, x)
    # a callable gets the step index
    seen = []
    reference_sample_loop(fake_model, d, x, noise=lambda i, like: seen.append(i) or torch.zeros_like(like))
    assert seen == list(reversed(range(d.num_timesteps)))


def test_loop_keeps_dtype():
    d = Diffusion("cosine", 10)
    x_T = randn(1, 3, 4, 4, seed=27).to(torch.bfloat16)
    out = reference_sample_loop(lambda x, t: fake_model(x.float(), t).to(x.dtype), d, x_T,
                                noise=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ---- bad options -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(schedule="quadratic"), "schedule"), (dict(variance="small"), "variance"),
    (dict(prediction="eps"), "prediction"), (dict(timesteps=0), "timesteps"),
    (dict(schedule=[0.1, 1.5]), "schedule"), (dict(schedule=np.zeros((2, 2))), "schedule"),
    (dict(schedule=[0.1, 0.2], timesteps=3), "timesteps"),
])
def test_bad_constructor_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Diffusion(**kwargs)


@pytest.mark.parametrize("spec,name", [("ddim6", "spec"), ("11", "spec"), ("6,6", "spec"), ("abc", "spec"),
                                       ([], "spec"), ([3, 10], "spec"), ("-1", "spec"),
                                       ("trailing11", "num_inference_steps")])
def test_bad_respacing(spec, name):
    with pytest.raises(ValueError, match=name):
        Diffusion("cosine", 10).respace(spec)


@pytest.mark.parametrize("k", [0, -2, "cubic", 1.5])
def test_bad_skip(k):
    with pytest.raises(ValueError, match="K"):
        Diffusion("cosine", 10).skip(k)


@pytest.mark.parametrize("kwargs,name", [
    (dict(method="euler"), "method"), (dict(noise_mode="half"), "noise_mode"),
    (dict(project_noise="sphere"), "project_noise"), (dict(eta=1.5), "eta"), (dict(eta=-0.1), "eta"),
    (dict(stochasticity=2.0), "stochasticity"), (dict(clip=(1.0, -1.0)), "clip"),
    (dict(dynamic_threshold=(1.5, 2.0)), "dynamic_threshold"),
])
def test_bad_step_options(kwargs, name):
    d = Diffusion("cosine", 10)
    x = randn(2, 3, 4, 4)
    kwargs = {"method": "ddim", **kwargs}
    with pytest.raises(ValueError, match=name):
        d.p_sample_step(x, x, torch.tensor([1, 2]), **kwargs)
    with pytest.raises(ValueError, match=name):
        reference_sample_loop(fake_model, d, x, **kwargs)


def test_bad_step_inputs():
    d = Diffusion("cosine", 10, variance="learned_range")
    x = randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="model_output"):
        d.p_sample_step(x, x, torch.tensor([1, 2]))                    # learned variance needs 6 channels
    with pytest.raises(ValueError, match="model_output"):
        Diffusion("cosine", 10).p_sample_step(x, torch.cat([x, x], 1), torch.tensor([1, 2]))
    out = torch.cat([x, x.tanh()], 1)
    with pytest.raises(ValueError, match="step_index"):
        d.p_sample_step(x, out, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="step_index"):
        d.p_sample_step(x, out, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="step_index"):
        d.p_sample_step(x, out, torch.tensor([1]))
    with pytest.raises(ValueError, match="noise"):
        d.p_sample_step(x, out, torch.tensor([1, 2]), randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="coef"):
        d.p_sample_step(x, out, torch.tensor([1, 2]), coef=torch.zeros(2, 3))


def test_bad_loop_inputs():
    d = Diffusion("cosine", 10)
    x = randn(2, 3, 4, 4)

    class Model:
        num_classes = 10

        def __call__(self, x, t, y=None):
            return fake_model(x, t)

    with pytest.raises(ValueError, match="class_labels"):
        reference_sample_loop(Model(), d, x, class_labels=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="class_labels"):
        reference_sample_loop(Model(), d, x, class_labels=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="class_labels"):
        reference_sample_loop(fake_model, d, x, class_labels=torch.tensor([1, 2]), num_classes=2)
    with pytest.raises(ValueError, match="class_labels"):
        reference_sample_loop(Model(), d, x, class_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="null_label"):
        reference_sample_loop(Model(), d, x, class_labels=torch.tensor([1, 2]), guidance_scale=2.0)
    with pytest.raises(ValueError, match="cond_fn"):
        reference_sample_loop(Model(), d, x, cond_fn=lambda x, t: x[:1])
    with pytest.raises(ValueError, match="model_output"):
        reference_sample_loop(lambda x, t: torch.cat([x, x], 1), d, x)
    ok = reference_sample_loop(Model(), d, x, class_labels=torch.tensor([0, 9]), noise=torch.Generator())
    assert ok.shape == x.shape


# ---- device --------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_loop_on_cuda_matches_cpu(method):
    d = Diffusion("cosine", 100, variance="learned_range", rescale_timesteps=True).skip(4)

    def model(x, t, y=None):
        out = fake_model(x, t)
        return torch.cat([out, torch.tanh(out)], dim=1)

    x_T = randn(2, 3, 8, 8, seed=40)
    noises = randn(d.num_timesteps, 2, 3, 8, 8, seed=41)
    kw = dict(method=method, eta=0.5, class_labels=torch.tensor([1, 2]), cond_fn=_cond_fn,
              guidance_scale=2.0, null_label=0)
    cpu = reference_sample_loop(model, d, x_T, noise=noises, **kw)
    gpu = reference_sample_loop(model, d, x_T.cuda(), noise=noises.cuda(), **kw)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    idx = torch.tensor([0, 5], device="cuda")
    assert d.model_timesteps(idx).device.type == "cuda"
    assert torch.equal(d.gather_coefficients(idx, 0.5).cpu(), d.coefficients(0.5).float()[[0, 5]])
