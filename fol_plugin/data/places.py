"""Training data: places of several images each, as GSV-Cities or as one folder per place.

A batch is P places x K images (K = 4 in FoL's training): each item of :class:`PlaceDataset` is
one place, K of its images and K copies of its label; :func:`collate_places` flattens P items to
[P*K, 3, H, W] images and [P*K] labels.
"""
from __future__ import annotations

import csv
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from kornia.augmentation.auto import RandAugment
from torch.utils.data import Dataset

from .datasets import IMAGE_EXTENSIONS
from ..options import DEFAULT_MAX_IMAGE_PIXELS, IMAGES_PER_PLACE
from .images import RESIZE_MODES, load_image, normalize, resize_images

logger = logging.getLogger(__name__)

GSV_COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")
RANDAUGMENT_OPS, RANDAUGMENT_MAGNITUDE = 3, 9


def gsv_image_name(row: dict[str, str]) -> str:
    """GSV-Cities file name: ``<city>_<place_id:07d>_<year>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg``."""
    return (
        f"{row['city_id']}_{int(row['place_id']):07d}_{int(row['year']):04d}_{int(row['month']):02d}_"
        f"{int(float(row['northdeg'])):03d}_{float(row['lat'])}_{float(row['lon'])}_{row['panoid']}.jpg"
    )


def gsv_cities_places(
    root: str | os.PathLike, cities: Sequence[str], min_images: int = IMAGES_PER_PLACE, seed: int = 0
) -> list[list[Path]]:
    """Places of GSV-Cities, as the original reads them: ``root/Dataframes/<city>.csv`` rows
    grouped by ``place_id``, images in ``root/Images/<city>/``, each place's images most recent
    first (by year, month and latitude, descending), the places of each city shuffled once (the
    original with an unseeded shuffle, here with ``seed``), the cities in the given order. Places
    with fewer than ``min_images`` images are left out (logged).

    Returns:
        one list of image paths per place.
    """
    root = Path(root)
    places: list[list[Path]] = []
    shuffler = random.Random(seed)
    for city in cities:
        table = root / "Dataframes" / f"{city}.csv"
        if not table.is_file():
            available = sorted(p.stem for p in (root / "Dataframes").glob("*.csv"))
            raise FileNotFoundError(f"{table} does not exist; cities in {root / 'Dataframes'}: {available}")
        with open(table, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in GSV_COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{table} lacks the GSV-Cities columns {missing}")
            by_place: dict[str, list[tuple[tuple[int, int, float], Path]]] = {}
            for row in reader:
                recency = (int(row["year"]), int(row["month"]), float(row["lat"]))
                path = root / "Images" / row["city_id"] / gsv_image_name(row)
                by_place.setdefault(row["place_id"], []).append((recency, path))
        kept = [
            [path for _, path in sorted(rows, key=lambda item: item[0], reverse=True)]
            for rows in by_place.values()
            if len(rows) >= min_images
        ]
        if len(kept) < len(by_place):
            logger.info("%s: %d of %d places have fewer than %d images and are left out", city,
                        len(by_place) - len(kept), len(by_place), min_images)
        if kept and not kept[0][0].is_file():
            raise FileNotFoundError(f"{kept[0][0]} (listed in {table}) does not exist: check the GSV-Cities root {root}")
        shuffler.shuffle(kept)
        places.extend(kept)
    return places


def folder_places(root: str | os.PathLike, min_images: int = IMAGES_PER_PLACE) -> list[list[Path]]:
    """Places as sub-folders of ``root``, each holding that place's images (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"place folder {root} does not exist")
    places, small = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        (places if len(images) >= min_images else small).append(images)
    if small:
        logger.info("%s: %d places have fewer than %d images and are left out", root, len(small), min_images)
    if not places:
        raise ValueError(f"no place in {root} has {min_images} images or more (one sub-folder per place)")
    return places


class PlaceDataset(Dataset):
    """Item p: ``images_per_place`` images of place p [K, 3, H, W] and [K] copies of p.

    Args:
        places: image paths per place.
        image_size: (H, W) network input.
        images_per_place: K: the place's first K images (the original: the most recent of a
            GSV-Cities place, the same every epoch), or, with ``random_images``, K drawn without
            replacement (reproducibly from ``seed`` and the epoch).
        augment: kornia RandAugment (3 operations) on the images in [0, 1].
        resize_mode: as :func:`fol_plugin.data.preprocess`; "bilinear_antialias" is the
            original's training resize (torchvision's Resize of a PIL image).
        normalize_images: ImageNet normalisation (the original trains on images in [0, 1]).
        random_images: draw K random images per place each epoch instead of the first K.
        seed: sampling and augmentation seed.
        max_image_pixels: images declaring more pixels are refused before decoding (None: no limit).
    """

    def __init__(
        self,
        places: Sequence[Sequence[Path]],
        image_size: tuple[int, int] = (322, 322),
        images_per_place: int = IMAGES_PER_PLACE,
        augment: bool = False,
        resize_mode: str = "bilinear_antialias",
        normalize_images: bool = False,
        random_images: bool = False,
        seed: int = 0,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={resize_mode!r}; choose one of {RESIZE_MODES}")
        too_small = [i for i, paths in enumerate(places) if len(paths) < images_per_place]
        if too_small:
            raise ValueError(f"places {too_small[:5]} have fewer than {images_per_place} images")
        self.places, self.image_size, self.images_per_place = places, tuple(image_size), images_per_place
        self.augment = RandAugment(n=RANDAUGMENT_OPS, m=RANDAUGMENT_MAGNITUDE) if augment else None
        self.resize_mode, self.normalize_images, self.random_images = resize_mode, normalize_images, random_images
        self.seed, self.epoch, self.max_image_pixels = seed, 0, max_image_pixels

    def set_epoch(self, epoch: int) -> None:
        """Draw other images (and augmentations) in every epoch, reproducibly."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.places)

    def chosen(self, index: int) -> list[Path]:
        """The images place ``index`` contributes in the current epoch."""
        if not self.random_images:
            return list(self.places[index][: self.images_per_place])
        return random.Random(f"{self.seed}-{self.epoch}-{index}").sample(list(self.places[index]), self.images_per_place)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.cat(
            [
                resize_images(load_image(path, self.max_image_pixels)[None], self.image_size, self.resize_mode)
                for path in self.chosen(index)
            ]
        )
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(random.Random(f"{self.seed}-{self.epoch}-{index}-augment").getrandbits(31))
                images = self.augment(images).clamp(0, 1)
        if self.normalize_images:
            images = normalize(images)
        return images, torch.full((self.images_per_place,), index, dtype=torch.long)


def collate_places(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """P places -> images [P*K, 3, H, W], labels [P*K] (place-major order)."""
    images, labels = zip(*items)
    return torch.cat(images), torch.cat(labels)
