"""``--plan``: projected disk, RAM and time per stage, calibrated on the run's own images, before any work."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from fol_plugin import checkpoint, cli
from fol_plugin.evaluation.plan import Costs, feedable_processes, project
from fol_plugin.evaluation.resources import project_resources
from fol_plugin.models import FoLModel

from .conftest import TINY_VIT, config_for

COSTS = Costs(image=0.5, pair=0.01, distance=1e-9, model_bytes=10**8)


def test_projected_time_is_the_measured_costs_times_the_sizes_over_the_processes(labelled_set, tiny_weights, tmp_path):
    config = config_for(labelled_set, tmp_path / "out", tiny_weights, rerank_topk=100)
    config.extraction = dataclasses.replace(config.extraction, device="cuda")  # a GPU per process
    one = project(config, COSTS, 2_800_000, 2_000, 1)
    eight = project(config, COSTS, 2_800_000, 2_000, 8)
    assert one["seconds"]["database global"] == pytest.approx(2_800_000 * 0.5)
    assert one["seconds"]["global search"] == pytest.approx(2_000 * 2_800_000 * 1e-9)
    assert one["seconds"]["candidates' local features (at most)"] == pytest.approx(200_000 * 0.5)
    assert one["seconds"]["re-ranking"] == pytest.approx(200_000 * 0.01)
    assert eight["total_seconds"] == pytest.approx(one["total_seconds"] / 8)
    assert one["disk_bytes"] == project_resources(config, 2_800_000, 2_000, 200_000)["disk"]
    assert one["ram_bytes_per_process"] > COSTS.model_bytes
    # When the candidates may cover the database, the database pass extracts the local features.
    small = project(config, COSTS, 1_000, 2_000, 1)
    assert small["seconds"]["candidates' local features (at most)"] == 0


def test_cpu_processes_are_projected_as_many_as_the_cores_can_feed(labelled_set, tiny_weights, tmp_path, monkeypatch):
    """The calibration used torch's threads: on the CPU, processes beyond cores / threads share cores."""
    cores = len(os.sched_getaffinity(0))
    config = config_for(labelled_set, tmp_path / "out", tiny_weights, rerank_topk=100)
    assert config.extraction.device == "cpu"
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores)
    one, eight = (project(config, COSTS, 2_800_000, 2_000, processes) for processes in (1, 8))
    assert eight["feedable_processes"] == 1 and eight["total_seconds"] == pytest.approx(one["total_seconds"])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert feedable_processes("cpu", 8) == min(8, cores)
    assert feedable_processes("cuda:0", 8) == 8


def test_float16_database_descriptors_halve_their_projected_disk(labelled_set, tiny_weights, tmp_path):
    sizes = {}
    for dtype in ("float32", "float16"):
        config = config_for(labelled_set, tmp_path / "out", tiny_weights, rerank_topk=0, global_dtype=dtype)
        sizes[dtype] = project_resources(config, 2_800_000, 0, 0)["disk"]
    assert sizes["float32"] == 2 * sizes["float16"] == 2_800_000 * 8448 * 4


def test_plan_prints_the_projection_and_writes_nothing(labelled_set, tiny_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "FoLModel", lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs))
    output = tmp_path / "out"
    code = cli.main(
        [
            "eval",
            "--database_folder",
            str(labelled_set / "database"),
            "--queries_folder",
            str(labelled_set / "queries"),
            "--backbone",
            "vitb",
            "--weights",
            str(tiny_weights),
            "--image_size",
            "126",
            "126",
            "--num_workers",
            "0",
            "--output_dir",
            str(output),
            "--plan",
            "8",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "Plan for 17 database images, 5 queries, 8 process(es) on cpu" in printed
    assert "measured here:" in printed and "images/s" in printed and "ms per FoL score" in printed
    assert " screen products, CPU: " in printed  # the product the run re-ranks with, and the host's kind
    for stage in ("database global", "global search", "re-ranking", "total", "RAM per process"):
        assert stage in printed
    assert not output.exists()
