"""``fol-vpr visualize`` on the shared positive pair (a tiny ViT: plumbing, not accuracy)."""
from __future__ import annotations

import numpy as np
import torch
from kornia.io import ImageLoadType, load_image

import fol_plugin
from fol_plugin import checkpoint, cli
from fol_plugin.matching import match, verify
from fol_plugin.models import FoLModel
from fol_plugin.visualization import MAX_LINES, draw_pair, evenly_spread, match_pair

from .conftest import DATA, TINY_VIT, require


def test_visualize_writes_a_readable_figure_with_the_counts(tmp_path, capsys, monkeypatch):
    pair = require(DATA / "match_pair")
    torch.manual_seed(0)
    model = FoLModel(TINY_VIT).eval()
    weights = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), weights)
    images, regions, result = match_pair(model, (pair / "query.jpg", pair / "database.jpg"), (126, 126))
    originals = [fol_plugin.load_image(pair / name) for name in ("query.jpg", "database.jpg")]
    assert [tuple(i.shape) for i in images] == [tuple(i.shape) for i in originals]
    assert [tuple(r.shape) for r in regions] == [(9, 9), (9, 9)]
    assert len(result.matches) == len(match(*result.features, "fol"))
    assert torch.equal(result.inliers, verify(*result.features, match(*result.features, "fol"), seed=0)[1])
    figure = draw_pair(images, regions, result, ("query.jpg", "database.jpg"), "homography")
    assert figure._suptitle.get_text() == f"FoL: {len(result.matches)} matches, {int(result.inliers.sum())} RANSAC inliers"

    output = tmp_path / "figure.png"
    # fol-vpr takes vitl/vitb only: run the command with the tiny model patched in.
    monkeypatch.setattr(checkpoint, "FoLModel", lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs))
    code = cli.main(["visualize", "--query", str(pair / "query.jpg"), "--database", str(pair / "database.jpg"),
                     "--backbone", "vitb", "--weights", str(weights), "--image_size", "126", "126",
                     "--output", str(output)])
    assert code == 0
    assert f"{len(result.matches)} matches, {int(result.inliers.sum())} RANSAC inliers" in capsys.readouterr().out
    picture = load_image(output, ImageLoadType.RGB8)
    assert picture.shape[0] == 3 and picture.shape[1] > 500 and picture.shape[2] == 1100
    assert picture.float().std() > 20  # not blank


def test_visualize_names_a_missing_image(tmp_path, caplog):
    code = cli.main(["visualize", "--query", str(tmp_path / "nope.jpg"), "--database", str(tmp_path / "nope.jpg"),
                     "--weights", str(tmp_path / "w.pth")])
    assert code == 2 and f"image {tmp_path / 'nope.jpg'} does not exist" in caplog.text


def test_match_rows_draw_a_bounded_number_of_distinct_lines(tiny_model):
    """Hundreds of matches: at most MAX_LINES lines, spread over all of them, neighbours in other
    colours, and the title counts what was left out."""
    pair = require(DATA / "match_pair")
    images, regions, result = match_pair(tiny_model, (pair / "query.jpg", pair / "database.jpg"), (126, 126))
    many = torch.arange(2 * MAX_LINES) % len(result.features[0].keypoints)
    result.matches = torch.stack([many, many % len(result.features[1].keypoints)], dim=1)
    result.inliers = torch.zeros(len(many), dtype=torch.bool)
    figure = draw_pair(images, regions, result, ("query.jpg", "database.jpg"), "homography")
    matches_axis = [axis for axis in figure.axes if axis.get_title().startswith(f"{2 * MAX_LINES:,} matches")][0]
    assert matches_axis.get_title() == f"{2 * MAX_LINES:,} matches, {MAX_LINES} drawn"
    [lines] = matches_axis.collections
    assert len(lines.get_segments()) == MAX_LINES
    colours = lines.get_colors()
    assert all(not np.allclose(a, b) for a, b in zip(colours[:-1], colours[1:]))
    assert evenly_spread(10, 4).tolist() == [0, 3, 6, 9] and evenly_spread(3, 4).tolist() == [0, 1, 2]
