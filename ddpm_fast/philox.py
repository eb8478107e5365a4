"""Counter-based Gaussian noise of ddpm_fast: Philox4x32-10 + Box-Muller, the ONE definition.

The same construction is implemented in csrc/include/philox.h (CPU and CUDA kernels) and in
kernels/diffusion_step.py (Triton); change them together. This module is the vectorised
PyTorch reference: exact 32-bit arithmetic emulated with int64 tensors, Box-Muller in float64.

Construction. Sample b of a batch owns the int64 seed `seed[b]`; a reverse step owns an int64
step id `s` (the sampler's step index; INITIAL_NOISE_STEP draws x_T). Element i of the sample
(i = the flat index into its C*H*W elements in NCHW order, 0 <= i < 2^34) gets

    key     = (seed[b] mod 2^32, (seed[b] >> 32) mod 2^32)            seed as 64-bit two's complement
    counter = (i // 4, s mod 2^32, (s >> 32) mod 2^32, NOISE_STREAM)    s likewise
    r0, r1, r2, r3 = Philox4x32_10(counter, key)                         (Random123's definition)
    u_k = (floor(r_k / 2^9) + 1/2) / 2^23                                in (0, 1), exact in float32
    z(4j + 0) = sqrt(-2 ln u0) cos(2 pi u1)      z(4j + 1) = sqrt(-2 ln u0) sin(2 pi u1)
    z(4j + 2) = sqrt(-2 ln u2) cos(2 pi u3)      z(4j + 3) = sqrt(-2 ln u2) sin(2 pi u3)

so element i takes lane i % 4 of Philox block i // 4. The draw depends on (seed[b], s, i) alone:
not on the batch size, the position of the sample in the batch, the backend or the device.
Backends agree to rounding (|dz| < 1e-5: their log / sqrt / sin / cos differ in the last bits).
The largest |z| is sqrt(-2 ln 2^-24) = 5.77.
"""
from __future__ import annotations

import math
import numbers

import torch

# Philox4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
# Random123's philox.h): round multipliers and Weyl key increments.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

NOISE_STREAM = 0x4E4F4953      # counter word 3 of every noise draw ("NOIS"): reserves other words
                               # of the same key for other streams
INITIAL_NOISE_STEP = -1        # the step id of x_T (counter words 1, 2 = 0xffffffff, 0xffffffff);
                               # the sampler's own steps use ids 0 .. S-1
MAX_SAMPLE_NUMEL = 4 << 32     # the block index i // 4 is one 32-bit counter word

_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * b of uint32 values (b: int64 tensor in
    [0, 2^32)), without overflowing int64: b is split into 16-bit halves."""
    p_lo = a * (b & 0xFFFF)                       # < 2^48
    p_hi = a * (b >> 16)                          # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)          # < 2^49: a * b = (p_hi >> 16) * 2^32 + mid
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def _word(w):
    """A counter or key word: an int64 tensor stays one, a Python int stays an int (the arithmetic
    below works on both; no host-to-device scalar copy, so a CUDA graph can capture it)."""
    return w.to(torch.int64) if isinstance(w, torch.Tensor) else int(w)


def philox4x32_10(counter: tuple, key: tuple) -> tuple[torch.Tensor, ...]:
    """Random123's Philox4x32 with 10 rounds. counter: 4 int64 tensors (or ints) holding uint32
    words, key: 2 of them; all broadcast together. Returns the 4 output words as int64 tensors."""
    c0, c1, c2, c3 = (_word(c) for c in counter)
    k0, k1 = (_word(k) for k in key)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return tuple(c if isinstance(c, torch.Tensor) else torch.tensor(c, dtype=torch.int64)
                 for c in (c0, c1, c2, c3))


def uniform_from_bits(r: torch.Tensor) -> torch.Tensor:
    """uint32 words (int64 tensor) -> float64 uniforms (floor(r / 2^9) + 0.5) / 2^23 in (0, 1),
    each exactly a float32."""
    return ((r >> 9).double() + 0.5) * 2.0 ** -23


def _step_words(step, device: torch.device):
    """The two counter words of a step id: Python ints for an int step, 0-dim int64 tensors for a
    0-dim integer tensor on `device`. Neither makes a host-to-device copy or a host sync (a CUDA
    graph can capture the draw)."""
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
            raise ValueError(f"step must be an int or a 0-dim integer tensor; got a {step.dtype} tensor "
                             f"of shape {tuple(step.shape)}")
        if step.device != device:
            raise ValueError(f"step is on {step.device} but seed is on {device}; give the step id on "
                             "seed's device")
        s = step.to(torch.int64)
    elif isinstance(step, numbers.Integral) and not isinstance(step, bool):
        s = int(step)
        if not -(1 << 63) <= s < (1 << 63):
            raise ValueError(f"step must fit in int64; got {s}")
    else:
        raise ValueError(f"step must be an int or a 0-dim integer tensor; got {type(step).__name__}")
    return s & _MASK32, (s >> 32) & _MASK32


def _check_seed(seed) -> torch.Tensor:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.dim() != 1:
        got = (f"{seed.dtype} tensor of shape {tuple(seed.shape)}" if isinstance(seed, torch.Tensor)
               else type(seed).__name__)
        raise ValueError(f"seed must be an int64 tensor of shape (B,); got {got}")
    return seed


def philox_normal(seed: torch.Tensor, step, sample_shape) -> torch.Tensor:
    """The standard normal draws of step id `step` for every sample: (B, *sample_shape) float32.

    seed: (B,) int64, one per sample; step: int or 0-dim int64 tensor (on seed's device; no host
    synchronisation, so it can be captured by a CUDA graph). Element (b, i) is z(i) of the module
    docstring's construction for key seed[b].
    """
    seed = _check_seed(seed)
    sample_shape = tuple(int(d) for d in sample_shape)
    n = math.prod(sample_shape)
    if n > MAX_SAMPLE_NUMEL:
        raise ValueError(f"sample_shape {sample_shape} has {n} elements; at most {MAX_SAMPLE_NUMEL}")
    device = seed.device
    s_lo, s_hi = _step_words(step, device)
    blocks = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    k0 = (seed & _MASK32)[:, None]
    k1 = ((seed >> 32) & _MASK32)[:, None]
    r0, r1, r2, r3 = philox4x32_10((blocks, s_lo, s_hi, NOISE_STREAM), (k0, k1))
    rad_a = torch.sqrt(-2.0 * torch.log(uniform_from_bits(r0)))
    rad_b = torch.sqrt(-2.0 * torch.log(uniform_from_bits(r2)))
    ang_a = (2.0 * math.pi) * uniform_from_bits(r1)
    ang_b = (2.0 * math.pi) * uniform_from_bits(r3)
    z = torch.stack((rad_a * torch.cos(ang_a), rad_a * torch.sin(ang_a),
                     rad_b * torch.cos(ang_b), rad_b * torch.sin(ang_b)), dim=-1)
    return z.reshape(seed.shape[0], -1)[:, :n].float().reshape(seed.shape[0], *sample_shape)


def initial_noise(seed: torch.Tensor, sample_shape, *, backend: str = "auto",
                  step: int | torch.Tensor = INITIAL_NOISE_STEP) -> torch.Tensor:
    """x_T: (B, *sample_shape) float32 standard normal draws of step id INITIAL_NOISE_STEP.

    seed (B,) int64. step: INITIAL_NOISE_STEP, or a 0-dim int64 tensor holding it on seed's device
    (prepared before a CUDA graph capture: the loop then makes no host-to-device copy). backend "torch" evaluates philox_normal; any other backend ("auto", "cpu",
    "cuda", "triton") draws the same numbers (to rounding) inside the fused step kernel
    (ddpm_fast.ops.diffusion_step with coefficients that make x_prev = 0 + 1 * noise).
    """
    seed = _check_seed(seed)
    if backend == "torch":
        return philox_normal(seed, step, sample_shape)
    from .ops.diffusion_step import draw_noise  # noqa: PLC0415 (ops imports this module)

    return draw_noise(seed, step, sample_shape, backend=backend)
