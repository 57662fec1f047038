"""FoL outside PyTorch: one ONNX graph per image size, run by onnxruntime.

The graph takes ``images`` [B, 3, H, W] (ImageNet-normalised, any batch size B; H and W fixed
when exported) and gives what :meth:`~fol_plugin.models.FoLModel.extract` computes before its
selection: ``global_descriptors`` [B, 8448], ``selection_scores`` [B, h*w] and ``dense_local``
[B, 128, 4h - 3, 4w - 3]. The selection of local features then runs after the graph, by the code
the PyTorch path uses (:func:`~fol_plugin.models.select_features`), so both give the same kept
cells. The file's metadata records the image size, the opset, the input normalisation, the
backbone and the checkpoint's digest; :class:`OnnxFoL` refuses images of another size.

onnx, onnxscript and onnxruntime are the ``[onnx]`` extra: ``pip install -e ".[onnx]"``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .data.images import IMAGENET_MEAN, IMAGENET_STD
from .errors import UserError
from .files import atomic_write
from .models import FoLFeatures, FoLModel, check_images, select_features

ONNX_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("global_descriptors", "selection_scores", "dense_local")
METADATA_PREFIX = "fol_plugin."
EXTRA = 'pip install "fol-plugin[onnx]" (from a clone: pip install -e ".[onnx]")'


class OnnxError(UserError, ValueError):
    """An ONNX file that does not fit the call: another image size or checkpoint, not FoL's, no extra."""


def _require(module: str) -> ModuleType:
    """``module`` of the ``[onnx]`` extra, or one line saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxError(f"FoL's ONNX export and runtime need {module}, which is not installed: {EXTRA}") from None


class _Graph(torch.nn.Module):
    """FoLModel.exportable as the module torch.onnx traces."""

    def __init__(self, model: FoLModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.exportable(images)


def export_onnx(
    model: FoLModel, image_size: tuple[int, int], path: str | os.PathLike, checkpoint_digest: str | None = None
) -> Path:
    """Write ``model`` as an ONNX graph for [B, 3, H, W] images (``image_size`` = (H, W)) to ``path``.

    Args:
        checkpoint_digest: the weights' digest (:func:`fol_plugin.cache.checkpoint_digest`),
            recorded in the metadata so that a file can be matched to its checkpoint.

    Returns:
        ``path``.

    Raises:
        OnnxError: the ``[onnx]`` extra is missing.
        ValueError: FoL cannot take ``image_size`` (not multiples of 14, too few patches).
    """
    onnx = _require("onnx")
    _require("onnxscript")
    height, width = (int(side) for side in image_size)
    check_images(torch.empty(1, 3, height, width, device="meta"))
    parameter = next(model.parameters())
    example = torch.zeros(2, 3, height, width, dtype=parameter.dtype, device=parameter.device)
    batch = torch.export.Dim("batch")
    training = model.training
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")  # torch.export's own deprecations
            program = torch.onnx.export(
                _Graph(model).eval(), (example,), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"images": {0: batch}}, opset_version=ONNX_OPSET, dynamo=True, verbose=False,
            )  # fmt: skip
    finally:
        model.train(training)
    proto = program.model_proto
    metadata = {
        "image_size": json.dumps([height, width]),
        "opset": str(ONNX_OPSET),
        "normalisation": json.dumps({"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input": "RGB in [0, 1]"}),
        "backbone": json.dumps(dataclasses.asdict(model.backbone.model.config)),
        "checkpoint": checkpoint_digest or "unknown",
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value
    onnx.checker.check_model(proto)
    atomic_write(path, lambda handle: handle.write(proto.SerializeToString()))
    return Path(path)


class OnnxFoL:
    """FoL from an exported ONNX file, with :class:`~fol_plugin.models.FoLModel`'s interface:
    ``model(images)`` -> global descriptors, ``model.extract(images)`` -> :class:`FoLFeatures`.

    Args:
        path: a file written by :func:`export_onnx` (``fol-vpr export``).
        providers: onnxruntime's execution providers; default CUDA where installed, else the CPU.
        checkpoint_digest: when given, the file must have been exported from that checkpoint.
    """

    def __init__(
        self, path: str | os.PathLike, providers: list[str] | None = None, checkpoint_digest: str | None = None
    ) -> None:
        runtime = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxError(f"ONNX file {self.path} does not exist: write it with fol-vpr export")
        available = runtime.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = runtime.InferenceSession(str(self.path), providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            raise OnnxError(f"{self.path} is not a readable ONNX file ({error}); export it again with fol-vpr export") from None
        self.metadata = {
            key[len(METADATA_PREFIX) :]: value
            for key, value in self.session.get_modelmeta().custom_metadata_map.items()
            if key.startswith(METADATA_PREFIX)
        }
        if "image_size" not in self.metadata:
            raise OnnxError(f"{self.path} was not written by fol-vpr export (no {METADATA_PREFIX}image_size metadata)")
        self.image_size: tuple[int, int] = tuple(json.loads(self.metadata["image_size"]))
        if checkpoint_digest is not None and self.metadata.get("checkpoint") != checkpoint_digest:
            raise OnnxError(
                f"{self.path} was exported from checkpoint {self.metadata.get('checkpoint')}, not {checkpoint_digest}: "
                "export it again from these weights"
            )

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's outputs for [B, 3, H, W] images of the exported size."""
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.image_size:
            height, width = self.image_size
            raise OnnxError(
                f"{self.path} was exported for {height}x{width} images, got {list(images.shape)}: resize to "
                f"{height}x{width}, or export again with --image_size {images.shape[-2]} {images.shape[-1]}"
            )
        feed = {INPUT_NAME: images.detach().float().cpu().contiguous().numpy()}
        return tuple(torch.from_numpy(output) for output in self.session.run(list(OUTPUT_NAMES), feed))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Global descriptors [B, 8448] float32, L2-normalised, as ``FoLModel(images)``."""
        return self._run(images)[0]

    def extract(self, images: torch.Tensor) -> FoLFeatures:
        """Global descriptors and the selected local features, as ``FoLModel.extract``."""
        return select_features(*self._run(images))

