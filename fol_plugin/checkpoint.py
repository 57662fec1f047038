"""Loading FoL checkpoints: the published ones through the torch.hub cache, or local files.

Loading is strict by default: a missing key or a wrong shape is an error, never random weights.
``strict=False`` (the original hub's default) loads what matches and warns with the rest.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import UserError
from .files import save_torch
from .models import VIT_CONFIGS, FoLModel, ViTConfig

logger = logging.getLogger(__name__)

WEIGHT_URLS: dict[str, str] = {
    "vitl": "https://huggingface.co/shunpeng/FoL/resolve/main/FoL_large.pth",
    "vitb": "https://huggingface.co/shunpeng/FoL/resolve/main/FoL_base.pth",
}
DOWNLOAD_TIMEOUT_S = 60.0
ORIGINAL_STATE_DICT_KEY = "model_state_dict"  # the original repository's checkpoints
STATE_DICT_KEYS = (ORIGINAL_STATE_DICT_KEY, "state_dict")
DATA_PARALLEL_PREFIX = "module."
FOL_KEY_PREFIXES = ("backbone.model.", "aggregator.", "upconv.", "upconv2.")
EMBED_DIM_KEY = "backbone.model.cls_token"
MAX_LISTED_KEYS = 20


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be read, or does not fit the model."""


class CheckpointDownloadError(CheckpointError):
    """A published checkpoint could not be downloaded."""


def cache_path(url: str) -> Path:
    """Where torch.hub keeps (and looks for) the file of ``url``: $TORCH_HOME/hub/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f", ... ({len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every socket operation of a download, so an unreachable host fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds Python objects that only the full unpickler (which can run code) reads."""


def _unpickling_error(path: Path, described: str, error: pickle.UnpicklingError, fix: str) -> CheckpointError:
    """The weights-only unpickler's refusal as our error: an :class:`UnsafeCheckpointError` when
    the file holds a Python object (a GLOBAL), else a damaged file with ``fix``."""
    if "GLOBAL" in str(error):
        return UnsafeCheckpointError(unsafe_checkpoint_message(path, error))
    return CheckpointError(f"{described} is not a readable PyTorch checkpoint ({_first_line(error)}); {fix}")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "nsupported" in line), lines[0] if lines else "")


def unsafe_checkpoint_message(path: str | os.PathLike, error: BaseException) -> str:
    """Why ``path`` is refused, and the one-line conversion to run in a trusted environment."""
    reason = _first_line(error)
    return (
        f"{path} holds Python objects beyond tensors and plain containers ({reason}). fol-plugin reads checkpoints "
        "with torch.load(weights_only=True) only, because the full unpickler can run code hidden in the file. "
        "If you trust the file, convert it once in an environment of your own: "
        f"python -c \"import torch; c = torch.load('{path}', weights_only=False); "
        f"c = c.state_dict() if hasattr(c, 'state_dict') else c.get('model_state_dict', c); "
        f"torch.save({{'model_state_dict': c}}, '{path}.safe.pth')\" "
        f"and pass {path}.safe.pth instead"
    )


DOWNLOADED_FIX = "delete it and download it again"


def read_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    option: str = "--weights (weights= from Python)",
    fix: str = DOWNLOADED_FIX,
) -> object:
    """Read a checkpoint file with the weights-only unpickler, which cannot run code.

    Args:
        option: how the user named the file, for error messages (a CLI flag or an argument).
        fix: what to do with a truncated or corrupt file (where it came from decides).

    Raises:
        CheckpointError: the file is missing, truncated or not a PyTorch checkpoint.
        UnsafeCheckpointError: the file needs the full unpickler (never used here).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist; check the path given as {option}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unpickling_error(path, str(path), error, f"it may be truncated or corrupt: {fix}") from None
    except Exception as error:  # torch raises RuntimeError, EOFError... for bad files
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}); "
            f"it may be truncated or corrupt: {fix}"
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
    except pickle.UnpicklingError as error:
        raise _unpickling_error(
            target, f"{target} (cached from {url})", error, "it may be truncated: delete it so it is downloaded again"
        ) from None
    except Exception as error:
        if not target.is_file():
            raise CheckpointDownloadError(
                f"could not download FoL weights from {url} ({type(error).__name__}: {error}). "
                f"Download the file by hand and place it at {target} (the torch.hub cache, under $TORCH_HOME), "
                "or pass --weights /path/to/checkpoint.pth (weights= from Python)"
            ) from error
        raise CheckpointError(
            f"{target} (cached from {url}) is not a readable PyTorch checkpoint "
            f"({type(error).__name__}: {error}); it may be truncated: delete it so it is downloaded again"
        ) from error


def weights_file(
    backbone: str | ViTConfig, weights: str | os.PathLike, progress: bool = True
) -> Path:
    """The local file that ``weights`` ("auto", a URL or a path) names; published checkpoints and
    URLs are downloaded into the torch.hub cache first when they are not there yet.

    Raises:
        CheckpointError: a local file is missing, or a download failed.
    """
    source = _published_url(backbone) if weights == "auto" else str(weights)
    if urlparse(source).scheme not in ("http", "https"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint file {path} does not exist; check the path given as --weights (weights= from Python)"
            )
        return path
    target = cache_path(source)
    if not target.is_file():
        download_checkpoint(source, progress=progress)
    return target


def _published_url(backbone: str | ViTConfig) -> str:
    if not isinstance(backbone, str) or backbone not in WEIGHT_URLS:
        raise ValueError(f"no published FoL weights for backbone {backbone!r}; published: {sorted(WEIGHT_URLS)}")
    return WEIGHT_URLS[backbone]


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


def load_weights(model: FoLModel, state_dict: Mapping[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Copy ``state_dict`` into ``model``: shape mismatches are errors, unexpected keys a warning,
    missing keys an error unless ``strict`` is False (the original's loose loading: a warning
    naming them, and those weights keep the model's initialisation)."""
    expected = model.state_dict()
    mismatched = [
        f"{key} {tuple(value.shape)} (model: {tuple(expected[key].shape)})"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if mismatched:
        found = checkpoint_backbone(state_dict)
        hint = ""
        if found:
            hint = f"; it looks like a {found} checkpoint: load it with --backbone {found} (backbone={found!r} from Python)"
        raise CheckpointError(f"{source} does not fit this FoL model: wrong shapes for {_list_keys(mismatched)}{hint}")
    missing = [key for key in expected if key not in state_dict]
    if missing and strict:
        raise CheckpointError(
            f"{source} lacks {len(missing)} of the model's weights: {_list_keys(missing)} (strict=False loads the rest "
            "and leaves those at their initialisation, as the original's loose loading does)"
        )
    if missing:
        warnings.warn(
            f"{source} lacks {len(missing)} of the model's weights, left at their random initialisation (strict=False): "
            f"{_list_keys(missing)}", stacklevel=2,
        )
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        warnings.warn(f"{source} has {len(unexpected)} keys the model does not use: {_list_keys(unexpected)}", stacklevel=2)
    present = {key: state_dict[key].to(expected[key].dtype) for key in expected if key in state_dict}
    model.load_state_dict(present, strict=not missing, assign=True)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available and the CPU otherwise.

    Raises:
        ValueError: the device is unknown or not available here.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for, but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    return device


def load_model(
    backbone: str | ViTConfig = "vitl",
    weights: str | os.PathLike | None = "auto",
    device: str | torch.device | None = None,
    progress: bool = True,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
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
        strict: refuse a checkpoint that lacks some of the model's weights (the default); False
            loads what matches and warns with the missing and unexpected keys, as the original's
            hub entrypoints do (shape mismatches are refused either way).
        **model_kwargs: passed to :class:`FoLModel` (e.g. ``num_trainable_blocks``).

    Returns:
        The model in eval mode.
    """
    if weights is None:
        return FoLModel(backbone, **model_kwargs).to(resolve_device(device)).eval()
    source = _published_url(backbone) if weights == "auto" else str(weights)
    if urlparse(source).scheme in ("http", "https"):
        checkpoint = download_checkpoint(source, progress=progress, map_location=map_location)
    else:
        checkpoint = read_checkpoint(source, map_location)
    state_dict = extract_state_dict(checkpoint, source)
    # Strict: no random initialisation (every weight comes from the checkpoint); loose: the
    # weights a checkpoint lacks keep theirs.
    with torch.device("meta") if strict else contextlib.nullcontext():
        model = FoLModel(backbone, **model_kwargs)
    load_weights(model, state_dict, source, strict)
    return model.to(resolve_device(device)).eval()


def save_weights(model: FoLModel, path: Path, advice: str = "rerun the same command") -> None:
    """The model's weights alone in the original repository's format (its DataParallel keys under
    ``model_state_dict``, which :func:`extract_state_dict` reads back): what :func:`load_model`
    and the torch.hub entrypoints load. Written atomically (``advice``: what to do if the disk
    fills up)."""
    state_dict = {f"{DATA_PARALLEL_PREFIX}{key}": value for key, value in model.state_dict().items()}
    save_torch(path, {ORIGINAL_STATE_DICT_KEY: state_dict}, advice)


def load_dinov2_weights(model: FoLModel, path: str | Path) -> None:
    """Load an official DINOv2 checkpoint (its ViT key layout, e.g. ``dinov2_vitb14_pretrain.pth``)
    into the backbone; every backbone weight must be there with the right shape."""
    state = read_checkpoint(Path(path), "cpu", option="--dinov2_weights")
    state = state.get("model", state.get("teacher", state)) if isinstance(state, dict) else state
    backbone = model.backbone.model.state_dict()
    missing = sorted(set(backbone) - set(state))
    wrong = sorted(k for k in backbone if k in state and tuple(state[k].shape) != tuple(backbone[k].shape))
    if missing or wrong:
        raise ValueError(
            f"{path} is not a DINOv2 checkpoint for this backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"wrong shapes {wrong[:5]}"
        )
    model.backbone.model.load_state_dict({k: state[k] for k in backbone})
