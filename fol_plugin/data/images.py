"""Images in: decoding (kornia-rs), ImageNet normalisation and resizing, as FoL's evaluation does."""
from __future__ import annotations

import os
import struct
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from kornia.io import ImageLoadType
from PIL import Image

from ..errors import UserError
from ..files import GB
from ..models.resizing import round_to_patch_multiple
from ..options import DEFAULT_MAX_IMAGE_PIXELS, RESIZE_MODES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RGB_MAX = 255.0
# File signatures and the extension kornia.io decodes each with.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIGNATURES = {b"\xff\xd8\xff": ".jpg", _PNG_SIGNATURE: ".png"}
_KORNIA_SUFFIXES = {".jpg": (".jpg", ".jpeg"), ".png": (".png",)}
_PNG_IHDR = struct.Struct(">8sI4sII")  # signature, chunk length, b"IHDR", width, height
DECODED_BYTES_PER_PIXEL = 3 * 4  # [3, H, W] float32
# A network input may hold --max_image_pixels / NETWORK_PIXEL_SHARE pixels (2048 x 2048 at the
# default limit: 21,000 ViT tokens), and, from one --image_size value, a longer side at most
# MAX_ASPECT_RATIO times its shorter: a 96-byte PNG of 4000 x 1 pixels would otherwise become a
# 126 x 504,000 input (4.4 GB and a failed allocation).
NETWORK_PIXEL_SHARE = 32
MAX_ASPECT_RATIO = 16


class ImageTooLargeError(UserError, ValueError):
    """An image declares more pixels than the decoded-pixel limit admits."""


def image_dimensions(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding its pixels.

    PNG sizes come from the IHDR chunk that the format puts first; other formats from Pillow's
    lazy ``Image.open``, which reads the header only.

    Raises:
        ImageTooLargeError: Pillow refuses even to open the header (its decompression-bomb
            limit, twice ``PIL.Image.MAX_IMAGE_PIXELS``).
        ValueError: not an image Pillow knows.
    """
    with open(path, "rb") as handle:
        head = handle.read(_PNG_IHDR.size)
    if len(head) == _PNG_IHDR.size:
        signature, _, chunk, width, height = _PNG_IHDR.unpack(head)
        if signature == _PNG_SIGNATURE and chunk == b"IHDR":
            return width, height
    try:
        with warnings.catch_warnings():  # Pillow's warning above its own limit: ours decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"image {path} is too large for Pillow to open ({error}): resize it") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot decode image {path}: {error}; re-save it as JPEG or PNG or remove it") from None


def check_image_pixels(path: str | os.PathLike, max_pixels: int | None) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels (None: no limit),
    before anything is decoded: a small file can declare a huge image (a 400 KB PNG of 20000 x
    20000 pixels decodes to 4.8 GB of float32)."""
    if max_pixels is None:
        return
    width, height = image_dimensions(path)
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image {path} is {width}x{height} ({width * height:,} pixels), more than --max_image_pixels "
            f"{max_pixels:,}: resize it, or raise --max_image_pixels if this machine has "
            f"{width * height * DECODED_BYTES_PER_PIXEL / GB:.1f} GB per image to decode it"
        )


def _is_utf8(path: Path) -> bool:
    """Whether kornia-rs can take the path: it needs UTF-8, a file system may hold any bytes."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _content_suffix(path: Path) -> str | None:
    with open(path, "rb") as handle:
        head = handle.read(8)
    return next((suffix for magic, suffix in _SIGNATURES.items() if head.startswith(magic)), None)


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode an image file to RGB, after checking from its header that it has at most
    ``max_pixels`` pixels (None: no limit; see :func:`check_image_pixels`).

    The format is read from the file's content, so a PNG named ``.jpg`` (or a file whose name is
    not UTF-8) still loads, through a temporary alias. kornia-rs
    decodes 8-bit RGB, grey and RGBA files; the modes it does not take (CMYK JPEGs, grey + alpha,
    16-bit PNGs) are converted as Pillow's ``convert("RGB")`` does, which is what
    VPR-methods-evaluation decodes with. EXIF orientation is ignored, as there.

    Returns:
        [3, H, W] float32 in [0, 1].

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    check_image_pixels(path, max_pixels)
    suffix = _content_suffix(path)
    try:
        if suffix is None or (path.suffix.lower() in _KORNIA_SUFFIXES[suffix] and _is_utf8(path)):
            return kornia.io.load_image(path, ImageLoadType.RGB32)
        with tempfile.TemporaryDirectory() as folder:
            alias = Path(folder) / f"image{suffix}"
            alias.symlink_to(path.resolve())
            return kornia.io.load_image(alias, ImageLoadType.RGB32)
    except (ValueError, RuntimeError, NotImplementedError) as error:
        return _load_with_pillow(path, error)


def _load_with_pillow(path: Path, kornia_error: Exception) -> torch.Tensor:
    """[3, H, W] float32 in [0, 1] through Pillow's ``convert("RGB")``, or an error naming the file."""
    try:
        with warnings.catch_warnings():  # the pixel limit was checked from the header
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"cannot decode image {path}: {kornia_error}; {error}; re-save it as JPEG or PNG or remove it"
        ) from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / RGB_MAX


def network_size(image_size: Sequence[int], height: int, width: int) -> tuple[int, int]:
    """The network input (H', W') of an ``height`` x ``width`` image.

    Args:
        image_size: (H, W), taken as it is; or one value S, as VPR-methods-evaluation's
            ``--image_size S`` (torchvision's ``Resize(S)``): the shorter side becomes S, the
            longer ``int(S * longer / shorter)``, then each side is rounded to the nearest
            multiple of the patch size 14 (at least 14; ``round_to_patch_multiple``), which FoL
            needs.
    """
    if len(image_size) == 2:
        return int(image_size[0]), int(image_size[1])
    (short,) = image_size
    scaled = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
    return round_to_patch_multiple(scaled[0]), round_to_patch_multiple(scaled[1])


def checked_network_size(
    path: str | os.PathLike, image_size: Sequence[int], height: int, width: int, max_pixels: int | None
) -> tuple[int, int]:
    """:func:`network_size` of the image at ``path``, refused when the network input would exceed
    ``max_pixels / NETWORK_PIXEL_SHARE`` pixels or, from one ``image_size`` value, an aspect ratio
    of ``MAX_ASPECT_RATIO`` (None: no pixel limit, the ratio still holds).

    Raises:
        ImageTooLargeError: naming the file, its size, the input it would become and the fix.
    """
    new_height, new_width = network_size(image_size, height, width)
    pixels = new_height * new_width
    limit = None if max_pixels is None else max(max_pixels // NETWORK_PIXEL_SHARE, 1)
    too_long = len(image_size) == 1 and max(new_height, new_width) > MAX_ASPECT_RATIO * min(new_height, new_width)
    if too_long or (limit is not None and pixels > limit):
        rule = (
            f"an aspect ratio of at most {MAX_ASPECT_RATIO}:1 from one --image_size value"
            if too_long
            else f"at most --max_image_pixels / {NETWORK_PIXEL_SHARE} = {limit:,} pixels"
        )
        raise ImageTooLargeError(
            f"image {path} is {width}x{height}: --image_size {' '.join(map(str, image_size))} would make it a "
            f"{new_width}x{new_height} network input ({pixels:,} pixels), beyond {rule}: crop or resize the image, or "
            "give --image_size H W for a fixed input size"
        )
    return new_height, new_width


def describe_image_size(image_size: Sequence[int]) -> str:
    """``322x322``, or ``shorter side 322`` for one value (see :func:`network_size`)."""
    return "x".join(map(str, image_size)) if len(image_size) == 2 else f"shorter side {image_size[0]}"


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of [B, 3, H, W] images in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype)
    return kornia.enhance.normalize(images, mean, std)


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch's CPU resize rounds differently with the number of threads (by up to 5e-7 here):
    pre-processing runs single-threaded, as in a DataLoader worker, so that inputs do not depend
    on ``--num_workers``."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def preprocess(images: torch.Tensor, size: tuple[int, int] | None, resize_mode: str = "original") -> torch.Tensor:
    """Network input from RGB images in [0, 1]: ImageNet normalisation, then a resize.

    Args:
        images: [3, H, W] or [B, 3, H, W] in [0, 1].
        size: target (H, W), or None to keep the size.
        resize_mode: the resize of the normalised images, bilinear with ``align_corners=False``:

            - "original": without antialiasing, as FoL's own evaluation (torchvision <= 0.16).
            - "bilinear_antialias": torch's antialiased bilinear (``F.interpolate(...,
              antialias=True)``), which is what torchvision >= 0.17 ``Resize`` computes on tensors,
              so VPR-methods-evaluation's pre-processing.
            - "antialias": kornia's antialiasing (a Gaussian blur first); matches no harness.

    Returns:
        [B, 3, H', W'] ImageNet-normalised; the same on any number of threads.
    """
    with _one_thread():
        return resize_images(normalize(images if images.ndim == 4 else images.unsqueeze(0)), size, resize_mode)


def resize_images(images: torch.Tensor, size: tuple[int, int] | None, resize_mode: str = "original") -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H', W'], bilinear with ``align_corners=False`` (``resize_mode`` as in
    :func:`preprocess`); unchanged when ``size`` is None or already the size."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r}; choose one of {RESIZE_MODES}")
    if size is None or tuple(images.shape[-2:]) == tuple(size):
        return images
    if resize_mode == "bilinear_antialias":
        return F.interpolate(images, tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return kornia.geometry.transform.resize(
        images, tuple(size), interpolation="bilinear", align_corners=False, antialias=resize_mode == "antialias"
    )
