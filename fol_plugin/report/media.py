"""The report's pictures, embedded so that the file opens from disk with no network: each image's
thumbnail once (a small WebP in a CSS class, however many queries show it), and FoL's match
figure of a query and its re-ranked top-1 (a JPEG data URI)."""
from __future__ import annotations

import base64
import io
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ..data.images import check_image_pixels
from ..options import DEFAULT_MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from ..models import FoLModel

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 80  # pixels, the longest side
THUMBNAIL_QUALITY = 50  # WebP; about 1 KB per thumbnail
FIGURE_DPI = 50
FIGURE_QUALITY = 60  # JPEG: about 100 KB a figure in the page
MISSING_CLASS = "tx"  # the grey box of an image that cannot be read


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> bytes:
    """A WebP of ``path`` at most :data:`THUMBNAIL_SIDE` pixels on its longest side.

    Raises:
        OSError, ValueError: the file is missing, undecodable or larger than ``max_pixels``.
    """
    check_image_pixels(path, max_pixels)
    with warnings.catch_warnings():  # the pixel limit was checked from the header
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.draft("RGB", (2 * THUMBNAIL_SIDE, 2 * THUMBNAIL_SIDE))  # JPEGs decode at a fraction of their size
            picture = image.convert("RGB")
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, "WEBP", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


class Thumbnails:
    """Each image's thumbnail as one CSS class (``.t<n>``), encoded on first request; only the
    classes of images marked used go into the stylesheet, so the page holds each picture once.

    Images that cannot be read get :data:`MISSING_CLASS` and are counted in ``unreadable``.
    """

    def __init__(self, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.max_pixels = max_pixels
        self._rules: dict[str, tuple[str, str]] = {}  # path -> (class, its CSS rule)
        self._used: dict[str, None] = {}  # classes in the stylesheet, in order
        self.unreadable: list[str] = []

    def css_class(self, path: str) -> str:
        """The class that shows ``path`` (encoding it now if it is new)."""
        if path not in self._rules:
            try:
                rule = f'background-image:url("{data_uri(thumbnail(path, self.max_pixels), "image/webp")}")'
            except (OSError, ValueError) as error:
                logger.debug("no thumbnail of %s: %s", path, error)
                self.unreadable.append(path)
                self._rules[path] = (MISSING_CLASS, "")
            else:
                name = f"t{len(self._rules)}"
                self._rules[path] = (name, f".{name}{{{rule}}}")
        return self._rules[path][0]

    def new_bytes(self, paths: list[str]) -> int:
        """Bytes the stylesheet grows by when ``paths`` are marked used."""
        for path in paths:
            self.css_class(path)  # encodes the new ones
        rules = {self._rules[path] for path in paths}
        return sum(len(rule) + 1 for name, rule in rules if rule and name not in self._used)  # ASCII, a line each

    def use(self, paths: list[str]) -> None:
        for path in paths:
            self._used[self.css_class(path)] = None

    def stylesheet(self) -> str:
        """The CSS rules of the images marked used."""
        rules = dict(self._rules.values())
        return "\n".join(rules[name] for name in self._used if rules.get(name))


def match_figure(model: FoLModel, query: str, database: str, config: dict, max_pixels: int | None) -> str:
    """FoL's figure (:func:`fol_plugin.visualization.draw_pair`: selected regions, matches, RANSAC
    inliers) of ``query`` against ``database`` as a JPEG data URI, with the run's image size,
    resize mode and RANSAC model (``config``: its ``recalls.json`` configuration)."""
    from ..visualization import draw_pair, match_pair

    extraction = config["extraction"]
    ransac_model = config.get("scorer", {}).get("ransac_model", "homography")
    images, regions, result = match_pair(
        model, (query, database), tuple(extraction["image_size"]), extraction["resize_mode"],
        ransac_model=ransac_model, max_image_pixels=max_pixels,
    )  # fmt: skip
    figure = draw_pair(images, regions, result, (Path(query).name, Path(database).name), ransac_model)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="jpeg", dpi=FIGURE_DPI, pil_kwargs={"quality": FIGURE_QUALITY})
    return data_uri(buffer.getvalue(), "image/jpeg")
