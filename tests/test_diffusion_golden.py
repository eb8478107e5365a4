"""ddpm_fast.diffusion against the goldens of openai/guided-diffusion (tests/golden/adm_diffusion_a.pt):
respacing maps and tables, single reverse steps (DDPM/DDIM, learned/fixed variance, classifier
guidance) and a whole deterministic DDIM loop."""
import pytest
import torch

from ddpm_fast import Diffusion
from ddpm_fast.diffusion import reference_sample_loop


def _process(entry, variance="fixed_small"):
    return Diffusion(schedule=entry["schedule"], timesteps=entry["T"], variance=variance).respace(entry["respacing"])


def _ids(entries, keys):
    return ["-".join(str(e[k]) for k in keys) for e in entries]


def test_golden_has_expected_entries(golden_diffusion):
    assert len(golden_diffusion["respacing"]) == 5
    assert len(golden_diffusion["steps"]) == 5
    assert len(golden_diffusion["loops"]) == 1


@pytest.mark.parametrize("i", range(5))
def test_respacing_matches_guided_diffusion(golden_diffusion, i):
    entry = golden_diffusion["respacing"][i]
    spaced = _process(entry)
    assert torch.equal(spaced.timestep_map, entry["timestep_map"]), entry["respacing"]
    assert spaced.num_timesteps == entry["timestep_map"].numel()
    assert spaced.original_num_steps == entry["T"]
    assert spaced.betas.dtype == torch.float64 and spaced.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(spaced.betas, entry["betas"], rtol=0, atol=1e-12)
    torch.testing.assert_close(spaced.alphas_cumprod, entry["alphas_cumprod"], rtol=0, atol=1e-12)


def test_respacing_explicit_list_equals_string_spec(golden_diffusion):
    entry = golden_diffusion["respacing"][4]          # "10,15,20"
    base = Diffusion(schedule=entry["schedule"], timesteps=entry["T"])
    from_list = base.respace(entry["timestep_map"].tolist()[::-1])   # order does not matter
    assert torch.equal(from_list.timestep_map, entry["timestep_map"])
    torch.testing.assert_close(from_list.betas, entry["betas"], rtol=0, atol=1e-12)


def _cond_fn(x, t, **kwargs):
    # the goldens' classifier gradient, t = ORIGINAL timesteps
    return -0.3 * x + 0.05 * t.float().reshape(-1, 1, 1, 1) / 1000


@pytest.mark.parametrize("i", range(5))
def test_single_steps_match_guided_diffusion(golden_diffusion, i):
    e = golden_diffusion["steps"][i]
    d = _process(e, variance=e["variance"])
    grad = None
    if e["guided"]:
        t = d.model_timesteps(e["step_index"])
        assert torch.equal(t, d.timestep_map[e["step_index"]])
        grad = _cond_fn(e["x"], t)
    sample, pred_x0 = d.p_sample_step(e["x"], e["model_output"], e["step_index"], e["noise"],
                                      method=e["method"], eta=e["eta"], clip_denoised=e["clip_denoised"],
                                      guidance_grad=grad)
    # atol 1e-5; unclipped entries reach |x0| ~ 9e4 and |sample| ~ 2e3, where float32 spacing alone
    # exceeds 1e-5, hence also rtol 1e-6 (a few ulps)
    torch.testing.assert_close(pred_x0, e["pred_xstart"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(sample, e["sample"], rtol=1e-6, atol=1e-5)


def test_guided_step_differs_from_unguided(golden_diffusion):
    """The guided golden entry really needs the gradient (the test above could not pass without it)."""
    e = next(s for s in golden_diffusion["steps"] if s["guided"])
    d = _process(e, variance=e["variance"])
    sample, _ = d.p_sample_step(e["x"], e["model_output"], e["step_index"], e["noise"], method=e["method"],
                                clip_denoised=e["clip_denoised"])
    assert (sample - e["sample"]).abs().max() > 1e-4


def _fake_model(x, t, **kwargs):
    # tests/golden/README.md / the entry's `fake_model` string (learn_sigma False here)
    tt = t.float().reshape(-1, 1, 1, 1) / 1000
    return 0.5 * torch.tanh(x) * (1 + tt) + 0.1 * torch.sin(3 * x + tt)


def test_ddim_loop_matches_guided_diffusion(golden_diffusion):
    e = golden_diffusion["loops"][0]
    assert e["learn_sigma"] is False and e["method"] == "ddim" and e["eta"] == 0.0
    d = _process(e)
    calls = []

    def model(x, t, **kw):
        calls.append(t.clone())
        return _fake_model(x, t)

    out = reference_sample_loop(model, d, e["x_T"], method="ddim", eta=e["eta"],
                                clip_denoised=e["clip_denoised"], noise=lambda i, x: torch.zeros_like(x))
    torch.testing.assert_close(out, e["out"], rtol=0, atol=1e-5)
    assert [int(t[0]) for t in calls] == d.timestep_map.flip(0).tolist()
