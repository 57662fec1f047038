"""Evaluation image sets in the VPR-datasets-downloader layout: image lists, UTM labels, positives.

A folder's images come from ``<folder>_images_paths.txt`` when it exists (paths relative to the
folder, one per line, as SF-XL ships them; a path leading outside the folder is refused unless
allowed), else from a sorted recursive search for .jpg, .jpeg and .png files. Labels are the UTM
east and north fields of ``@east@north@...@.jpg`` file names. File names are taken as the
operating system gives them: bytes that are not UTF-8 are kept (``surrogateescape``), so every
name a file system allows is listed.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..options import DEFAULT_POSITIVE_DISTANCE

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PATHS_FILE_SUFFIX = "_images_paths.txt"


@dataclass
class ImageSet:
    """The images of one folder, in evaluation order.

    Attributes:
        name: the folder's name (used to name outputs).
        folder: the folder.
        paths: image paths [N], sorted (or in the order of the folder's paths file).
        utms: [N, 2] float64 UTM (east, north) in metres, or None without labels.
    """

    name: str
    folder: Path
    paths: list[str]
    utms: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)


def list_images(folder: str | os.PathLike, allow_outside_paths: bool = False) -> list[str]:
    """Image paths of ``folder``: from ``<folder>_images_paths.txt`` if present, else a sorted
    recursive search for .jpg/.jpeg/.png files that follows directory symlinks.

    Args:
        allow_outside_paths: accept paths of the paths file that lead outside ``folder``
            (``../other/x.jpg``, absolute paths); refused by default, since they read another
            dataset's (or any) files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths_file = Path(str(folder).rstrip("/\\") + PATHS_FILE_SUFFIX)
    if paths_file.is_file():
        text = paths_file.read_text(encoding="utf-8", errors="surrogateescape")
        lines = [line.strip() for line in text.splitlines()]
        paths = [str(folder / line) for line in lines if line]
        if not paths:
            raise ValueError(f"{paths_file} lists no images; delete it to search {folder} instead")
        if not allow_outside_paths:
            _check_inside(folder, paths_file, [line for line in lines if line])
        if not Path(paths[0]).is_file():
            raise FileNotFoundError(
                f"{paths_file} lists {lines[0]!r}, but {paths[0]} does not exist: the list does not "
                f"match {folder}; fix or delete {paths_file}"
            )
        logger.info("Read %d image paths of %s from %s", len(paths), folder, paths_file)
        return paths
    paths = sorted(_walk_images(folder))
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}; check --database_folder / --queries_folder")
    return paths


def _check_inside(folder: Path, paths_file: Path, lines: list[str]) -> None:
    """Refuse paths of ``paths_file`` that lead outside ``folder`` (judged on the path as written:
    symbolic links inside the folder may point anywhere, as in a searched folder)."""
    root = os.path.abspath(folder)
    outside = [line for line in lines if os.path.commonpath([root, os.path.normpath(os.path.join(root, line))]) != root]
    if outside:
        raise ValueError(
            f"{paths_file} lists {len(outside)} path(s) outside {folder}, e.g. {outside[0]!r}: fix the list, or pass "
            "--allow_outside_paths if the images really live elsewhere"
        )


def _walk_images(folder: Path) -> list[str]:
    """Image files under ``folder`` as VPR-methods-evaluation's ``glob(recursive=True)`` finds
    them: directory symlinks followed, hidden names (``.*``, e.g. macOS ``._x.jpg``) skipped; a
    link back to one of its own parent folders (a loop), a link to itself and an entry that cannot
    be read are skipped with a warning, as glob skips them."""
    found: list[str] = []

    def walk(directory: str, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(directory)
        if real in ancestors:
            logger.warning("%s leads back to its parent %s: skipping it (a symlink loop)", directory, real)
            return
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError as error:
            if not ancestors:  # the folder given itself
                raise
            logger.warning("cannot read %s (%s): skipping it", directory, error.strerror or error)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
                is_image = not is_dir and entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
            except OSError as error:  # a link to itself (ELOOP), an entry gone or unreadable
                logger.warning("cannot read %s (%s): skipping it", entry.path, error.strerror or error)
                continue
            if is_dir:
                walk(entry.path, ancestors | {real})
            elif is_image:
                found.append(entry.path)

    walk(str(folder), frozenset())
    return found


def utm_from_name(path: str) -> tuple[float, float]:
    """(east, north) from a ``@east@north@...`` file name."""
    fields = Path(path).name.split("@")
    try:
        return float(fields[1]), float(fields[2])
    except (IndexError, ValueError):
        raise ValueError(
            f"cannot read UTM coordinates from the file name of {path}: expected "
            f"'@<utm_east>@<utm_north>@...@.jpg'; use --no_labels for unlabelled images"
        ) from None


def load_image_set(folder: str | os.PathLike, labelled: bool = True, allow_outside_paths: bool = False) -> ImageSet:
    """The images of ``folder`` (:func:`list_images`) with their UTM labels (when ``labelled``)."""
    folder = Path(folder)
    paths = list_images(folder, allow_outside_paths)
    utms = np.array([utm_from_name(path) for path in paths], dtype=np.float64) if labelled else None
    return ImageSet(name=folder.name, folder=folder, paths=paths, utms=utms)


def find_positives(
    database_utms: np.ndarray, queries_utms: np.ndarray, radius: float = DEFAULT_POSITIVE_DISTANCE
) -> list[np.ndarray]:
    """Database indices within ``radius`` metres of each query (scikit-learn radius search).

    Args:
        database_utms: [N, 2] UTM coordinates.
        queries_utms: [Q, 2] UTM coordinates.

    Returns:
        Q sorted int64 arrays.
    """
    from sklearn.neighbors import NearestNeighbors  # imported by labelled runs only

    knn = NearestNeighbors().fit(database_utms)
    positives = knn.radius_neighbors(queries_utms, radius=radius, return_distance=False)
    return [np.sort(indices).astype(np.int64) for indices in positives]
