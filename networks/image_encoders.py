"""Image encoders: built-in ones from the registry, everything else from timm."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .registry import IMAGE_ENCODERS, PretrainedWeightsUnavailable, UnknownEncoder

TIMM_ALIASES = {"nfnet": "nfnet_l0"}
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def timm_name(name: str) -> str:
    return TIMM_ALIASES.get(name, name)


def _find_local_checkpoint(checkpoint_dir: str, name: str) -> Path:
    folder = Path(checkpoint_dir)
    candidates = [folder / f"{stem}{suffix}" for stem in (name, timm_name(name)) for suffix in _WEIGHT_SUFFIXES]
    candidates += [folder / timm_name(name) / f"{stem}{suffix}" for stem in ("model", "pytorch_model")
                   for suffix in _WEIGHT_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    raise PretrainedWeightsUnavailable(
        f"--checkpoint_dir {checkpoint_dir} holds no weights for image encoder {name!r}: expected one of "
        f"{', '.join(str(p) for p in candidates[:4])} ... Save the timm state dict there "
        f"(torch.save(model.state_dict(), ...)) or point --checkpoint_dir at the right folder.")


WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")  # training checkpoints' usual keys


def unwrap_state_dict(state, path: Path) -> Dict[str, torch.Tensor]:
    """The weights inside ``state``: a state dict itself, or one wrapped in a training checkpoint
    (``{"state_dict": ...}``, ``{"model": ...}``, ...); a DistributedDataParallel ``module.`` prefix removed.
    Anything else is refused naming the file and the flag."""
    def is_weights(value) -> bool:
        return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())
    if isinstance(state, dict) and not is_weights(state):
        inner = [key for key in WRAPPER_KEYS if is_weights(state.get(key))]
        state = state[inner[0]] if inner else state
    if not is_weights(state):
        kind = type(state).__name__ if not isinstance(state, dict) else f"dict with keys {sorted(map(str, state))[:5]}"
        raise PretrainedWeightsUnavailable(
            f"weights file {path} (--checkpoint_dir) holds a {kind}, not a state dict of tensors nor a training "
            f"checkpoint with one under {'/'.join(WRAPPER_KEYS)}: save model.state_dict() there")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _load_state_dict(model: nn.Module, path: Path) -> None:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle garbage, a header that is not safetensors ...
        raise unreadable_weights(path, error) from None
    state = unwrap_state_dict(state, path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        missing, unexpected = [str(error).splitlines()[-1].strip()], []
    if missing or unexpected:
        raise PretrainedWeightsUnavailable(
            f"weights in {path} (--checkpoint_dir) do not fit the model: missing/mismatched {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]}; they are another architecture's: save model.state_dict() of the "
            f"same --image_encoder there")


def unreadable_weights(path: Path, error: Exception) -> PretrainedWeightsUnavailable:
    detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return PretrainedWeightsUnavailable(
        f"weights file {path} cannot be read ({type(error).__name__}: {detail}): it is corrupt, truncated or not a "
        f"weights file. Save the state dict there again (torch.save(model.state_dict(), path)), or point "
        f"--checkpoint_dir at a folder with good weights.")


def unknown_image_encoder_message(name: str) -> str:
    return (f"--image_encoder {name!r} is neither built in ({', '.join(sorted(IMAGE_ENCODERS))}) nor a timm model "
            f"name; pass one of those, 'nfnet' (= nfnet_l0), or a name from timm.list_models()")


def is_known_image_encoder(name: str) -> bool:
    import timm
    return name in IMAGE_ENCODERS or timm.is_model(timm_name(name))


def _timm_encoder(name: str, pretrained: bool, checkpoint_dir: Optional[str]) -> nn.Module:
    import timm
    full_name = timm_name(name)
    if not timm.is_model(full_name):
        raise UnknownEncoder(unknown_image_encoder_message(name))
    kwargs = dict(num_classes=0, global_pool="avg")
    if pretrained and checkpoint_dir:
        path = _find_local_checkpoint(checkpoint_dir, name)
        try:
            return timm.create_model(full_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except PretrainedWeightsUnavailable:
            raise
        except Exception as error:  # timm reads the file itself: garbage surfaces from deep inside it
            if isinstance(error, RuntimeError) and "state_dict" in str(error):
                raise PretrainedWeightsUnavailable(
                    f"weights in {path} do not fit timm model {full_name!r} ({str(error).splitlines()[-1].strip()}); "
                    f"save model.state_dict() of the same architecture there") from None
            raise unreadable_weights(path, error) from None
    try:
        return timm.create_model(full_name, pretrained=pretrained, **kwargs)
    except Exception as error:  # hub errors come in many types (OSError, HTTP, offline mode)
        if not pretrained:
            raise
        raise PretrainedWeightsUnavailable(
            f"could not fetch pretrained weights for image encoder {name!r} (timm model {full_name!r}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. This machine may be "
            f"offline. Either download them once where there is network (they land in the Hugging Face cache, "
            f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}) and copy that cache here, or save the "
            f"weights as {full_name}.pth / .safetensors in a folder and pass --checkpoint_dir FOLDER, or pass "
            f"--image_pretrained false to start from random weights.") from None


def create_image_encoder(name: str, pretrained: bool = False, checkpoint_dir: Optional[str] = None,
                         init_seed: Optional[int] = 0) -> nn.Module:
    """Build an image encoder with ``num_features`` set. Randomly initialised weights are drawn
    from ``init_seed`` so that a frozen random encoder is the same in buffer.py and the distiller."""
    with torch.random.fork_rng(devices=[]):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        if name in IMAGE_ENCODERS and getattr(IMAGE_ENCODERS[name], "finds_own_weights", False):
            model = IMAGE_ENCODERS[name](pretrained=pretrained, checkpoint_dir=checkpoint_dir)
        elif name in IMAGE_ENCODERS:
            model = IMAGE_ENCODERS[name](pretrained=False)
            if pretrained:
                if not checkpoint_dir:
                    raise PretrainedWeightsUnavailable(
                        f"the built-in image encoder {name!r} has no published weights: pass --checkpoint_dir with "
                        f"a {name}.pth state dict (the quick start writes one), or pass --image_pretrained false to start "
                        f"from random weights")
                _load_state_dict(model, _find_local_checkpoint(checkpoint_dir, name))
        else:
            model = _timm_encoder(name, pretrained, checkpoint_dir)
    if not hasattr(model, "num_features"):
        raise TypeError(f"image encoder {name!r} does not expose num_features")
    return model


def is_convolutional(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())
