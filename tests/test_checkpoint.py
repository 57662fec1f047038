"""Checkpoint loading: upstream format, torch.hub cache, strictness and every error path."""
from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import pytest
import torch

import hubconf
from fol_plugin import CheckpointDownloadError, CheckpointError, checkpoint, load_model
from fol_plugin.checkpoint import (
    WEIGHT_URLS,
    UnsafeCheckpointError,
    cache_path,
    checkpoint_backbone,
    extract_state_dict,
    read_checkpoint,
)
from fol_plugin.models import FoLModel

from .conftest import TINY_VIT, cli_run, closed_port_url, save_upstream_checkpoint, tiny_eval_args


@pytest.fixture
def tiny_weights(tiny_model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in tiny_model.state_dict().items()}


def assert_same_weights(model, state_dict):
    loaded = model.state_dict()
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[key], state_dict[key]) for key in state_dict)


def test_upstream_format_loads_exactly(tmp_path, tiny_weights, no_network):
    path = save_upstream_checkpoint(tiny_weights, tmp_path / "fol.pth")
    model = load_model(TINY_VIT, weights=path, device="cpu")
    assert_same_weights(model, tiny_weights)
    assert not model.training


def test_plain_state_dict_loads(tmp_path, tiny_weights):
    torch.save(tiny_weights, tmp_path / "plain.pth")
    assert_same_weights(load_model(TINY_VIT, weights=tmp_path / "plain.pth", device="cpu"), tiny_weights)


def test_training_checkpoint_with_extra_entries_loads(tmp_path, tiny_weights):
    checkpoint = {"model_state_dict": tiny_weights, "epoch_num": 3, "recalls": [91.2, 95.0], "optimizer_state_dict": {}}
    torch.save(checkpoint, tmp_path / "train.pth")
    assert_same_weights(load_model(TINY_VIT, weights=tmp_path / "train.pth", device="cpu"), tiny_weights)


def test_cached_download_is_used_without_network(hub_home, tiny_weights, no_network):
    url = closed_port_url("FoL_tiny.pth")
    save_upstream_checkpoint(tiny_weights, hub_home / "FoL_tiny.pth")
    assert cache_path(url) == hub_home / "FoL_tiny.pth"
    assert_same_weights(load_model(TINY_VIT, weights=url, device="cpu"), tiny_weights)


def test_unreachable_url_fails_fast_with_the_fix(hub_home):
    url = closed_port_url("FoL_base.pth")
    start = time.monotonic()
    with pytest.raises(CheckpointDownloadError) as error:
        load_model(TINY_VIT, weights=url)
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert url in message
    assert str(hub_home / "FoL_base.pth") in message
    assert "weights=" in message
    assert not (hub_home / "FoL_base.pth").exists()


def test_corrupt_cached_file_is_named(hub_home, no_network):
    (hub_home / "FoL_tiny.pth").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(CheckpointError, match=r"FoL_tiny\.pth.*not a readable PyTorch checkpoint.*delete it"):
        load_model(TINY_VIT, weights=closed_port_url("FoL_tiny.pth"))


def test_truncated_file_is_named(tmp_path, tiny_weights):
    path = save_upstream_checkpoint(tiny_weights, tmp_path / "fol.pth")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"fol\.pth is not a readable PyTorch checkpoint.*truncated"):
        load_model(TINY_VIT, weights=path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth does not exist"):
        load_model(TINY_VIT, weights=tmp_path / "nope.pth")


def test_non_fol_checkpoint_is_rejected(tmp_path):
    torch.save({"state_dict": {"conv1.weight": torch.zeros(3)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match=r"resnet\.pth is not a FoL checkpoint"):
        load_model(TINY_VIT, weights=tmp_path / "resnet.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_model(TINY_VIT, weights=tmp_path / "list.pth")


def test_missing_keys_are_an_error_listing_them(tmp_path, tiny_weights):
    del tiny_weights["upconv2.weight"], tiny_weights["aggregator.score.3.bias"]
    save_upstream_checkpoint(tiny_weights, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"lacks 2 .*aggregator\.score\.3\.bias, upconv2\.weight"):
        load_model(TINY_VIT, weights=tmp_path / "partial.pth")


def test_unexpected_keys_warn_listing_them(tmp_path, tiny_weights):
    tiny_weights["backbone.model.register_tokens"] = torch.zeros(1, 4, 32)
    save_upstream_checkpoint(tiny_weights, tmp_path / "extra.pth")
    with pytest.warns(UserWarning, match=r"1 keys the model does not use: backbone\.model\.register_tokens"):
        model = load_model(TINY_VIT, weights=tmp_path / "extra.pth", device="cpu")
    del tiny_weights["backbone.model.register_tokens"]
    assert_same_weights(model, tiny_weights)


def test_wrong_architecture_names_the_shapes(tmp_path, tiny_weights):
    save_upstream_checkpoint(tiny_weights, tmp_path / "tiny.pth")
    wider = TINY_VIT.__class__(embed_dim=48, depth=2, num_heads=2)
    with pytest.raises(CheckpointError, match=r"wrong shapes for backbone\.model\.cls_token \(1, 1, 32\) \(model: \(1, 1, 48\)\)"):
        load_model(wider, weights=tmp_path / "tiny.pth")


def test_backbone_is_recognised_from_the_weights():
    assert checkpoint_backbone({"backbone.model.cls_token": torch.zeros(1, 1, 1024)}) == "vitl"
    assert checkpoint_backbone({"backbone.model.cls_token": torch.zeros(1, 1, 768)}) == "vitb"
    assert checkpoint_backbone({"backbone.model.cls_token": torch.zeros(1, 1, 32)}) is None


def test_module_prefix_is_stripped(tiny_weights):
    upstream = {"model_state_dict": {"module." + key: value for key, value in tiny_weights.items()}}
    assert extract_state_dict(upstream, "x").keys() == tiny_weights.keys()


def test_auto_weights_need_a_published_backbone():
    with pytest.raises(ValueError, match="no published FoL weights"):
        load_model(TINY_VIT, weights="auto")


def test_random_initialisation_without_weights():
    model = load_model(TINY_VIT, weights=None, device="cpu")
    assert not model.training and model.backbone.model.pos_embed.abs().sum() > 0


def test_hub_entrypoints_keep_the_original_signatures():
    for name in ("FoL", "fol_vitl14", "fol_vitb14"):
        parameters = inspect.signature(getattr(hubconf, name)).parameters
        assert parameters["pretrained"].default is True
        assert parameters["progress"].default is True
        assert parameters["map_location"].default == "cpu"
        assert any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    assert inspect.signature(hubconf.FoL).parameters["backbone"].default == "vitl"
    assert inspect.signature(hubconf.get_trained_model).parameters["backbone"].default == "vitl"


def test_hub_entrypoint_reports_unreachable_published_url(hub_home, monkeypatch):
    url = closed_port_url("FoL_base.pth")
    monkeypatch.setitem(WEIGHT_URLS, "vitb", url)
    with pytest.raises(CheckpointDownloadError, match="weights="):
        hubconf.fol_vitb14(pretrained=True)


def test_loose_loading_takes_what_matches_and_warns(tmp_path, tiny_weights):
    """strict=False, the original hub's loading: the missing weights are named and keep their
    initialisation, every other weight is the checkpoint's."""
    missing = tiny_weights.pop("upconv2.weight")
    save_upstream_checkpoint(tiny_weights, tmp_path / "partial.pth")
    with pytest.warns(UserWarning, match=r"lacks 1 of the model's weights, left at their random initialisation \(strict=False\): upconv2\.weight"):
        model = load_model(TINY_VIT, weights=tmp_path / "partial.pth", device="cpu", strict=False)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in tiny_weights.items())
    assert loaded["upconv2.weight"].shape == missing.shape and bool(loaded["upconv2.weight"].isfinite().all())
    wider = TINY_VIT.__class__(embed_dim=48, depth=2, num_heads=2)
    with pytest.raises(CheckpointError, match="wrong shapes"):  # loose loading still refuses other shapes
        load_model(wider, weights=tmp_path / "partial.pth", strict=False)


def test_every_hub_entrypoint_takes_strict(tmp_path, tiny_weights, monkeypatch):
    monkeypatch.setattr(checkpoint, "FoLModel", lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs))
    del tiny_weights["upconv2.bias"]
    path = save_upstream_checkpoint(tiny_weights, tmp_path / "partial.pth")
    calls = {
        "FoL": lambda **kw: hubconf.FoL(backbone="vitb", **kw),
        "fol_vitl14": hubconf.fol_vitl14,
        "fol_vitb14": hubconf.fol_vitb14,
        "get_trained_model": lambda **kw: hubconf.get_trained_model(backbone="vitb", **kw),
    }
    for name, call in calls.items():
        assert inspect.signature(getattr(hubconf, name)).parameters["strict"].default is True, name
        with pytest.raises(CheckpointError, match="upconv2.bias"):
            call(weights=str(path))
        with pytest.warns(UserWarning, match="upconv2.bias"):
            model = call(weights=str(path), strict=False)
        images = torch.randn(1, 3, 126, 126)
        with torch.inference_mode():
            assert model(images).shape == (1, 8448), name


class RunsCode:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(path: Path, marker: Path, weights: dict) -> Path:
    torch.save({"model_state_dict": weights, "extra": RunsCode(marker)}, path)
    return path


def test_a_checkpoint_that_runs_code_is_refused_everywhere(tmp_path, hub_home, tiny_model, tiny_cli, labelled_set, caplog):
    marker = tmp_path / "code_ran"
    weights = tiny_model.state_dict()
    evil = malicious_checkpoint(tmp_path / "evil.pth", marker, weights)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth holds Python objects.*GLOBAL posix\.system.*weights_only=False"):
        load_model(TINY_VIT, weights=evil)
    malicious_checkpoint(hub_home / "FoL_base.pth", marker, weights)  # in the torch.hub cache
    with pytest.raises(UnsafeCheckpointError):
        load_model("vitb", weights="auto")
    for option in ("--dinov2_weights", "--resume"):  # the training paths read through read_checkpoint
        with pytest.raises(UnsafeCheckpointError):
            read_checkpoint(evil, option=option)
    assert cli_run(*tiny_eval_args(labelled_set, tmp_path / "out", evil)) == 2
    assert "torch.load(weights_only=True) only" in caplog.text and "Traceback" not in caplog.text
    assert not marker.exists()
    # The conversion the message gives works, in the user's own trusted environment.
    converted = Path(f"{evil}.safe.pth")
    torch.save({"model_state_dict": torch.load(evil, weights_only=False)["model_state_dict"]}, converted)
    marker.unlink()
    assert load_model(TINY_VIT, weights=converted) is not None and not marker.exists()


def test_checkpoints_we_write_load_with_the_safe_unpickler(tmp_path):
    """Training checkpoints hold the optimizer, scheduler, log and config: all plain data."""
    model = FoLModel(TINY_VIT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, 10)
    optimizer.step()
    scheduler.step()
    torch.save({
        "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(), "epoch_num": 0, "recalls": {"R@5": 50.0},
        "log": [{"epoch": 1, "loss_total": 1.5}], "best_score": -float("inf"), "rng_state": torch.get_rng_state(),
        "config": {"output_dir": "runs/x", "image_size": [126, 126]},
    }, tmp_path / "last.pth")
    assert read_checkpoint(tmp_path / "last.pth", option="--resume")["epoch_num"] == 0
