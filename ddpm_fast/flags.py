"""guided-diffusion's command-line flags -> (UNet, Diffusion), and checkpoint loading.

    model, diffusion = from_flags("--attention_resolutions 32,16,8 --class_cond True "
                                  "--diffusion_steps 1000 --image_size 64 --learn_sigma True ...",
                                  checkpoint="64x64_diffusion.pt")

The flags are those of guided-diffusion's scripts (MODEL_FLAGS, DIFFUSION_FLAGS and the
timestep_respacing of SAMPLE_FLAGS); every flag not given takes guided-diffusion's
`model_and_diffusion_defaults()` value (plus improved-diffusion's `sigma_small`, default False), and
the model is built as guided-diffusion's `create_model` builds it: channel_mult by image size when
not given (512, 256, 128, 64 as guided-diffusion, 32 as improved-diffusion), attention resolutions
turned into downsample rates, learn_sigma doubling the output channels, class_cond giving 1000
classes. The other flags of the sampling scripts (batch_size, num_samples, use_ddim, clip_denoised,
model_path, classifier_*) are accepted, checked and kept in `model.flags`, but shape nothing here.
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence

import torch

from .unet import UNet

NUM_CLASSES = 1000  # guided-diffusion's ImageNet class count for class_cond models

# guided-diffusion's model_and_diffusion_defaults(), plus improved-diffusion's sigma_small.
MODEL_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False,
    use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
    use_new_attention_order=False,
)
DIFFUSION_DEFAULTS = dict(
    learn_sigma=False, sigma_small=False, diffusion_steps=1000, noise_schedule="linear",
    timestep_respacing="", use_kl=False, predict_xstart=False, rescale_timesteps=False,
    rescale_learned_sigmas=False,
)
DEFAULTS = {**MODEL_DEFAULTS, **DIFFUSION_DEFAULTS}

# Flags of guided-diffusion's sampling scripts that build neither the model nor the diffusion:
# parsed and checked, kept in model.flags for the caller, otherwise unused.
SAMPLING_FLAG_TYPES = dict(
    batch_size=int, num_samples=int, use_ddim=bool, clip_denoised=bool, model_path=str,
    classifier_path=str, classifier_scale=float, classifier_use_fp16=bool, classifier_width=int,
    classifier_depth=int, classifier_attention_resolutions=str, classifier_use_scale_shift_norm=bool,
    classifier_resblock_updown=bool, classifier_pool=str,
)

# channel_mult when the flag is empty, as guided-diffusion's create_model (and improved-diffusion's
# for 32x32).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}

_TRUE = ("yes", "true", "t", "y", "1")
_FALSE = ("no", "false", "f", "n", "0")


def _flag_type(name: str):
    if name in SAMPLING_FLAG_TYPES:
        return SAMPLING_FLAG_TYPES[name]
    return type(DEFAULTS[name])


def _convert(name: str, value):
    """A flag value (string from the command line, or an already typed value) -> its type."""
    kind = _flag_type(name)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"--{name}: expected a boolean (True/False, yes/no, 1/0); got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"--{name}: expected an integer; got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError(f"--{name}: expected an integer; got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"--{name}: expected a number; got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{name}: expected a number; got {value!r}") from None
    if isinstance(value, (list, tuple)):  # e.g. attention_resolutions=[32, 16, 8]
        return ",".join(str(v) for v in value)
    return str(value)


def _tokens_to_pairs(tokens: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"flags: expected '--name value' pairs; got {token!r}"
                             + (f" after {tokens[i - 1]!r}" if i else ""))
        if "=" in token:
            name, value = token[2:].split("=", 1)
            i += 1
        else:
            name = token[2:]
            if i + 1 >= len(tokens) or (tokens[i + 1].startswith("--") and len(tokens[i + 1]) > 2):
                raise ValueError(f"--{name}: missing value")
            value = tokens[i + 1]
            i += 2
        pairs.append((name, value))
    return pairs


def parse_flags(flags) -> dict:
    """guided-diffusion flags -> {name: typed value} with every default filled in.

    flags: a string ("--image_size 64 --class_cond True ..."; "--name=value" works too), a list of
    such tokens, or a mapping {name: value}. Unknown flags and bad values raise ValueError naming
    the flag; a flag given twice keeps the last value, as argparse does.
    """
    if isinstance(flags, str):
        pairs = _tokens_to_pairs(shlex.split(flags))
    elif isinstance(flags, Mapping):
        pairs = [(str(k).lstrip("-"), v) for k, v in flags.items()]
    elif isinstance(flags, Sequence):
        pairs = _tokens_to_pairs([str(t) for t in flags])
    else:
        raise TypeError(f"flags must be a str, a list of tokens or a mapping; got {type(flags).__name__}")
    out = dict(DEFAULTS)
    for name, value in pairs:
        if name not in DEFAULTS and name not in SAMPLING_FLAG_TYPES:
            raise ValueError(f"--{name}: unknown flag (known: {', '.join(sorted(DEFAULTS))}, and the "
                             f"sampling-script flags {', '.join(sorted(SAMPLING_FLAG_TYPES))})")
        out[name] = _convert(name, value)
    return out


def _int_list(name: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated integers; got {text!r}") from None
    return values


def model_kwargs(flags) -> dict:
    """The UNet keyword arguments guided-diffusion's create_model derives from the flags."""
    f = parse_flags(flags)
    size = f["image_size"]
    if size < 1:
        raise ValueError(f"--image_size: expected a positive integer; got {size}")
    for name in ("num_channels", "num_res_blocks"):
        if f[name] < 1:
            raise ValueError(f"--{name}: expected a positive integer; got {f[name]}")
    if f["channel_mult"] == "":
        if size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"--image_size {size} has no default --channel_mult (defaults exist for "
                             f"{', '.join(map(str, sorted(DEFAULT_CHANNEL_MULT)))}); give --channel_mult")
        channel_mult = DEFAULT_CHANNEL_MULT[size]
    else:
        channel_mult = _int_list("channel_mult", f["channel_mult"])
        if any(m < 1 for m in channel_mult):
            raise ValueError(f"--channel_mult: expected positive integers; got {f['channel_mult']!r}")
    resolutions = _int_list("attention_resolutions", f["attention_resolutions"]) \
        if f["attention_resolutions"].strip() else ()
    for res in resolutions:
        if res < 1 or size % res:
            raise ValueError(f"--attention_resolutions: {res} is not a resolution of a {size}x{size} model "
                             f"(each must divide --image_size)")
    if not 0.0 <= f["dropout"] < 1.0:
        raise ValueError(f"--dropout: expected a probability in [0, 1); got {f['dropout']}")
    heads, head_channels = f["num_heads"], f["num_head_channels"]
    if head_channels == -1 and heads < 1:
        raise ValueError(f"--num_heads: expected a positive integer; got {heads}")
    if head_channels != -1 and head_channels < 1:
        raise ValueError(f"--num_head_channels: expected -1 or a positive integer; got {head_channels}")
    if f["num_heads_upsample"] != -1 and f["num_heads_upsample"] < 1:
        raise ValueError(f"--num_heads_upsample: expected -1 or a positive integer; got {f['num_heads_upsample']}")
    return dict(
        image_size=size, in_channels=3, model_channels=f["num_channels"],
        out_channels=6 if f["learn_sigma"] else 3, num_res_blocks=f["num_res_blocks"],
        attention_resolutions=tuple(size // r for r in resolutions), dropout=f["dropout"],
        channel_mult=channel_mult, num_classes=NUM_CLASSES if f["class_cond"] else None,
        use_checkpoint=f["use_checkpoint"], use_fp16=f["use_fp16"], num_heads=heads,
        num_head_channels=head_channels, num_heads_upsample=f["num_heads_upsample"],
        use_scale_shift_norm=f["use_scale_shift_norm"], resblock_updown=f["resblock_updown"],
        use_new_attention_order=f["use_new_attention_order"],
    )


def diffusion_from_flags(flags):
    """The Diffusion guided-diffusion's create_gaussian_diffusion builds from the flags (respaced
    by --timestep_respacing when given)."""
    from .diffusion import SCHEDULES, Diffusion  # lazy: the diffusion module is heavier than flags

    f = parse_flags(flags)
    if f["diffusion_steps"] < 1:
        raise ValueError(f"--diffusion_steps: expected a positive integer; got {f['diffusion_steps']}")
    if f["noise_schedule"] not in SCHEDULES:
        raise ValueError(f"--noise_schedule: expected one of {', '.join(SCHEDULES)}; got {f['noise_schedule']!r}")
    if f["learn_sigma"]:
        variance = "learned_range"
    else:
        variance = "fixed_small" if f["sigma_small"] else "fixed_large"
    try:
        diffusion = Diffusion(schedule=f["noise_schedule"], timesteps=f["diffusion_steps"], variance=variance,
                              prediction="x0" if f["predict_xstart"] else "epsilon",
                              rescale_timesteps=f["rescale_timesteps"])
    except ValueError as exc:
        raise ValueError(f"--noise_schedule {f['noise_schedule']} / --diffusion_steps {f['diffusion_steps']}: "
                         f"{exc}") from None
    spec = f["timestep_respacing"].strip()
    if spec:
        try:
            diffusion = diffusion.respace(spec)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--timestep_respacing {spec!r}: {exc}") from None
    return diffusion


# ---- checkpoints ------------------------------------------------------------------------------

def _checkpoint_format(path: str) -> str:
    """"safetensors", "torch" (zip or legacy pickle) or "unknown", from the file's first bytes
    (whatever its extension): safetensors starts with an 8-byte little-endian header length and a
    JSON header '{', torch.save's zip with 'PK', a legacy torch pickle with the pickle opcode 0x80."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= os.path.getsize(path):
        return "safetensors"
    return "unknown"


def load_checkpoint(path) -> dict:
    """A state_dict from a torch.save file (.pt/.pth: torch.load, map_location cpu, weights_only) or
    a safetensors file; the format is read from the file's first bytes, not its extension (a
    .SAFETENSORS or a safetensors file named .pt loads too). ValueError naming the path otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path; got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: no such file {path!r}")
    fmt = _checkpoint_format(path)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except Exception as exc:  # SafetensorError: truncated or corrupt file
            raise ValueError(f"checkpoint {path!r} could not be read as a safetensors file: {exc}") from None
    elif fmt == "torch":
        try:
            with open(path, "rb") as f:  # a file object: torch.load would go by a .safetensors name
                state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, truncated zip, ...
            raise ValueError(f"checkpoint {path!r} could not be read as a torch state_dict: {exc}") from None
    else:
        raise ValueError(f"checkpoint {path!r} could not be read: it is neither a torch.save file "
                         "(.pt/.pth) nor a safetensors file (its first bytes are of neither format)")
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path!r} does not hold a state_dict (a mapping of names to tensors)")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _block_count(keys, prefix: str) -> int:
    return len({k.split(".")[1] for k in keys if k.startswith(prefix + ".")})


def _likely_flags(own: Mapping, state: Mapping, missing, unexpected, mismatched) -> list[str]:
    """Which flags most likely differ between the checkpoint and the flags, from the offending keys
    (the root causes first: a different base width or block count shifts every later key)."""
    hints = []
    absent = list(missing) + list(unexpected)
    shapes = {k: (want, got) for k, want, got in mismatched}
    if any(k.startswith("label_emb") for k in absent) or (
            "label_emb.weight" in shapes and shapes["label_emb.weight"][0][1:] == shapes["label_emb.weight"][1][1:]):
        hints.append(f"--class_cond (label_emb: a class-conditional model has a ({NUM_CLASSES}, "
                     "4 * num_channels) class embedding)")
    if "out.2.weight" in shapes and shapes["out.2.weight"][0][1:] == shapes["out.2.weight"][1][1:]:
        want, got = shapes["out.2.weight"]
        hints.append(f"--learn_sigma (out.2 has {got[0]} output channels in the checkpoint, {want[0]} in the "
                     "model; learn_sigma doubles them)")
    if "time_embed.0.weight" in shapes:
        want, got = shapes["time_embed.0.weight"]
        hints.append(f"--num_channels (the checkpoint's base width is {got[1]}, the model's {want[1]})")
        return hints
    if any(_block_count(own, p) != _block_count(state, p) for p in ("input_blocks", "output_blocks")):
        hints.append("--num_res_blocks / --channel_mult (the number of blocks differs: "
                     f"{_block_count(state, 'input_blocks')} input blocks in the checkpoint, "
                     f"{_block_count(own, 'input_blocks')} in the model)")
        return hints
    emb = [(want, got) for k, (want, got) in shapes.items() if ".emb_layers.1.weight" in k]
    if emb and (all(got[0] == 2 * want[0] for want, got in emb) or all(2 * got[0] == want[0] for want, got in emb)):
        hints.append("--use_scale_shift_norm (emb_layers projects to 2 * channels with scale-shift norm)")
    elif any(not (k.startswith(("label_emb", "out.2")) or ".emb_layers." in k) for k in shapes) or emb:
        hints.append("--channel_mult / --num_channels (channel counts differ)")
    if any(part in k for k in absent for part in (".qkv.", ".proj_out.", ".norm.")):
        hints.append("--attention_resolutions (attention blocks where the other side has none)")
    if any(".op." in k or ".conv." in k for k in absent) and any(".in_layers." in k for k in absent):
        hints.append("--resblock_updown (ResBlock vs convolution up/downsampling)")
    if not hints:
        hints.append("--num_channels / --channel_mult / --num_res_blocks / --attention_resolutions")
    return hints


def load_into(model: UNet, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> UNet:
    """Strictly load `state` into `model`; on any missing, unexpected or mis-shaped key, raise a
    ValueError listing the first offending keys and the flags that likely differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(own[k].shape), tuple(state[k].shape)) for k in own
                  if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model built from the flags:"]
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatches, first: " + "; ".join(
                f"{k} checkpoint {got} vs model {want}" for k, want, got in mismatched[:5]))
        if missing:
            lines.append(f"  {len(missing)} keys missing from the checkpoint, first: {', '.join(missing[:5])}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys in the checkpoint, first: {', '.join(unexpected[:5])}")
        lines.append("  the flags that likely differ: " + "; ".join(_likely_flags(own, state, missing, unexpected,
                                                                                   mismatched)))
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return model


# ---- the classifier of classifier guidance -------------------------------------------------------

# guided-diffusion's classifier_defaults() (beside image_size)
CLASSIFIER_DEFAULTS = dict(
    classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool="attention",
)
CLASSIFIER_SIZES = (64, 128, 256, 512)  # the image sizes guided-diffusion's create_classifier knows


def classifier_from_flags(flags, checkpoint=None, *, device=None, backend: str = "auto"):
    """Build guided-diffusion's classifier (create_classifier) from its CLASSIFIER_FLAGS:

        classifier = classifier_from_flags("--image_size 64 --classifier_depth 4 ...",
                                           checkpoint="64x64_classifier.pt")
        images = sample(model, steps=250, class_labels=labels,
                        cond_fn=classifier_guidance(classifier, scale=1.0))

    Flags not given take classifier_defaults()'s values (width 128, depth 2, attention at 32,16,8,
    scale-shift norm, resblock up/down, attention pooling); channel_mult follows the image size
    (64, 128, 256 or 512) as in create_classifier; 1000 classes, 64 channels per attention head.
    Other flags of the sampling scripts are accepted and ignored. Returns a
    ddpm_fast.classifier.EncoderUNet in eval mode (float16 torso with --classifier_use_fp16 True),
    with `classifier.flags`; the checkpoint (path or state_dict) is loaded strictly.
    """
    from .classifier import EncoderUNet

    parsed = {**CLASSIFIER_DEFAULTS, **{k: v for k, v in parse_flags(flags).items() if k not in DEFAULTS or
                                       k == "image_size"}}
    size = parsed["image_size"]
    if size not in CLASSIFIER_SIZES:
        raise ValueError(f"--image_size {size}: guided-diffusion's classifiers exist for image sizes "
                         f"{', '.join(map(str, CLASSIFIER_SIZES))}")
    for name in ("classifier_width", "classifier_depth"):
        if parsed[name] < 1:
            raise ValueError(f"--{name}: expected a positive integer; got {parsed[name]}")
    resolutions = _int_list("classifier_attention_resolutions", parsed["classifier_attention_resolutions"])
    if any(r < 1 or size % r for r in resolutions):
        raise ValueError(f"--classifier_attention_resolutions: each must divide --image_size {size}; "
                         f"got {parsed['classifier_attention_resolutions']!r}")
    with torch.device(device if device is not None else "cpu"):
        model = EncoderUNet(
            image_size=size, in_channels=3, model_channels=parsed["classifier_width"], out_channels=NUM_CLASSES,
            num_res_blocks=parsed["classifier_depth"], attention_resolutions=tuple(size // r for r in resolutions),
            channel_mult=DEFAULT_CHANNEL_MULT[size], use_fp16=parsed["classifier_use_fp16"], num_head_channels=64,
            use_scale_shift_norm=parsed["classifier_use_scale_shift_norm"],
            resblock_updown=parsed["classifier_resblock_updown"], pool=parsed["classifier_pool"], backend=backend)
    if checkpoint is not None:
        if isinstance(checkpoint, Mapping):
            state, source = dict(checkpoint), "the checkpoint state_dict"
        else:
            state, source = load_checkpoint(checkpoint), f"checkpoint {os.fspath(checkpoint)!r}"
        load_into(model, state, source=source)
    model.flags = parsed
    return model.eval()


# ---- the entry point --------------------------------------------------------------------------

def from_flags(flags, checkpoint=None, *, device=None, backend: str = "auto"):
    """Build (model, diffusion) from guided-diffusion's MODEL_FLAGS + DIFFUSION_FLAGS.

    Args:
        flags: "--image_size 64 --class_cond True ..." (or a list of tokens, or a mapping).
        checkpoint: optional path of a .pt/.pth or .safetensors state_dict (guided-diffusion's key
            names), or a state_dict itself; loaded strictly.
        device: where to build the model (default: the CPU); "meta" builds the structure only.
        backend: the op backend of the model (see UNet).
    Returns:
        (model, diffusion): a UNet in eval mode carrying `model.diffusion` (the Diffusion, respaced
        when --timestep_respacing is given) and `model.flags` (every flag's value); with
        --use_fp16 True its torso convolutions are float16, as guided-diffusion's scripts make them
        (`model.convert_to_fp32()` undoes it).
    Raises:
        ValueError naming the flag for unknown flags or bad values, and listing the offending keys and
        the flags that likely differ when the checkpoint does not fit.
    """
    parsed = parse_flags(flags)
    kwargs = model_kwargs(parsed)
    diffusion = diffusion_from_flags(parsed)
    with torch.device(device if device is not None else "cpu"):
        model = UNet(**kwargs, backend=backend)
    if checkpoint is not None:
        if isinstance(checkpoint, Mapping):
            state, source = dict(checkpoint), "the checkpoint state_dict"
        else:
            state, source = load_checkpoint(checkpoint), f"checkpoint {os.fspath(checkpoint)!r}"
        if model.input_blocks[0][0].weight.is_meta:
            raise ValueError("checkpoint: cannot load weights into a model built on the meta device")
        load_into(model, state, source=source)
    model.diffusion = diffusion
    model.flags = parsed
    return model.eval(), diffusion
