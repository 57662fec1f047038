"""Loading FoL checkpoints: the published ones through the torch.hub cache, or local files.

Loading is strict: a missing key or a wrong shape is an error, never random weights.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from .models import VIT_CONFIGS, FoLModel, ViTConfig

logger = logging.getLogger(__name__)

WEIGHT_URLS: dict[str, str] = {
    "vitl": "https://huggingface.co/shunpeng/FoL/resolve/main/FoL_large.pth",
    "vitb": "https://huggingface.co/shunpeng/FoL/resolve/main/FoL_base.pth",
}
DOWNLOAD_TIMEOUT_S = 60.0
STATE_DICT_KEYS = ("model_state_dict", "state_dict")
DATA_PARALLEL_PREFIX = "module."
FOL_KEY_PREFIXES = ("backbone.model.", "aggregator.", "upconv.", "upconv2.")
EMBED_DIM_KEY = "backbone.model.cls_token"
MAX_LISTED_KEYS = 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, or does not fit the model."""


class CheckpointDownloadError(CheckpointError):
    """A published checkpoint could not be downloaded."""


def cache_path(url: str) -> Path:
    """Where torch.hub keeps (and looks for) the file of ``url``: $TORCH_HOME/hub/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f", ... ({len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every socket operation of a download, so an unreachable host fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _torch_load(path: Path, map_location: str | torch.device) -> object:
    """torch.load, trying the safe weights-only unpickler before the full one."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        logger.warning("%s holds more than tensors; reading it with the full unpickler", path)
        return torch.load(path, map_location=map_location, weights_only=False)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """Read a checkpoint file, with an error naming the file when it is missing or unreadable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist; check the path given as weights=")
    try:
        return _torch_load(path, map_location)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError... for bad files
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}); "
            "it may be truncated or corrupt: delete it and download it again"
        ) from error


def download_checkpoint(
    url: str,
    progress: bool = True,
    map_location: str | torch.device = "cpu",
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> object:
    """Load ``url`` through ``torch.hub.load_state_dict_from_url`` (the cached file when present)."""
    target = cache_path(url)
    was_cached = target.is_file()
    if not was_cached:
        logger.info("downloading FoL weights from %s to %s", url, target)
    try:
        with _socket_timeout(timeout):
            return torch.hub.load_state_dict_from_url(url, map_location=map_location, progress=progress, weights_only=True)
    except pickle.UnpicklingError:
        return read_checkpoint(target, map_location)
    except Exception as error:
        if not target.is_file():
            raise CheckpointDownloadError(
                f"could not download FoL weights from {url} ({type(error).__name__}: {error}). "
                f"Download the file by hand and place it at {target} (the torch.hub cache, under $TORCH_HOME), "
                "or pass weights='/path/to/checkpoint.pth'"
            ) from error
        raise CheckpointError(
            f"{target} (cached from {url}) is not a readable PyTorch checkpoint "
            f"({type(error).__name__}: {error}); it may be truncated: delete it so it is downloaded again"
        ) from error


def extract_state_dict(checkpoint: object, source: str) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint: under "model_state_dict" (the original format), under
    "state_dict", or the mapping itself; a DataParallel "module." prefix is stripped."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a FoL checkpoint dictionary")
    for key in STATE_DICT_KEYS:
        if key in checkpoint:
            checkpoint = checkpoint[key]
            break
    state_dict = {
        (key[len(DATA_PARALLEL_PREFIX) :] if key.startswith(DATA_PARALLEL_PREFIX) else key): value
        for key, value in checkpoint.items()
        if isinstance(value, torch.Tensor)
    }
    if not any(key.startswith(FOL_KEY_PREFIXES) for key in state_dict):
        raise CheckpointError(
            f"{source} is not a FoL checkpoint: none of its {len(state_dict)} tensors is named "
            f"{'*, '.join(FOL_KEY_PREFIXES)}* (top-level keys: {_list_keys([str(k) for k in checkpoint])})"
        )
    return state_dict


def checkpoint_backbone(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """"vitb" or "vitl" from the embedding width of a FoL state dict, None when unknown."""
    tensor = state_dict.get(EMBED_DIM_KEY)
    if tensor is None:
        return None
    return next((name for name, config in VIT_CONFIGS.items() if config.embed_dim == tensor.shape[-1]), None)


def load_weights(model: FoLModel, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``state_dict`` into ``model``: missing keys and shape mismatches are errors, unexpected
    keys a warning."""
    expected = model.state_dict()
    mismatched = [
        f"{key} {tuple(value.shape)} (model: {tuple(expected[key].shape)})"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if mismatched:
        found = checkpoint_backbone(state_dict)
        hint = f"; it looks like a {found} checkpoint: load it with backbone={found!r}" if found else ""
        raise CheckpointError(f"{source} does not fit this FoL model: wrong shapes for {_list_keys(mismatched)}{hint}")
    missing = [key for key in expected if key not in state_dict]
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} of the model's weights: {_list_keys(missing)}")
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        warnings.warn(f"{source} has {len(unexpected)} keys the model does not use: {_list_keys(unexpected)}", stacklevel=2)
    model.load_state_dict({key: state_dict[key].to(expected[key].dtype) for key in expected}, strict=True, assign=True)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available and the CPU otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    backbone: str | ViTConfig = "vitl",
    weights: str | os.PathLike | None = "auto",
    device: str | torch.device | None = None,
    progress: bool = True,
    map_location: str | torch.device = "cpu",
    **model_kwargs,
) -> FoLModel:
    """Build FoL and load its weights.

    Args:
        backbone: "vitl" (FoL_large), "vitb" (FoL_base), or a :class:`ViTConfig` (local weights only).
        weights: "auto" for the published checkpoint (torch.hub cache, downloaded when absent),
            an http(s) URL, a local file path, or None for random initialisation (training).
        device: where the model goes; None picks CUDA when available, else the CPU.
        progress: show a download progress bar.
        map_location: where the checkpoint's tensors are read to.
        **model_kwargs: passed to :class:`FoLModel` (e.g. ``num_trainable_blocks``).

    Returns:
        The model in eval mode.
    """
    if weights is None:
        return FoLModel(backbone, **model_kwargs).to(resolve_device(device)).eval()
    if weights == "auto":
        if not isinstance(backbone, str) or backbone not in WEIGHT_URLS:
            raise ValueError(f"no published FoL weights for backbone {backbone!r}; published: {sorted(WEIGHT_URLS)}")
        weights = WEIGHT_URLS[backbone]
    source = str(weights)
    if urlparse(source).scheme in ("http", "https"):
        checkpoint = download_checkpoint(source, progress=progress, map_location=map_location)
    else:
        checkpoint = read_checkpoint(source, map_location)
    state_dict = extract_state_dict(checkpoint, source)
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        model = FoLModel(backbone, **model_kwargs)
    load_weights(model, state_dict, source)
    return model.to(resolve_device(device)).eval()
