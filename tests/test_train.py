"""``fol-vpr train`` on synthetic places with a tiny ViT: the loss falls, held-out recall improves,
runs resume exactly, and checkpoints load through the hub entrypoints."""
from __future__ import annotations

import csv
import dataclasses
import errno
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imsave

from fol_plugin import checkpoint, cli, files
from fol_plugin.data import load_image
from fol_plugin.distributed import SINGLE_PROCESS, Processes
from fol_plugin.data.datasets import load_image_set
from fol_plugin.features import ExtractionConfig
from fol_plugin.data.places import PlaceDataset, collate_places, folder_places, gsv_cities_places, gsv_image_name
from fol_plugin.models import FoLModel
from fol_plugin.train import loop
from fol_plugin.checkpoint import load_dinov2_weights
from fol_plugin import config as train_config
from fol_plugin.train import sharding
from fol_plugin.config import TrainConfig
from fol_plugin.train.log import plot_losses
from fol_plugin.train.loop import train, validation_recalls
from fol_plugin.train.run_folder import BEST, LAST, LOG, PLOT
from fol_plugin.train.sharding import accumulation_divisors

from .conftest import REPO_ROOT, TINY_VIT, utm_name

SIZE = 126


def scene_views(rng: np.random.Generator, views: int) -> list[np.ndarray]:
    """A random scene of coloured rectangles, seen through shifted crops with their own
    illumination, two occluding rectangles and noise: hard enough that an untrained model
    confuses places."""
    scene = np.empty((SIZE + 24, SIZE + 24, 3))
    scene[:] = rng.uniform(0, 1, 3)
    for _ in range(6):
        y, x = rng.integers(0, SIZE, 2)
        h, w = rng.integers(12, 60, 2)
        scene[y : y + h, x : x + w] = rng.uniform(0, 1, 3)
    crops = []
    for _ in range(views):
        dy, dx = rng.integers(0, 24, 2)
        crop = scene[dy : dy + SIZE, dx : dx + SIZE] * rng.uniform(0.6, 1.4, 3) + rng.uniform(-0.4, 0.4)
        for _ in range(2):
            y, x = rng.integers(0, SIZE, 2)
            h, w = rng.integers(10, 40, 2)
            crop[y : y + h, x : x + w] = rng.uniform(0, 1, 3)
        crops.append(np.clip(crop + rng.normal(0, 0.08, crop.shape), 0, 1))
    return crops


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """12 training places of 4 views (one folder each) and 16 held-out places: one database
    image and one query each, named with UTM coordinates 1 km apart."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    for place in range(12):
        folder = root / "train" / f"place{place:02d}"
        folder.mkdir(parents=True)
        for view, image in enumerate(scene_views(rng, 4)):
            imsave(folder / f"{view}.png", image)
    for kind in ("database", "queries"):
        (root / "val" / kind).mkdir(parents=True)
    for place in range(16):
        database, query = scene_views(rng, 2)
        imsave(root / "val" / "database" / utm_name(1000 * place, 0, f"d{place}").replace(".jpg", ".png"), database)
        imsave(root / "val" / "queries" / utm_name(1000 * place + 5, 0, f"q{place}").replace(".jpg", ".png"), query)
    return {
        "places": folder_places(root / "train"),
        "validation": (load_image_set(root / "val" / "database"), load_image_set(root / "val" / "queries")),
        "root": root,
    }


def tiny_config(output_dir: Path, **overrides) -> TrainConfig:
    settings = dict(
        output_dir=output_dir, backbone=TINY_VIT, weights=None, num_trainable_blocks=2, image_size=(SIZE, SIZE),
        places_per_batch=4, epochs=3, lr=1e-3, augment=False, num_workers=0, seed=0,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_training_lowers_the_loss_and_beats_the_untrained_model(synthetic, tmp_path):
    config = tiny_config(tmp_path / "run", validation=synthetic["validation"])
    torch.manual_seed(config.seed)
    untrained = FoLModel(TINY_VIT, num_trainable_blocks=2)
    before = validation_recalls(untrained, *synthetic["validation"], ExtractionConfig((SIZE, SIZE), num_workers=0))
    summary = train(config, synthetic["places"])
    epochs = summary["epochs"]
    assert epochs[-1]["loss_total"] < epochs[0]["loss_total"]
    assert max(e["R@1"] for e in epochs) > before["R@1"]
    with open(tmp_path / "run" / LOG) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and "loss_contrast" in rows[0] and "R@5" in rows[0]
    assert (tmp_path / "run" / PLOT).stat().st_size > 1000
    best = torch.load(tmp_path / "run" / BEST, weights_only=True)
    assert set(best) == {"model_state_dict"} and all(key.startswith("module.") for key in best["model_state_dict"])
    last = torch.load(tmp_path / "run" / LAST, weights_only=True)
    assert set(last) >= {"model_state_dict", "optimizer_state_dict", "epoch_num", "recalls"}


def test_an_interrupted_run_resumes_to_the_same_weights(synthetic, tmp_path, monkeypatch):
    straight = train(tiny_config(tmp_path / "straight", epochs=2), synthetic["places"])
    config = tiny_config(tmp_path / "resumed", epochs=2)
    original_forward = FoLModel.forward_train
    calls = {"steps": 0}

    def interrupt_in_epoch_two(self, images):
        calls["steps"] += 1
        if calls["steps"] > 4:  # 3 steps per epoch: stop during the second
            raise KeyboardInterrupt
        return original_forward(self, images)

    monkeypatch.setattr(FoLModel, "forward_train", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(config, synthetic["places"])
    monkeypatch.setattr(FoLModel, "forward_train", original_forward)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, synthetic["places"])
    resumed = train(config, synthetic["places"], resume=True)
    assert [e["loss_total"] for e in resumed["epochs"]] == [e["loss_total"] for e in straight["epochs"]]
    a = torch.load(tmp_path / "straight" / LAST, weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "resumed" / LAST, weights_only=True)["model_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_trained_checkpoint_loads_through_the_hub(synthetic, tmp_path):
    """ViT-B (the hub's fol_vitb14), one step on two places, loaded back with weights=."""
    config = tiny_config(tmp_path / "vitb", backbone="vitb", num_trainable_blocks=1, places_per_batch=2, epochs=1)
    train(config, synthetic["places"][:2])
    model = torch.hub.load(str(REPO_ROOT), "fol_vitb14", source="local", pretrained=False, weights=str(tmp_path / "vitb" / BEST))
    saved = torch.load(tmp_path / "vitb" / BEST, weights_only=True)["model_state_dict"]
    assert all(torch.equal(value, saved[f"module.{key}"]) for key, value in model.state_dict().items())


def test_dinov2_checkpoint_initialises_the_vit(tmp_path):
    torch.manual_seed(1)
    source = FoLModel(TINY_VIT)
    dinov2 = {key.removeprefix("backbone.model."): value for key, value in source.state_dict().items()
              if key.startswith("backbone.model.")}
    torch.save(dinov2, tmp_path / "dinov2_tiny.pth")
    torch.manual_seed(2)
    target = FoLModel(TINY_VIT)
    load_dinov2_weights(target, tmp_path / "dinov2_tiny.pth")
    assert all(torch.equal(target.backbone.model.state_dict()[k], v) for k, v in dinov2.items())
    del dinov2["norm.weight"]
    torch.save(dinov2, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\]"):
        load_dinov2_weights(target, tmp_path / "partial.pth")


def test_place_batches_and_gsv_cities_layout(tmp_path, synthetic):
    dataset = PlaceDataset(synthetic["places"][:3], (SIZE, SIZE), seed=3)
    images, labels = collate_places([dataset[0], dataset[2]])
    assert images.shape == (8, 3, SIZE, SIZE) and labels.tolist() == [0] * 4 + [2] * 4
    assert torch.equal(dataset[1][0], dataset[1][0])  # reproducible within an epoch
    # GSV-Cities: Dataframes/<city>.csv rows -> Images/<city>/<name>.jpg, places of 4+ images only.
    (tmp_path / "gsv" / "Dataframes").mkdir(parents=True)
    rows = [dict(place_id=7, year=2019, month=3, northdeg=45, city_id="Oslo", lat=59.91, lon=10.75, panoid=f"p{k}")
            for k in range(4)] + [dict(place_id=8, year=2020, month=11, northdeg=5, city_id="Oslo", lat=59.9, lon=10.7, panoid="x")]
    with open(tmp_path / "gsv" / "Dataframes" / "Oslo.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert gsv_image_name({k: str(v) for k, v in rows[0].items()}) == "Oslo_0000007_2019_03_045_59.91_10.75_p0.jpg"
    with pytest.raises(FileNotFoundError, match="Oslo_0000007_2019_03_045_59.91_10.75_p0.jpg"):
        gsv_cities_places(tmp_path / "gsv", ["Oslo"])
    (tmp_path / "gsv" / "Images" / "Oslo").mkdir(parents=True)
    for k in range(4):
        (tmp_path / "gsv" / "Images" / "Oslo" / gsv_image_name({kk: str(v) for kk, v in rows[k].items()})).write_bytes(b"")
    places = gsv_cities_places(tmp_path / "gsv", ["Oslo"])
    assert len(places) == 1 and len(places[0]) == 4
    with pytest.raises(FileNotFoundError, match="cities in .*: \\['Oslo'\\]"):
        gsv_cities_places(tmp_path / "gsv", ["Paris"])


def linked_places(folder: Path, places: list[Path]) -> Path:
    """A --data_root of links to ``places`` (place folders)."""
    folder.mkdir()
    for place in places:
        (folder / place.name).symlink_to(place)
    return folder


@pytest.fixture(scope="module")
def four_places(synthetic, tmp_path_factory) -> Path:
    """A --data_root of 4 of the synthetic places: one batch of --places_per_batch 4 per epoch."""
    return linked_places(tmp_path_factory.mktemp("four") / "train", sorted((synthetic["root"] / "train").iterdir())[:4])


@pytest.fixture
def tiny_cli_model(monkeypatch) -> None:
    """``fol-vpr train`` builds the tiny ViT, whatever ``--backbone`` says."""
    monkeypatch.setattr(checkpoint, "FoLModel", lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs))


def train_arguments(data_root: Path, output_dir: Path, *extra: str) -> list[str]:
    """``fol-vpr train`` for one epoch on the places under ``data_root``, then ``extra`` (a later
    flag replaces an earlier one)."""
    return ["train", "--dataset", "folders", "--data_root", str(data_root), "--weights", "none",
            "--num_trainable_blocks", "2", "--image_size", str(SIZE), str(SIZE), "--places_per_batch", "4",
            "--epochs", "1", "--no_augment", "--num_workers", "0", "--output_dir", str(output_dir), *extra]


def last_error(caplog) -> str:
    """The last ERROR line the command logged."""
    return [record.getMessage() for record in caplog.records if record.levelname == "ERROR"][-1]


def test_train_command(synthetic, tmp_path, tiny_cli_model, capsys):
    arguments = train_arguments(synthetic["root"] / "train", tmp_path / "cli")
    assert cli.main(arguments) == 0
    assert "1 epochs; best checkpoint" in capsys.readouterr().out
    assert cli.main(arguments) == 2  # an existing run needs --resume
    assert cli.main(arguments[:-2] + ["--image_size", "120", "120", "--output_dir", str(tmp_path / "other")]) == 2


def test_resume_refuses_settings_that_change_the_run(synthetic, four_places, tmp_path, tiny_cli_model, caplog):
    """Issue 20, 5: another --lr, --image_size, --num_trainable_blocks or other places than the
    run's is refused with each difference (exit 2, last.pth untouched); --epochs, --patience and
    --device may change."""
    data, run = four_places, tmp_path / "run"
    assert cli.main(train_arguments(data, run)) == 0
    before = (run / LAST).read_bytes()
    changed = ["--resume", "--epochs", "2", "--lr", "1e-3", "--image_size", "140", "140", "--num_trainable_blocks", "1"]
    assert cli.main(train_arguments(data, run, *changed)) == 2
    assert last_error(caplog) == (
        f"--resume: these settings differ from the run in {run / LAST}: --num_trainable_blocks 2 -> 1, "
        "--image_size 126 126 -> 140 140, --lr 6e-05 -> 0.001; rerun with the run's settings, or start a new run in "
        "another --output_dir"
    )
    others = linked_places(tmp_path / "others", sorted((synthetic["root"] / "train").iterdir())[4:8])
    assert cli.main(train_arguments(others, run, "--resume", "--epochs", "2")) == 2
    message = last_error(caplog)
    assert f"the training places (--dataset, --data_root, --cities) 4 places, 16 images under {data} " in message
    assert f"-> 4 places, 16 images under {others} " in message
    assert (run / LAST).read_bytes() == before
    assert cli.main(train_arguments(data, run, "--resume", "--epochs", "2", "--patience", "3", "--device", "cpu")) == 0
    assert torch.load(run / LAST, weights_only=True)["epoch_num"] == 1


def test_a_full_disk_is_found_before_writing_and_leaves_the_run_intact(
    four_places, tmp_path, tiny_cli_model, monkeypatch, caplog
):
    """Issue 20, 6: the disk is checked before the first epoch and before each epoch's writes;
    a disk that fills up anyway leaves no temporary file; each is one line, exit 2, with the
    last saved epoch kept."""
    data, run = four_places, tmp_path / "run"
    assert cli.main(train_arguments(data, run)) == 0
    earlier = {name: (run / name).read_bytes() for name in (LAST, BEST)}
    resume = train_arguments(data, run, "--resume", "--epochs", "2")
    advice = "rerun with --resume to continue after epoch 1, the last one saved"
    monkeypatch.setattr(files, "free_bytes", lambda folder: 1000)
    assert cli.main(resume) == 2  # before the epoch
    assert last_error(caplog) == f"disk full at {run}; free 0.1 GB and {advice}"
    answers = iter([10**12, 1000])  # room at the start, none after the epoch
    monkeypatch.setattr(files, "free_bytes", lambda folder: next(answers))
    assert cli.main(resume) == 2 and next(answers, None) is None  # asked again after the epoch
    assert last_error(caplog) == f"disk full at {run}; free 0.1 GB and {advice}"
    monkeypatch.setattr(files, "free_bytes", lambda folder: 10**12)

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"x" * 100_000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    assert cli.main(resume) == 2  # the estimate passed, the disk filled up anyway
    written = rf"disk full at {re.escape(str(run))}/(best|last)\.pth; free 0\.1 GB and {advice}"
    assert re.fullmatch(written, last_error(caplog))
    assert not list(run.glob("*.tmp"))
    assert {name: (run / name).read_bytes() for name in (LAST, BEST)} == earlier


def test_a_new_run_refuses_a_folder_with_an_earlier_runs_files(
    synthetic, four_places, tmp_path, tiny_cli_model, caplog
):
    """Issue 20, 7: without last.pth (deleted as a truncated one), the earlier run's best.pth and
    losses are still refused, not overwritten, unless --overwrite; any checkpoint counts."""
    data, run = four_places, tmp_path / "run"
    assert cli.main(train_arguments(data, run)) == 0
    (run / LAST).unlink()
    earlier = {name: (run / name).read_bytes() for name in (BEST, LOG, PLOT)}
    assert cli.main(train_arguments(data, run)) == 2
    assert last_error(caplog) == (
        f"{run} holds an earlier run's files (best.pth, losses.csv, losses.png): pass --overwrite to start a new run "
        "there (it removes last.pth, best.pth, losses.csv, losses.png first), or choose another --output_dir"
    )
    assert {name: (run / name).read_bytes() for name in earlier} == earlier
    other = tmp_path / "other"
    other.mkdir()
    (other / "epoch_3.pth").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"\(epoch_3\.pth\)"):
        train(tiny_config(other), synthetic["places"])
    assert cli.main(train_arguments(data, run, "--overwrite", "--resume")) == 2
    assert "not both" in last_error(caplog)
    assert cli.main(train_arguments(data, run, "--overwrite")) == 0
    assert torch.load(run / LAST, weights_only=True)["epoch_num"] == 0


def test_the_resume_log_names_the_last_finished_epoch(synthetic, tmp_path, caplog):
    """Issue 20, 12: after one finished epoch the run resumes after epoch 1, with epoch 2 next,
    as the epoch log lines count."""
    config, places = tiny_config(tmp_path / "run", epochs=1), synthetic["places"][:4]
    train(config, places)
    caplog.set_level("INFO")
    train(dataclasses.replace(config, epochs=2), places, resume=True)
    assert f"Resuming {tmp_path / 'run'} after epoch 1: epoch 2 of 2 next" in caplog.messages
    assert any(message.startswith("Epoch 2/2: ") for message in caplog.messages)
    train(dataclasses.replace(config, epochs=2), places, resume=True)
    assert caplog.messages[-1] == (
        f"Resuming {tmp_path / 'run'} after epoch 2: all 2 epochs are done; give a larger --epochs to train on"
    )


def test_more_places_per_batch_than_places_is_an_error(synthetic, tmp_path):
    with pytest.raises(ValueError, match="--places_per_batch 13 exceeds the 12 places found: give at most 12"):
        train(tiny_config(tmp_path / "run", places_per_batch=13), synthetic["places"])


def test_a_last_partial_accumulation_group_is_the_mean_of_its_own_batches(synthetic, tmp_path, monkeypatch, caplog):
    """3 batches, accumulation 2: with plain SGD (lr 1) and a loss whose gradient is 1 for every
    trainable weight, each of the two updates moves every weight by exactly -1."""
    assert accumulation_divisors(5, 2) == [2, 2, 2, 2, 1] and accumulation_divisors(4, 4) == [4] * 4
    monkeypatch.setattr(loop.torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    trained: list[torch.nn.Parameter] = []

    def unit_gradient_loss(outputs, labels, weights, generator):
        return {"total": sum(p.sum() for p in trained) + 0 * outputs.global_descriptors.sum()}

    original_trainable = loop.trainable_parameters

    def remember(model):
        trained[:] = original_trainable(model)
        return trained

    monkeypatch.setattr(loop, "fol_loss", unit_gradient_loss)
    monkeypatch.setattr(loop, "trainable_parameters", remember)
    config = tiny_config(tmp_path / "run", epochs=1, places_per_batch=4, accumulation_steps=2, lr=1.0, lr_end_factor=1.0)
    torch.manual_seed(config.seed)
    before = [p.detach().clone() for p in original_trainable(FoLModel(TINY_VIT, num_trainable_blocks=2))]
    caplog.set_level("INFO")
    rows = train(config, synthetic["places"])["epochs"]
    assert all(torch.allclose(after, start - 2.0, atol=1e-5) for after, start in zip(trained, before))
    summary = next(r.message for r in caplog.records if r.message.startswith("Training"))
    assert "12 places, 48 images" in summary and "3 batches an epoch" in summary
    assert "accumulation 2: 2 optimiser steps an epoch of 32 or 16 images each" in summary  # the last group is partial
    epoch_line = next(r.message for r in caplog.records if r.message.startswith("Epoch 1/1:"))
    assert f"loss total {rows[0]['loss_total']:.4g}" in epoch_line  # rounded in the log; every digit in losses.csv


def test_validation_reranks_and_keeps_the_best_reranked_recall(synthetic, tmp_path):
    torch.manual_seed(0)
    model = FoLModel(TINY_VIT, num_trainable_blocks=2)
    extraction = ExtractionConfig((SIZE, SIZE), num_workers=0)
    recalls = validation_recalls(model, *synthetic["validation"], extraction, rerank_topk=10)
    assert set(recalls) == {"R@1", "R@5", "R@10", "reranked_R@1", "reranked_R@5", "reranked_R@10"}
    assert recalls == validation_recalls(model, *synthetic["validation"], extraction, rerank_topk=10)
    assert set(validation_recalls(model, *synthetic["validation"], extraction)) == {"R@1", "R@5", "R@10"}


def test_early_stopping_after_patience_epochs_without_a_better_reranked_recall(synthetic, tmp_path, monkeypatch, caplog):
    scores = iter([40.0, 50.0, 45.0, 50.0, 30.0, 60.0])  # best at epoch 2, then 3 epochs without gain
    saved_after = []

    def scripted(model, database, queries, extraction, rerank_topk):
        assert rerank_topk == 100 and extraction.image_size == (SIZE + 14, SIZE + 14)
        value = next(scores)
        return {"R@5": 100.0 - value, "reranked_R@5": value}

    monkeypatch.setattr(loop, "validation_recalls", scripted)
    monkeypatch.setattr(loop, "save_weights", lambda model, path, advice: saved_after.append(len(rows_seen)))
    rows_seen: list = []
    monkeypatch.setattr(loop, "write_log", lambda output_dir, rows, advice: rows_seen.append(len(rows)))
    config = tiny_config(
        tmp_path / "run", epochs=6, patience=3, validation=synthetic["validation"], validation_image_size=(SIZE + 14, SIZE + 14)
    )
    caplog.set_level("INFO")
    summary = train(config, synthetic["places"])
    assert len(summary["epochs"]) == 5  # epochs 3, 4, 5 brought nothing: stop after epoch 5
    assert saved_after == [0, 1]  # best.pth written after epochs 1 and 2 only (by the re-ranked R@5)
    assert "Stopping early: reranked_R@5 has not improved for 3 epochs (--patience 3)" in caplog.text


def test_the_paper_recipe_reads_places_as_the_original(synthetic, tmp_path):
    """The first (most recent) K images every epoch, one place order with the last batch kept,
    no augmentation, no normalisation, an antialiased resize; "improved" changes exactly those."""
    config = TrainConfig(output_dir=tmp_path)
    assert (config.augment, config.normalize_images, config.random_images, config.shuffle_each_epoch) == (False,) * 4
    assert config.resize_mode == "bilinear_antialias" and config.backbone == "vitl"
    assert set(train_config.RECIPES["improved"]) == {"augment", "normalize_images", "random_images", "shuffle_each_epoch", "resize_mode"}
    places = [sorted(folder.iterdir()) for folder in sorted((synthetic["root"] / "train").iterdir())]
    paper = PlaceDataset(places[:2], (SIZE, SIZE), seed=0)
    improved = PlaceDataset(places[:2], (SIZE, SIZE), resize_mode="original", normalize_images=True, random_images=True, seed=0)
    for epoch in range(3):
        paper.set_epoch(epoch), improved.set_epoch(epoch)
        assert paper.chosen(1) == places[1][:4]
    draws = set()
    for epoch in range(6):  # the improved recipe draws other images (here: another order) each epoch
        improved.set_epoch(epoch)
        draws.add(tuple(improved.chosen(0)))
    assert len(draws) > 1
    # One place order every epoch, in consecutive batches, the last (smaller) batch kept.
    assert sharding.place_batches(10, 4, SINGLE_PROCESS, None, False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = sharding.place_batches(10, 4, SINGLE_PROCESS, 7, True)
    assert [len(batch) for batch in shuffled] == [4, 4] and shuffled != [[0, 1, 2, 3], [4, 5, 6, 7]]  # improved
    images, _ = paper[0]
    raw = torch.cat([load_image(path)[None] for path in places[0][:4]])
    expected = torch.nn.functional.interpolate(raw, (SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(images, expected)  # in [0, 1]: neither augmented nor normalised
    assert images.min() >= 0 and images.max() <= 1 and improved[0][0].min() < 0


def test_gsv_cities_places_are_most_recent_first_and_shuffled_once_per_city(tmp_path):
    rows = []
    for city, prefix in (("Oslo", 1), ("Rome", 2)):
        for place in range(5):
            for k, (year, month) in enumerate([(2015, 1), (2021, 6), (2018, 3), (2021, 2), (2012, 9)]):
                rows.append(dict(place_id=prefix * 100 + place, year=year, month=month, northdeg=0, city_id=city,
                                 lat=1.0 + k, lon=2.0, panoid=f"{city}{place}{k}"))
    (tmp_path / "Dataframes").mkdir()
    for city in ("Oslo", "Rome"):
        with open(tmp_path / "Dataframes" / f"{city}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(r for r in rows if r["city_id"] == city)
        (tmp_path / "Images" / city).mkdir(parents=True)
    for row in rows:
        (tmp_path / "Images" / row["city_id"] / gsv_image_name({k: str(v) for k, v in row.items()})).write_bytes(b"")
    places = gsv_cities_places(tmp_path, ["Oslo", "Rome"], seed=0)
    assert [p.name.split("_")[0] for p in (place[0] for place in places)] == ["Oslo"] * 5 + ["Rome"] * 5
    years_months = [tuple(int(v) for v in p.name.split("_")[2:4]) for p in places[0]]
    assert years_months == [(2021, 6), (2021, 2), (2018, 3), (2015, 1), (2012, 9)]
    order = [int(place[0].name.split("_")[1]) for place in places]
    assert sorted(order[:5]) == [100, 101, 102, 103, 104] and order == [int(p[0].name.split("_")[1]) for p in gsv_cities_places(tmp_path, ["Oslo", "Rome"], seed=0)]
    assert order != [int(p[0].name.split("_")[1]) for p in gsv_cities_places(tmp_path, ["Oslo", "Rome"], seed=1)]


def test_two_processes_train_as_one_on_the_same_global_batch_and_resume(synthetic, tmp_path):
    """torchrun (gloo, 2 processes of 2 places each) against one process on the same 4 places:
    the first step's loss and gradients agree; then the run resumes for a second epoch."""
    script = str(REPO_ROOT / "tests" / "tiny_train.py")
    args = [
        "train", "--dataset", "folders", "--data_root", str(synthetic["root"] / "train"), "--backbone", "vitb",
        "--weights", "none", "--num_trainable_blocks", "2", "--image_size", str(SIZE), str(SIZE),
        "--places_per_batch", "4", "--epochs", "1", "--num_workers", "0",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    records = {}
    for name, launcher in (("one", [sys.executable]), ("two", torchrun)):
        records[name] = tmp_path / f"{name}.pt"
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "FOL_TEST_RECORD": str(records[name])}
        result = subprocess.run(
            [*launcher, script, *args, "--output_dir", str(tmp_path / name)], env=environment, capture_output=True,
            text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr
    one, two = (torch.load(records[name], weights_only=True) for name in ("one", "two"))
    assert two["losses"][0] == pytest.approx(one["losses"][0], abs=1e-5)
    assert len(one["grads"]) == len(two["grads"]) and any(g.abs().sum() > 0 for g in one["grads"])
    for a, b in zip(one["grads"], two["grads"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "FOL_TEST_RECORD": str(tmp_path / "resumed.pt")}
    resumed = subprocess.run(
        [*torchrun, script, *args[:-4], "--epochs", "2", "--num_workers", "0", "--resume", "--output_dir", str(tmp_path / "two")],
        env=environment, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(tmp_path / "two" / LAST, weights_only=True)["epoch_num"] == 1
    with open(tmp_path / "two" / LOG) as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2]


def test_a_global_batch_splits_evenly_between_processes():
    shares = [sharding.place_batches(10, 4, Processes(rank, 2), None, False) for rank in range(2)]
    assert shares == [[[0, 1], [4, 5], [8]], [[2, 3], [6, 7], [9]]]  # the last batch of 2 kept, split 1 + 1
    with pytest.raises(ValueError, match="--places_per_batch 5 must be a multiple of the 2 processes"):
        sharding.place_batches(10, 5, Processes(0, 2), None, False)


def test_training_images_over_the_pixel_limit_are_refused(four_places, tmp_path, tiny_cli_model, caplog):
    """--max_image_pixels reaches the training images (checked from their headers)."""
    assert cli.main(train_arguments(four_places, tmp_path / "run", "--max_image_pixels", "100")) == cli.USER_ERROR_EXIT
    assert re.search(r"image .* is \d+x\d+ \([\d,]+ pixels\), more than --max_image_pixels 100", last_error(caplog))


def test_the_log_says_the_real_batch_and_rounded_numbers(four_places, tmp_path, tiny_cli_model, caplog):
    """Four places in batches of 4 with --accumulation_steps 4: one batch an epoch, so each
    optimiser step averages 16 images, not 64; epoch lines carry rounded numbers once each."""
    caplog.set_level(logging.INFO)
    assert cli.main(train_arguments(four_places, tmp_path / "run", "--accumulation_steps", "4")) == 0
    messages = [record.getMessage() for record in caplog.records]
    summary = next(message for message in messages if message.startswith("Training "))
    assert "batches of 4 places x 4 images (16), 1 batch an epoch, accumulation 4: 1 optimiser step an epoch of 16 images each" in summary
    epoch = next(message for message in messages if message.startswith("Epoch 1/1:"))
    assert re.fullmatch(r"Epoch 1/1: 1 batch, lr [\d.]+e-05, loss total \d\.\d{3} \(global_ms [\d.e-]+, .*\)", epoch), epoch
    assert epoch.count("epoch") == 0 and len(epoch) < 200


def test_losses_are_plotted_one_panel_each():
    rows = [{"epoch": e, "steps": 2, "lr": 6e-5, "loss_total": 2.0 / e, "loss_alignment": 8e-8 * e} for e in (1, 2, 3)]
    figure = plot_losses(rows)
    panels = [axis for axis in figure.axes if axis.get_visible() and axis.get_title()]
    assert [axis.get_title() for axis in panels] == ["total", "alignment"]
    assert [axis.get_legend() for axis in panels] == [None, None]
    low, high = panels[1].get_ylim()
    assert low < 8e-8 and 2.4e-7 < high < 1e-6  # its own scale, not squashed on the total's


def test_a_corrupt_last_checkpoint_says_how_to_start_over(four_places, tmp_path, tiny_cli_model, caplog):
    """fol-vpr train wrote last.pth: the fix for a damaged one is --overwrite, not a download."""
    data, run = four_places, tmp_path / "run"
    assert cli.main(train_arguments(data, run)) == 0
    (run / LAST).write_bytes((run / LAST).read_bytes()[:1000])
    assert cli.main(train_arguments(data, run, "--resume", "--epochs", "2")) == 2
    message = last_error(caplog)
    assert f"{run / LAST} is not a readable PyTorch checkpoint" in message
    assert "fol-vpr train wrote it, so it cannot be downloaded again: rerun with --overwrite instead of --resume" in message
    assert "download it again" not in message.replace("cannot be downloaded again", "")
    assert cli.main(train_arguments(data, run, "--overwrite", "--epochs", "1")) == 0
