"""ddpm_fast.philox: the Philox4x32-10 + Box-Muller construction (the reference of the in-kernel
noise), checked against Random123's known answers, the documented construction, the normal
distribution, and the independence and batch-invariance properties the samplers rely on. The
kernels' copies of the generator are compared with it in test_diffusion_step.py."""
import math

import pytest
import torch

from ddpm_fast import philox

# Random123 tests/kat_vectors (github.com/DEShawResearch/random123), the three "philox4x32 10" lines:
# counter (4 words), key (2 words) -> output (4 words).
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox4x32_10_known_answers(counter, key, expected):
    out = philox.philox4x32_10(counter, key)
    assert [int(w) for w in out] == list(expected)


def test_philox4x32_10_vectorised_matches_scalar_calls():
    # broadcasting over tensors gives the same words as one call per counter
    ctr0 = torch.tensor([0, 1, 0xFFFFFFFF, 12345])
    key0 = torch.tensor([[0], [0xDEADBEEF]])
    words = philox.philox4x32_10((ctr0, 7, 0, 9), (key0, 3))
    for i in range(2):
        for j in range(4):
            single = philox.philox4x32_10((int(ctr0[j]), 7, 0, 9), (int(key0[i, 0]), 3))
            assert [int(w[i, j]) for w in words] == [int(w) for w in single]


def test_uniform_from_bits_is_open_unit_interval_and_exact():
    r = torch.tensor([0, 511, 512, 0xFFFFFFFF])
    u = philox.uniform_from_bits(r)
    assert u.tolist() == [2.0 ** -24, 2.0 ** -24, 3 * 2.0 ** -24, 1 - 2.0 ** -24]
    assert torch.equal(u, u.float().double())  # exactly float32 values


def _documented_normal(seed: int, step: int, i: int) -> float:
    """Element i of the docstring's construction, written out for one element."""
    mask = 0xFFFFFFFF
    words = philox.philox4x32_10((i // 4, step & mask, (step >> 32) & mask, philox.NOISE_STREAM),
                                 (seed & mask, (seed >> 32) & mask))
    r = [int(w) for w in words]
    u = [((w >> 9) + 0.5) / 2 ** 23 for w in r]
    lane = i % 4
    radius = math.sqrt(-2 * math.log(u[0 if lane < 2 else 2]))
    angle = 2 * math.pi * u[1 if lane < 2 else 3]
    return radius * (math.cos(angle) if lane % 2 == 0 else math.sin(angle))


@pytest.mark.parametrize("seed,step", [(0, 0), (123456789, 7), (-5, 3), ((17 << 32) + 4, 2 ** 40 + 1),
                                       (42, philox.INITIAL_NOISE_STEP)])
def test_philox_normal_follows_the_documented_construction(seed, step):
    z = philox.philox_normal(torch.tensor([seed]), step, (11,))
    expected = torch.tensor([_documented_normal(seed, step, i) for i in range(11)], dtype=torch.float32)
    torch.testing.assert_close(z[0], expected, rtol=0, atol=1e-6)


def test_philox_normal_shape_dtype_and_flat_index():
    seed = torch.tensor([3, 9])
    z = philox.philox_normal(seed, 5, (3, 4, 5))
    assert z.shape == (2, 3, 4, 5) and z.dtype == torch.float32
    # the element index is the flat NCHW index within the sample: any reshaping of the sample shape
    # with the same number of elements gives the same numbers
    assert torch.equal(z.reshape(2, -1), philox.philox_normal(seed, 5, (60,)))


def test_philox_normal_moments_over_a_million_draws():
    z = philox.philox_normal(torch.arange(4, dtype=torch.int64) * 1000 + 1, 11, (250_000,)).double()
    assert z.numel() == 10 ** 6
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1) < 0.01
    # beyond the two moments: the two-sided 2-sigma tail mass of a standard normal is 0.0455
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.002
    # every lane of a Philox block (cos / sin of either Box-Muller pair) is standard normal too
    lanes = z.reshape(-1, 4)
    assert lanes.mean(0).abs().max().item() < 0.01
    assert (lanes.std(0) - 1).abs().max().item() < 0.01


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


def test_draws_of_different_steps_and_seeds_are_uncorrelated():
    # 2^18 draws per sample: the sample correlation of independent draws has sd 1/512 per sample
    # pair (0.0014 for the whole batch), so |corr| < 1e-2 has a wide margin
    shape = (4, 256, 256)
    base = torch.tensor([1000, 2000])
    z = philox.philox_normal(base, 4, shape)
    assert abs(_corr(z, philox.philox_normal(base, 5, shape))) < 1e-2          # next step
    assert abs(_corr(z, philox.philox_normal(base + 1, 4, shape))) < 1e-2      # neighbouring seeds
    assert abs(_corr(z, philox.philox_normal(base + (1 << 32), 4, shape))) < 1e-2  # high seed word
    assert abs(_corr(z, philox.philox_normal(base, 4 + (1 << 32), shape))) < 1e-2  # high step word
    assert abs(_corr(z, philox.initial_noise(base, shape, backend="torch"))) < 1e-2
    assert abs(_corr(z[0], z[1])) < 1e-2                                        # samples of a batch
    flat = z.reshape(2, -1)
    assert abs(_corr(flat[:, :-1], flat[:, 1:])) < 1e-2                         # neighbouring elements


def test_a_sample_draws_the_same_numbers_whatever_batch_it_is_in():
    seeds = torch.tensor([5, 77, -3, 1 << 40])
    full = philox.philox_normal(seeds, 9, (2, 6, 7))
    for idx in ([2], [3, 0], [1, 2, 3]):
        assert torch.equal(philox.philox_normal(seeds[idx], 9, (2, 6, 7)), full[idx])


def test_step_may_be_an_int_or_a_0_dim_tensor():
    seeds = torch.tensor([1, 2])
    assert torch.equal(philox.philox_normal(seeds, 12, (5,)),
                       philox.philox_normal(seeds, torch.tensor(12), (5,)))


def test_initial_noise_uses_the_reserved_step_id():
    seeds = torch.tensor([8, 9])
    x_t = philox.initial_noise(seeds, (3, 4, 4), backend="torch")
    assert torch.equal(x_t, philox.philox_normal(seeds, philox.INITIAL_NOISE_STEP, (3, 4, 4)))
    assert not torch.equal(x_t, philox.philox_normal(seeds, 0, (3, 4, 4)))


def test_initial_noise_cpu_kernel_matches_reference():
    seeds = torch.tensor([8, 9, 1 << 33])
    for shape in [(3, 16, 16), (3, 5, 7), (1,), (2, 3)]:
        fast = philox.initial_noise(seeds, shape, backend="cpu")
        assert fast.shape == (3, *shape) and fast.dtype == torch.float32
        torch.testing.assert_close(fast, philox.initial_noise(seeds, shape, backend="torch"),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [torch.tensor([1, 2], dtype=torch.int32), torch.tensor([[1, 2]]), [1, 2],
                                 torch.tensor([1.0])])
def test_seed_must_be_int64_vector(bad):
    with pytest.raises(ValueError, match="seed"):
        philox.philox_normal(bad, 0, (4,))
    with pytest.raises(ValueError, match="seed"):
        philox.initial_noise(bad, (4,))


def test_step_must_be_0_dim():
    with pytest.raises(ValueError, match="step"):
        philox.philox_normal(torch.tensor([1]), torch.tensor([1, 2]), (4,))
