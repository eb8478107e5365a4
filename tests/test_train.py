"""The trainer: exact resume after an interruption, the hybrid loss's L_vlb against a direct
computation with torch.distributions, atomic checkpoints, the CLI and the export bundle."""
import json
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ddpm_fast import train as T
from ddpm_fast.diffusion import Diffusion

TINY_UNET = dict(image_size=8, in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1,
                 attention_resolutions=(2,), dropout=0.1, channel_mult=(1, 2), num_classes=11, num_heads=1,
                 use_scale_shift_norm=True, resblock_updown=True)


def tiny_config(**kw):
    cfg = T.TrainConfig(unet=dict(TINY_UNET), batch_size=4, lr=1e-3, lr_warmup=2, ema_decay=0.9, ema_warmup=2,
                        grad_clip=0.5, label_dropout=0.5, image_size=8, checkpoint_every=1000, log_every=1)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def tiny_data():
    d = T.digits_data(image_size=8)
    return d["x_train"][:64], d["y_train"][:64]


def _assert_same_state(a: T.Trainer, b: T.Trainer):
    assert a.step == b.step
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=f"model {ka}")
    for (ka, va), (kb, vb) in zip(a.ema.state_dict().items(), b.ema.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=f"ema {ka}")
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for name in sa["state"][i]:
            torch.testing.assert_close(sa["state"][i][name], sb["state"][i][name], rtol=0, atol=0)


def test_interrupted_run_resumes_exactly(tmp_path, tiny_data):
    """Run A: 5 uninterrupted steps. Run B: interrupted (KeyboardInterrupt) during step 4, resumed
    from its checkpoint (written at the interruption, step 3) and finished: identical weights,
    EMA and optimizer state; the checkpoint holds the step and optimizer state of step 3."""
    a = T.Trainer(tiny_config(), out_dir=tmp_path / "a", data=tiny_data)
    a.fit(steps=5, progress=False)

    b = T.Trainer(tiny_config(), out_dir=tmp_path / "b", data=tiny_data)
    real_step = b.train_step

    def interrupted_step():
        if b.step == 3:
            raise KeyboardInterrupt
        return real_step()

    b.train_step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        b.fit(steps=5, progress=False)
    saved = torch.load(tmp_path / "b" / T.CHECKPOINT_NAME, weights_only=False)
    assert saved["step"] == 3
    assert all(s["step"] == 3 for s in saved["opt"]["state"].values())

    c = T.Trainer.resume(tmp_path / "b" / T.CHECKPOINT_NAME, out_dir=tmp_path / "b", data=tiny_data)
    assert c.step == 3
    ref3 = T.Trainer(tiny_config(), data=tiny_data)
    ref3.fit(steps=3, progress=False)
    _assert_same_state(ref3, c)          # resumed state == the state after 3 uninterrupted steps
    c.fit(steps=5, progress=False)
    _assert_same_state(a, c)             # and the next steps give the same parameters
    # the parameters did move, so the equality above says something
    fresh = T.Trainer(tiny_config(), data=tiny_data)
    assert any(not torch.equal(p, q) for p, q in zip(fresh.model.parameters(), a.model.parameters()))


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    T.atomic_save({"v": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(T.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        T.atomic_save({"v": 2}, path)
    with pytest.raises(OSError):
        T.atomic_save({"v": 3}, tmp_path / "new.pt")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]    # no temp file, no new.pt
    assert torch.load(path, weights_only=False) == {"v": 1}           # the old checkpoint is intact


def _direct_vb_bits(diffusion, x0, x_t, idx, eps, v):
    """L_t in bits/dim computed independently: float64 tables from the betas, torch.distributions."""
    betas = diffusion.betas.double()
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    x0, x_t, eps, v = (t.double() for t in (x0, x_t, eps, v))
    out = []
    for i in range(x0.shape[0]):
        s = int(idx[i])
        c1 = betas[s] * ab_prev[s].sqrt() / (1 - ab[s])
        c2 = (1 - ab_prev[s]) * (1 - betas[s]).sqrt() / (1 - ab[s])
        true_mean = c1 * x0[i] + c2 * x_t[i]
        x0_hat = (x_t[i] - (1 - ab[s]).sqrt() * eps[i]) / ab[s].sqrt()
        model_mean = c1 * x0_hat + c2 * x_t[i]
        frac = (v[i] + 1) / 2
        logvar = frac * torch.log(betas[s]) + (1 - frac) * post_logvar[s]
        p = Normal(model_mean, torch.exp(0.5 * logvar))
        if s == 0:
            upper = torch.where(x0[i] > 0.999, torch.full_like(x0[i], math.inf), x0[i] + 1 / 255)
            lower = torch.where(x0[i] < -0.999, torch.full_like(x0[i], -math.inf), x0[i] - 1 / 255)
            nats = -torch.log(p.cdf(upper) - p.cdf(lower))
        else:
            q = Normal(true_mean, torch.exp(0.5 * post_logvar[s]))
            nats = kl_divergence(q, p)
        out.append(nats.mean() / math.log(2))
    return torch.stack(out)


def test_hybrid_vb_term_matches_direct_lvlb():
    diffusion = Diffusion("cosine", 1000, "learned_range")
    g = torch.Generator().manual_seed(0)
    b = 6
    x0 = torch.rand(b, 1, 4, 4, generator=g) * 2 - 1
    x0[:, :, 0, 0], x0[:, :, 0, 1] = -1.0, 1.0                  # the decoder's edge bins
    idx = torch.tensor([0, 0, 1, 10, 500, 999])
    noise = torch.randn(x0.shape, generator=g)
    x_t = diffusion.q_sample(x0, idx, noise)
    eps = noise + 0.1 * torch.randn(x0.shape, generator=g)
    v = torch.rand(x0.shape, generator=g) * 2 - 1
    got = T.vb_terms_bpd(diffusion, torch.cat([eps, v], 1), x0, x_t, idx)
    want = _direct_vb_bits(diffusion, x0, x_t, idx, eps, v)
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=1e-5)

    # in the hybrid loss: scaled by T / 1000, the prediction channels frozen, the variance live
    out = torch.cat([eps, v], 1).requires_grad_(True)
    terms = T.training_losses(lambda x, t, y: out, diffusion, x0, idx, noise, None, "hybrid")
    torch.testing.assert_close(terms["vb"], got * (diffusion.num_timesteps / 1000.0))
    torch.testing.assert_close(terms["mse"], (eps - noise).pow(2).mean(dim=(1, 2, 3)))
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert grad_vb[:, :1].abs().max() == 0 and grad_vb[:, 1:].abs().max() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_mse[:, 1:].abs().max() == 0

    # a respaced process scales the bound by its own step count
    spaced = diffusion.respace("50")
    terms50 = T.training_losses(lambda x, t, y: out, spaced, x0, torch.tensor([0, 0, 1, 10, 25, 49]),
                                noise, None, "hybrid")
    assert torch.isfinite(terms50["vb"]).all()


def test_loss_options_are_checked():
    fixed = Diffusion("cosine", 100, "fixed_small")
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="hybrid"):
        T.training_losses(lambda *a: x, fixed, x, torch.tensor([1, 2]), x, None, "hybrid")
    with pytest.raises(ValueError, match="loss"):
        T.training_losses(lambda *a: x, fixed, x, torch.tensor([1, 2]), x, None, "l1")
    with pytest.raises(ValueError, match="label_dropout"):
        T.TrainConfig(label_dropout=1.5).validate()


def test_digits_data_split_and_range():
    d = T.digits_data(16)
    assert d["x_train"].shape[1:] == (1, 16, 16) and d["x_test"].shape[1:] == (1, 16, 16)
    assert d["x_train"].shape[0] + d["x_test"].shape[0] == 1797
    assert d["x_test"].shape[0] == 360                          # 20 % held out, stratified
    assert d["x_train"].min() >= -1 and d["x_train"].max() <= 1
    assert set(d["y_test"].tolist()) == set(range(10))
    again = T.digits_data(16)
    assert torch.equal(again["y_test"], d["y_test"]) and torch.equal(again["x_test"], d["x_test"])


def test_cli_trains_and_exports(tmp_path):
    out, assets = tmp_path / "run", tmp_path / "assets"
    rc = T.main(["--out", str(out), "--steps", "2", "--batch-size", "2", "--num-res-blocks", "1", "--quiet",
                 "--export", str(assets), "--name", "toy"])
    assert rc == 0
    state = torch.load(out / T.CHECKPOINT_NAME, weights_only=False)
    assert state["step"] == 2 and state["config"]["batch_size"] == 2
    meta = json.loads((assets / "toy.json").read_text())
    assert meta["unet"]["num_res_blocks"] == 1 and meta["null_label"] == 10
    assert meta["diffusion"] == T.DIGITS_DIFFUSION
    assert "--attention_resolutions 8,4" in meta["flags"] and "--learn_sigma True" in meta["flags"]
    from safetensors.torch import load_file
    weights = load_file(str(assets / "toy.safetensors"))
    assert weights.keys() == state["ema"].keys()
    for k, w in weights.items():
        torch.testing.assert_close(w, state["ema"][k])
    # --export-only writes the same bundle from the checkpoint without training
    assert T.main(["--out", str(out), "--export-only", "--export", str(tmp_path / "again"), "--name", "toy"]) == 0
    again = load_file(str(tmp_path / "again" / "toy.safetensors"))
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    assert torch.load(out / T.CHECKPOINT_NAME, weights_only=False)["step"] == 2
    # resuming with the same --out continues from step 2
    assert T.main(["--out", str(out), "--steps", "3", "--batch-size", "2", "--num-res-blocks", "1", "--quiet"]) == 0
    assert torch.load(out / T.CHECKPOINT_NAME, weights_only=False)["step"] == 3


# ---- gradient accumulation and augmentation (issue 18) ------------------------------------------------

def _no_dropout(**kw):
    return tiny_config(unet=dict(TINY_UNET, dropout=0.0), **kw)


def test_grad_accum_equals_one_batch_of_n_times_b(tiny_data):
    """3 micro-batches of 4 give the gradients, the AdamW step and the EMA update of one batch of 12
    (the same 12 samples), within fp32 tolerance, in one optimizer step."""
    n, b = 3, 4
    acc = T.Trainer(_no_dropout(grad_accum=n, batch_size=b), data=tiny_data)
    big = T.Trainer(_no_dropout(grad_accum=1, batch_size=n * b), data=tiny_data)
    micro = [acc._batch() for _ in range(n)]
    whole = tuple(torch.cat([m[i] for m in micro]) for i in range(4))
    feed = iter(micro * 2)
    acc._batch = lambda: next(feed)
    big._batch = lambda: whole
    la, lb = acc.accumulate_gradients(), big.accumulate_gradients()
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)
    for (name, p), q in zip(acc.model.named_parameters(), big.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    acc.train_step()
    big.train_step()
    assert acc.step == big.step == 1
    assert all(s["step"] == 1 for s in acc.opt.state_dict()["state"].values())
    for p, q in zip(acc.model.parameters(), big.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    for p, q in zip(acc.ema.parameters(), big.ema.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    fresh = T.Trainer(_no_dropout(), data=tiny_data)
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(acc.model.parameters(), fresh.model.parameters()))


def test_grad_accum_logs_effective_batch_and_resumes_mid_accumulation(tmp_path, tiny_data):
    """Interrupted in the 2nd micro-batch of step 2 (of 3 per step), resumed from the checkpoint
    written at the interruption (step 1) and finished: identical to an uninterrupted run."""
    a = T.Trainer(tiny_config(grad_accum=3), out_dir=tmp_path / "a", data=tiny_data)
    a.fit(steps=3, progress=False)
    lines = [json.loads(l) for l in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert lines and all(l["effective_batch"] == 12 for l in lines)
    saved = torch.load(tmp_path / "a" / T.CHECKPOINT_NAME, weights_only=False)
    assert saved["effective_batch"] == 12 and saved["config"]["grad_accum"] == 3

    b = T.Trainer(tiny_config(grad_accum=3), out_dir=tmp_path / "b", data=tiny_data)
    real_batch, calls = b._batch, []

    def interrupted_batch():
        calls.append(1)
        if len(calls) == 5:
            b.generator.manual_seed(123)    # even a disturbed generator is rewound
            raise KeyboardInterrupt
        return real_batch()

    b._batch = interrupted_batch
    with pytest.raises(KeyboardInterrupt):
        b.fit(steps=3, progress=False)
    assert torch.load(tmp_path / "b" / T.CHECKPOINT_NAME, weights_only=False)["step"] == 1
    c = T.Trainer.resume(tmp_path / "b" / T.CHECKPOINT_NAME, out_dir=tmp_path / "b", data=tiny_data)
    c.fit(steps=3, progress=False)
    _assert_same_state(a, c)


def test_grad_accum_and_augment_are_checked():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="grad_accum"):
            T.TrainConfig(grad_accum=bad).validate()
    for bad in ("flop", "rot", "rot:0", "rot:200", "rot:x", "flip,flip", "rot:5,rot:6"):
        with pytest.raises(ValueError, match="augment"):
            T.parse_augment(bad)
    assert T.parse_augment("flip,rot:12.5") == (True, 12.5)
    assert T.parse_augment("rot:7") == (False, 7.0) and T.parse_augment("") == (False, 0.0)


def test_rotation_is_exact_at_right_angles_and_fills_with_the_background():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    turned = T.rotate(x, torch.tensor([90.0, -90.0]))
    torch.testing.assert_close(turned[0], torch.rot90(x[0], 1, (-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(turned[1], torch.rot90(x[1], -1, (-2, -1)), atol=1e-5, rtol=0)
    # a digit on blank paper (-1): rotated by 45 degrees its corners stay blank paper; a fill of 0
    # (what zero padding gives in [-1, 1]) would put mid-grey triangles there
    digit = torch.full((1, 1, 16, 16), -1.0)
    digit[..., 4:12, 6:10] = 0.8
    assert T.background_value(digit).item() == -1.0
    ours = T.rotate(digit, torch.tensor([45.0]))
    zero = T.rotate(digit, torch.tensor([45.0]), fill=torch.zeros(1, 1, 1, 1))
    for corner in (ours[..., 0, 0], ours[..., 0, -1], ours[..., -1, 0], ours[..., -1, -1]):
        assert corner.item() == pytest.approx(-1.0, abs=1e-6)
    assert zero[..., 0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert (zero > -0.99).sum() > (ours > -0.99).sum() + 30
    flat = torch.full((1, 1, 8, 8), 0.3)
    torch.testing.assert_close(T.rotate(flat, torch.tensor([30.0])), flat, atol=1e-6, rtol=0)


def test_augmentation_statistics_and_composition():
    n, deg = 20000, 10.0
    flips, angles = T.draw_augmentation(n, "flip,rot:10", torch.Generator().manual_seed(1))
    assert abs(flips.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert angles.abs().max() <= deg and angles.min() < -0.99 * deg and angles.max() > 0.99 * deg
    assert abs(angles.mean().item()) < 4 * deg / math.sqrt(3 * n)
    assert angles.var().item() == pytest.approx(deg ** 2 / 3, rel=0.05)        # uniform on [-10, 10]
    assert abs((angles.abs() < deg / 2).float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert T.draw_augmentation(4, "", torch.Generator()) == (None, None)
    # augment = the drawn flips, then the drawn rotations
    x = T.digits_data(8)["x_train"][:64]
    got = T.augment(x, "flip,rot:10", torch.Generator().manual_seed(2))
    f, a = T.draw_augmentation(64, "flip,rot:10", torch.Generator().manual_seed(2))
    want = T.rotate(torch.where(f[:, None, None, None], x.flip(-1), x), a)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert 0 < f.sum() < 64
    flipped = T.augment(x, "flip", torch.Generator().manual_seed(3))
    is_flipped = (flipped == x.flip(-1)).flatten(1).all(1) & ~(flipped == x).flatten(1).all(1)
    assert 16 < int(is_flipped.sum()) < 48


def test_trainer_uses_augmentation(tiny_data):
    """The trainer's micro-batch is its data pick, augmented with the next draws of the run's
    generator (seed + 1); without augmentation it is the pick itself."""
    plain = T.Trainer(tiny_config(), data=tiny_data)
    aug = T.Trainer(tiny_config(augment="flip,rot:15"), data=tiny_data)
    x_plain, x_aug = plain._batch()[0], aug._batch()[0]
    g = torch.Generator().manual_seed(tiny_config().seed + 1)
    pick = torch.randint(0, tiny_data[0].shape[0], (4,), generator=g)
    torch.testing.assert_close(x_plain, tiny_data[0][pick], rtol=0, atol=0)
    torch.testing.assert_close(x_aug, T.augment(tiny_data[0][pick], "flip,rot:15", g), rtol=0, atol=0)
    assert (x_aug - x_plain).abs().max() > 0.1


@pytest.mark.skipif(not T.fused_by_default("cpu"), reason="no fused CPU kernels built")
def test_fused_training_matches_the_reference_ops(tiny_data):
    """Trainer(fused=True) (forward and backward on the fused ops) against fused=False (the
    reference ops, PyTorch's autograd): the same losses, gradients and EMA over three steps
    (dropout on, hybrid loss, label dropout), to float32 rounding. Both run the reference-op
    check: the fused trainer's model really is on the fused backend."""
    fused = T.Trainer(tiny_config(), data=tiny_data, fused=True)
    ref = T.Trainer(tiny_config(), data=tiny_data, fused=False)
    assert fused.model.backend == "auto" and fused.model.fast and ref.model.backend == "torch"
    for _ in range(3):
        lf, lr = fused.train_step(), ref.train_step()
        for key in ("loss", "mse", "vb"):
            assert math.isclose(lf[key], lr[key], rel_tol=1e-4, abs_tol=1e-6), (key, lf[key], lr[key])
        assert math.isclose(lf["grad_norm"], lr["grad_norm"], rel_tol=1e-3)
    for (name, a), b in zip(fused.ema.state_dict().items(), ref.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"ema {name}")


def test_fused_flag_on_the_command_line(monkeypatch, tmp_path):
    seen = {}

    def fake_train(cfg, out, **kw):
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(T, "train", fake_train)
    for flag, expected in (([], None), (["--fused"], True), (["--no-fused"], False)):
        with pytest.raises(SystemExit):
            T.main(["--out", str(tmp_path), "--steps", "1", *flag])
        assert seen["fused"] is expected
