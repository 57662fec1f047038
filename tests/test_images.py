"""Image decoding and FoL's evaluation pre-processing (kornia)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import kornia
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fol_plugin
from fol_plugin.data import load_image, normalize, preprocess
from fol_plugin.data.images import ImageTooLargeError, check_image_pixels, image_dimensions, network_size
from fol_plugin.models.resizing import round_to_patch_multiple

from .conftest import DATA, require, write_blank_png


@pytest.fixture
def png_image(tmp_path):
    pixels = (torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    path = tmp_path / "image.png"
    kornia.io.write_image(path, pixels)
    return path, pixels


def test_png_roundtrip(png_image):
    path, pixels = png_image
    image = load_image(path)
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32
    assert torch.equal((image * 255).round().to(torch.uint8), pixels)


def test_format_comes_from_content_not_extension(png_image):
    path, pixels = png_image
    renamed = path.with_name("really_a_png.jpg")
    shutil.copy(path, renamed)
    assert torch.equal(load_image(renamed), load_image(path))


def test_shared_jpeg_and_mislabelled_png_load():
    data = require(DATA)
    assert load_image(data / "toy_dataset" / "queries" / "q1.jpg").shape == (3, 480, 614)
    assert load_image(data / "match_pair" / "query.jpg").shape == (3, 1270, 1706)  # PNG data named .jpg


def test_missing_image_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image .*missing\.jpg does not exist"):
        load_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize("content", [b"not an image", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_corrupt_image_is_named(tmp_path, content):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.jpg"):
        load_image(path)


def test_original_preprocessing_normalises_then_resizes_without_antialias():
    image = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = F.interpolate(((image - mean) / std)[None], size=(28, 42), mode="bilinear", align_corners=False)
    torch.testing.assert_close(preprocess(image, (28, 42)), expected)
    antialiased = preprocess(image, (28, 42), resize_mode="antialias")
    assert antialiased.shape == expected.shape and not torch.allclose(antialiased, expected)


def test_preprocess_keeps_size_and_rejects_unknown_modes():
    images = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(preprocess(images, (28, 28)), normalize(images))
    with pytest.raises(ValueError, match="resize_mode='nearest'"):
        preprocess(images, (14, 14), resize_mode="nearest")


def test_pixel_limit_is_read_from_the_header(tmp_path):
    """The limit admits an image of exactly ``max_pixels`` and refuses one more, from the header
    alone: a PNG cut after its IHDR chunk (no pixel data at all) is judged the same."""
    path = write_blank_png(tmp_path / "wide.png", 300, 200)
    assert image_dimensions(path) == (300, 200)
    assert load_image(path, max_pixels=300 * 200).shape == (3, 200, 300)
    with pytest.raises(ImageTooLargeError, match=r"wide.png is 300x200 \(60,000 pixels\), more than --max_image_pixels 59,999"):
        load_image(path, max_pixels=300 * 200 - 1)
    header_only = tmp_path / "header_only.png"
    header_only.write_bytes(path.read_bytes()[:33])  # signature, IHDR
    with pytest.raises(ImageTooLargeError, match="header_only.png is 300x200"):
        check_image_pixels(header_only, 1000)
    check_image_pixels(header_only, None)


def test_pixel_limit_of_a_jpeg(tmp_path):
    path = tmp_path / "photo.jpg"
    kornia.io.write_image(path, torch.zeros(3, 40, 50, dtype=torch.uint8))
    assert image_dimensions(path) == (50, 40)
    with pytest.raises(ImageTooLargeError, match="photo.jpg is 50x40"):
        load_image(path, max_pixels=100)


def test_a_file_that_is_no_image_names_itself(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="cannot decode image .*notes.jpg"):
        load_image(path)


def test_one_image_size_value_is_the_harness_resize_rounded_to_patches():
    """``--image_size S``: the size VPR-methods-evaluation's own ``TestDataset`` gives each toy
    photo (torchvision's ``Resize([S])``, recorded by ``fixtures/make_vme_resize_sizes.py``), each
    side then rounded to the nearest multiple of 14; five aspect ratios, three values of S."""
    reference = json.loads((Path(__file__).parent / "fixtures" / "vme_resize_sizes.json").read_text())
    assert {tuple(entry["original"]) for entry in reference["sizes"]} >= {(480, 614), (768, 480), (512, 512)}
    for entry in reference["sizes"]:
        expected = tuple(round_to_patch_multiple(side) for side in entry["resized"])
        assert network_size((entry["image_size"],), *entry["original"]) == expected, entry
    assert network_size((322, 434), 480, 640) == (322, 434)  # two values are taken as they are


@pytest.mark.parametrize("mode", ["CMYK", "LA", "I;16"])
def test_image_modes_pillow_reads_are_converted_as_pillow_does(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    image = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)) if mode == "I;16" else rgb.convert(mode)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path)
    expected = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255
    loaded = fol_plugin.load_image(path)
    assert loaded.shape == (3, 30, 40) and np.array_equal(loaded.permute(1, 2, 0).numpy(), expected)


def test_a_strip_image_is_refused_before_it_becomes_a_huge_network_input(tmp_path):
    """A 4000 x 1 PNG with one --image_size value would be a 126 x 504,000 input (4.4 GB)."""
    from fol_plugin.features import ExtractionConfig
    from fol_plugin.features.extract import ImageListDataset

    strip = tmp_path / "strip.png"
    Image.new("RGB", (4000, 1)).save(strip)
    dataset = ImageListDataset([str(strip)], [0], ExtractionConfig(image_size=(126,)))
    with pytest.raises(ImageTooLargeError, match=(
        r"strip.png is 4000x1: --image_size 126 would make it a 504000x126 network input \(63,504,000 pixels\), "
        r"beyond an aspect ratio of at most 16:1 from one --image_size value: crop or resize the image, or give --image_size H W"
    )):  # fmt: skip
        dataset[0]
    assert ImageListDataset([str(strip)], [0], ExtractionConfig(image_size=(126, 126)))[0][0].shape == (3, 126, 126)


def test_the_network_input_is_bounded_by_the_pixel_limit():
    from fol_plugin.data.images import NETWORK_PIXEL_SHARE, checked_network_size

    assert checked_network_size("a.jpg", (322,), 480, 640, 2**27) == network_size((322,), 480, 640)
    with pytest.raises(ImageTooLargeError, match=rf"a.jpg is 640x480: --image_size 322 would make it a 434x322 .*--max_image_pixels / {NETWORK_PIXEL_SHARE} = 4,096 pixels"):
        checked_network_size("a.jpg", (322,), 480, 640, 4096 * NETWORK_PIXEL_SHARE)
    with pytest.raises(ImageTooLargeError, match="aspect ratio of at most 16:1"):  # no pixel limit: the ratio holds
        checked_network_size("b.jpg", (126,), 1, 4000, None)
