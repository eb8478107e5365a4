"""Argument checks shared by ddpm_fast.sample, ddpm_fast.restore and the command line: one helper
per kind of argument. Each returns the value normalised and raises TypeError (wrong type) or
ValueError (bad value) naming the argument and what was expected.

Seeds. Sample i of base seed s draws its noise from the per-sample int64 key

    key(s, i) = s * 2^32 + i        (two's complement int64; s in [SEED_MIN, SEED_MAX], i in [0, 2^32))

so every (s, i) pair in range has its own key and no two seeds alias; seeds in [0, 2^31) give the
images they always gave. Seeds outside the range are refused (they cannot have keys of their own
in 64 bits next to a 32-bit sample index), as are floats and bools.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
import tempfile
from pathlib import Path
from typing import Iterable

import torch

SEED_MIN = -(1 << 31)
SEED_MAX = (1 << 31) - 1
INDEX_BITS = 32
MAX_SAMPLE_INDEX = (1 << INDEX_BITS) - 1


def _type_name(value) -> str:
    return type(value).__name__


def integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (Python, NumPy or a 0-dim integer tensor; not a bool or a float) in [minimum, maximum]."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int; got bool {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {_type_name(value)} {value!r}") from None
    if (minimum is not None and result < minimum) or (maximum is not None and result > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"{name} must be an int in [{lo}, {hi}]; got {result}")
    return result


def seed(value, name: str = "seed") -> int:
    """A base seed in [SEED_MIN, SEED_MAX] (see the module docstring for its per-sample keys)."""
    try:
        return integer(name, value, minimum=SEED_MIN, maximum=SEED_MAX)
    except ValueError:
        raise ValueError(f"{name} must be an int in [-2^31, 2^31 - 1] = [{SEED_MIN}, {SEED_MAX}] (each "
                         f"sample's noise key is {name} * 2^32 + its index, so larger seeds would "
                         f"share keys); got {value}") from None


def sample_range(start: int, count: int, name: str = "start_index") -> None:
    """Global sample indices start .. start + count - 1 must lie in [0, 2^32) (the key's low word)."""
    integer(name, start, minimum=0)
    if start + count - 1 > MAX_SAMPLE_INDEX:
        raise ValueError(f"sample indices must stay below 2^32; {name}={start} with {count} samples "
                         f"reaches {start + count - 1}")


def number(name: str, value, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) in the interval given by low / high (open ends when
    low_open / high_open)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)) or (
            isinstance(value, torch.Tensor) and (value.numel() != 1 or value.dtype == torch.bool)):
        raise TypeError(f"{name} must be a real number; got {_type_name(value)} {value!r}")
    result = float(value)
    bad_low = low is not None and (result <= low if low_open else result < low)
    bad_high = high is not None and (result >= high if high_open else result > high)
    if not math.isfinite(result) or bad_low or bad_high:
        if low is None and high is None:
            wanted = "be a finite number"
        elif high is None:
            wanted = f"be {'>' if low_open else '>='} {low:g} (a finite number)"
        elif low is None:
            wanted = f"be {'<' if high_open else '<='} {high:g} (a finite number)"
        else:
            wanted = (f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'} "
                      "(a finite number)")
        raise ValueError(f"{name} must {wanted}; got {value!r}")
    return result


def choice(name: str, value, choices: Iterable):
    """One of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def float_dtype(name: str, value) -> torch.dtype | None:
    """None or a floating torch.dtype (float32, float16, bfloat16, float64)."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype (e.g. torch.float16) or None; got {_type_name(value)}")
    if not value.is_floating_point:
        raise ValueError(f"{name} must be a floating dtype (float32, float16, bfloat16); got {value}")
    return value


def finite_tensor(name: str, x, *, dims: int | None = None, what: str = "") -> torch.Tensor:
    """A floating tensor (of `dims` dimensions when given) without NaN or infinity."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{what}; got {_type_name(x)}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-D tensor{what}; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor{what}; got dtype {x.dtype}")
    bad = int((~torch.isfinite(x)).sum()) if x.numel() else 0
    if bad:
        raise ValueError(f"{name} holds {bad} NaN or infinite values; it must be finite")
    return x


def image(name: str, x, *, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """A finite (B, C, H, W) floating tensor with values in [low, high]."""
    finite_tensor(name, x, dims=4, what=" (B, C, H, W)")
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < low - 1e-6 or hi > high + 1e-6:
            raise ValueError(f"{name} must lie in [{low:g}, {high:g}]; its values span [{lo:.3f}, {hi:.3f}]")
    return x


def mask(name: str, m, image_shape: tuple[int, ...]) -> torch.Tensor:
    """An inpainting mask for images of `image_shape` (B, C, H, W): a (B or 1, 1 or C, H, W) tensor
    of 1 = known and 0 = to generate, as bools, integers in {0, 1} or floats in [0, 1] (fractions
    blend). Returns it as float32. A 0/255 mask (what a PNG loads as) gets its own message."""
    b, c, h, w = image_shape
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {_type_name(m)}")
    if m.dim() != 4 or tuple(m.shape[2:]) != (h, w) or m.shape[0] not in (1, b) or m.shape[1] not in (1, c):
        raise ValueError(f"{name} must have shape ({b} or 1, 1 or {c}, {h}, {w}); got {tuple(m.shape)}")
    if m.is_complex():
        raise ValueError(f"{name} must hold real values in [0, 1]; got dtype {m.dtype}")
    if m.dtype == torch.bool:
        return m.float()
    if m.is_floating_point():
        finite_tensor(name, m)
    if m.numel():
        lo, hi = float(m.min()), float(m.max())
        if lo < 0 or hi > 1:
            hint = (" (it looks like a 0/255 image mask: divide it by 255, or threshold it, e.g. "
                    f"{name} >= 128)" if hi > 1 and hi <= 255 and lo >= 0 else "")
            raise ValueError(f"{name} must hold values in [0, 1] (1 = known pixel, 0 = to generate); "
                             f"got values in [{lo:g}, {hi:g}]{hint}")
    return m.float()


def output_file(name: str, path, suffixes: Iterable[str]) -> Path:
    """An output file path checked before any work: its suffix (case-insensitive) is one of
    `suffixes`, it is not a directory, and its directory exists (or is created) and takes a new
    file (probed with a temporary file that is removed at once)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"{name} must be a file path; got {path!r}")
    path = Path(path)
    suffixes = tuple(s.lower() for s in suffixes)
    shown = " or ".join(suffixes[:4]) + (" (or another of its image suffixes)" if len(suffixes) > 4 else "")
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a directory; give a file path ending in {shown} "
                         f"(e.g. {path / ('samples' + suffixes[0])})")
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{name} {str(path)!r} must end in {shown}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"{name} {str(path)!r} cannot be written: {exc.strerror or exc} "
                         f"(in {str(parent)!r})") from None
    return path


def records_grad(*tensors) -> bool:
    """True when autograd records through a call on these tensors (grad mode on and one of them
    requires grad): the ops then call their variants that save what the fused backward needs."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def normal_tensors(args: dict) -> dict:
    """`args` with every inference tensor (made under torch.inference_mode) replaced by a normal
    copy, also inside lists, tuples and dicts, so that autograd may use them: call it under
    torch.inference_mode(False). Other values are returned as they are."""
    def convert(value):
        if isinstance(value, torch.Tensor):
            return value.clone() if value.is_inference() else value
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return {k: convert(v) for k, v in args.items()}
