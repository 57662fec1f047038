"""``fol-vpr`` as a user runs it (a subprocess, the tiny ViT): what bad input and faults look like
on the command line, and the exit codes."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fol_plugin import checkpoint, cli
from fol_plugin import config as config_module
from fol_plugin.flags import FLAG
from fol_plugin.cache.run_cache import LOCK_FILE
from fol_plugin.cli import USER_ERROR_EXIT
from fol_plugin.data import load_image, preprocess
from fol_plugin.data.datasets import list_images
from fol_plugin.data.images import network_size
from fol_plugin.evaluation.config import load_sets
from fol_plugin.options import default_num_workers

from .conftest import (
    DATA,
    TINY_VIT,
    cli_run,
    config_for,
    require,
    tiny_cli_args,
    tiny_eval_args,
    user_error,
    write_blank_png,
)

RUN_TIMEOUT_S = 300
# The address space a run may take in the tests that could exhaust memory on a regression: a
# ViT run with two DataLoader workers fits in it, decoding a 20000 x 20000 image does not.
MEMORY_LIMIT_BYTES = 3 * 2**30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def run_cli(args: list[str], limit_memory: bool = False, **environment: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **environment}
    return subprocess.run(
        [sys.executable, *args], env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        preexec_fn=_limit_memory if limit_memory else None,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if " ERROR " in line]


def test_image_bomb_is_refused_from_its_header(labelled_set, tiny_weights, tmp_path):
    """A 1.7 MB PNG declaring 20000 x 20000 pixels among the queries: refused with one line naming
    the file, its size and the flag, under a memory limit that decoding it would exceed, with
    DataLoader workers as by default."""
    root = tmp_path / "set"
    shutil.copytree(labelled_set, root)
    bomb = write_blank_png(root / "queries" / "@1.00@2.00@17@T@bomb@.png", 20000, 20000)
    result = run_cli(tiny_cli_args(root, tmp_path / "run", tiny_weights, "--num_workers", "2"), limit_memory=True)
    assert result.returncode == USER_ERROR_EXIT, result.stderr[-3000:]
    [line] = error_lines(result)
    assert line.split(" ERROR ")[1].startswith(
        f"image {bomb} is 20000x20000 (400,000,000 pixels), more than --max_image_pixels 134,217,728: resize it"
    )
    assert "Traceback" not in result.stderr
    admitted = run_cli(
        tiny_cli_args(root, tmp_path / "run2", tiny_weights, "--max_image_pixels", str(20000 * 20000 - 1)),
        limit_memory=True,
    )
    assert "more than --max_image_pixels 399,999,999" in admitted.stderr


def test_max_image_pixels_is_in_every_commands_help():
    for command in ("eval", "rerank", "benchmark", "train", "visualize", "report"):
        result = run_cli(["-m", "fol_plugin", command, "--help"])
        assert "--max_image_pixels PIXELS" in result.stdout and "134217728" in result.stdout, command


def test_visualize_refuses_an_image_bomb(tmp_path, tiny_weights):
    bomb = write_blank_png(tmp_path / "bomb.png", 20000, 20000)
    small = write_blank_png(tmp_path / "small.png", 140, 140)
    args = [str(Path(__file__).parent / "tiny_fol_vpr.py"), "visualize", "--query", str(small), "--database", str(bomb),
            "--backbone", "vitb", "--weights", str(tiny_weights), "--image_size", "126", "126",
            "--output", str(tmp_path / "figure.png")]  # fmt: skip
    result = run_cli(args, limit_memory=True)
    assert result.returncode == USER_ERROR_EXIT
    [line] = error_lines(result)
    assert f"image {bomb} is 20000x20000" in line
    assert not (tmp_path / "figure.png").exists()


def test_runs_leave_nothing_in_the_temporary_folder(labelled_set, tiny_weights, tmp_path):
    """Neither a finished run nor one failing in a DataLoader worker leaves folders behind
    (``pymp-*`` of the workers, ``torchinductor_<user>``)."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = run_cli(tiny_cli_args(labelled_set, tmp_path / "run", tiny_weights, "--num_workers", "2"), TMPDIR=str(temporary))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(path.name for path in temporary.iterdir()) == []
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # the run's lock went with it
    root = tmp_path / "broken"
    shutil.copytree(labelled_set, root)
    (root / "queries" / "@999999.00@2.00@17@T@zz@.jpg").write_text("not an image")  # the last: workers sent batches
    args = tiny_cli_args(root, tmp_path / "run2", tiny_weights, "--num_workers", "2", "--batch_size", "1")
    failed = run_cli(args, TMPDIR=str(temporary))
    assert failed.returncode == USER_ERROR_EXIT and "cannot decode image" in failed.stderr
    assert sorted(path.name for path in temporary.iterdir()) == []


def folder_eval_args(database: Path, queries: Path, weights: Path, *extra: str) -> list[str]:
    return ["eval", "--database_folder", str(database), "--queries_folder", str(queries), "--backbone", "vitb",
            "--weights", str(weights), "--num_workers", "0", "--rerank_topk", "4", *extra]  # fmt: skip


def test_one_image_size_value_resizes_each_image_by_its_shorter_side(tiny_cli, tiny_weights, tmp_path, caplog):
    """``--image_size 126`` as VPR-methods-evaluation takes it, on photos of five aspect ratios in
    batches of 4: each query's descriptor is the model's on that image at its own size."""
    caplog.set_level(logging.INFO)
    toy = require(DATA / "toy_dataset")
    output = tmp_path / "run"
    args = folder_eval_args(toy / "database", toy / "queries", tiny_weights, "--no_labels", "--image_size", "126",
                     "--batch_size", "4", "--save_descriptors", "--output_dir", str(output))  # fmt: skip
    assert cli.main(args) == 0
    assert "--image_size 126: each image's shorter side to 126" in caplog.text
    model = checkpoint.load_model(TINY_VIT, weights=tiny_weights, device="cpu")
    saved = np.load(output / "queries" / "queries_descriptors.npy")
    paths = list_images(toy / "queries")
    sizes = set()
    for path, descriptor in zip(paths, saved):
        image = load_image(path)
        size = network_size((126,), *image.shape[-2:])
        sizes.add(size)
        with torch.inference_mode():
            np.testing.assert_allclose(descriptor, model(preprocess(image, size))[0].numpy(), atol=1e-5, rtol=0)
    assert len(sizes) >= 3


def test_log_dir_names_the_output_folder_as_the_harness(tiny_cli, labelled_set, tiny_weights, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    args = folder_eval_args(labelled_set / "database", labelled_set / "queries", tiny_weights, "--image_size", "126", "126")
    assert cli.main([*args, "--log_dir", "fol"]) == 0
    [folder] = (tmp_path / "logs" / "fol").iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", folder.name) and (folder / "recalls.json").is_file()
    assert cli.main([*args, "--log_dir", "fol", "--output_dir", "x"]) == USER_ERROR_EXIT
    assert "give --output_dir x or --log_dir fol, not both" in caplog.text
    assert cli.main(args) == USER_ERROR_EXIT
    assert "give --output_dir DIR (resumable), or --log_dir NAME" in caplog.text


def test_save_only_wrong_preds_keeps_the_queries_wrong_at_rank_one(tiny_cli, labelled_set, tiny_weights, tmp_path):
    output = tmp_path / "run"
    args = folder_eval_args(labelled_set / "database", labelled_set / "queries", tiny_weights, "--image_size", "126", "126",
                     "--num_preds_to_save", "3", "--save_only_wrong_preds", "--output_dir", str(output))  # fmt: skip
    assert cli.main(args) == 0
    for stage in ("global", "reranked"):
        predictions = np.load(output / "queries" / f"predictions_{stage}.npy")
        positives = config_for(labelled_set, tmp_path / "x", tiny_weights)
        database, query_sets = load_sets(positives)
        wrong = [q for q, row in enumerate(predictions) if row[0] not in query_sets[0].positives[q]]
        assert 0 < len(wrong) < len(predictions)
        assert sorted(path.name for path in (output / "queries" / f"preds_{stage}").glob("*.txt")) == [f"{q:03d}.txt" for q in wrong]
        assert sorted(path.name for path in (output / "queries" / f"preds_{stage}").glob("*.png")) == [f"{q:03d}.png" for q in wrong]


# An unlabelled run without figures, in a fresh process: which heavy libraries did it load?
UNLABELLED_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
import tiny_fol_vpr
from fol_plugin import cli
code = cli.main(sys.argv[2:])
print(code, "sklearn" in sys.modules, "matplotlib" in sys.modules)
"""


def test_scikit_learn_and_matplotlib_load_only_where_used(labelled_set, tiny_weights, tmp_path):
    args = tiny_cli_args(labelled_set, tmp_path / "run", tiny_weights, "--no_labels")[1:]
    result = run_cli(["-c", UNLABELLED_RUN, str(Path(__file__).parent), *args])
    assert result.stdout.split()[-3:] == ["0", "False", "False"], result.stderr[-2000:]
    labelled = run_cli(["-c", UNLABELLED_RUN, str(Path(__file__).parent),
                        *tiny_cli_args(labelled_set, tmp_path / "run2", tiny_weights, "--num_preds_to_save", "1")[1:]])
    assert labelled.stdout.split()[-3:] == ["0", "True", "True"], labelled.stderr[-2000:]


def test_command_line_faults_are_one_line_messages(labelled_set, tiny_weights, tmp_path, tiny_cli, caplog, capsys):
    args = tiny_eval_args(labelled_set, tmp_path / "out", tiny_weights)
    if not torch.cuda.is_available():
        assert "CUDA is not available here; use --device cpu" in user_error(caplog, *args, "--device", "cuda")
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in user_error(caplog, *tiny_eval_args(labelled_set, tmp_path / "file", tiny_weights))
    assert "cannot create --output_dir /proc/fol" in user_error(caplog, *tiny_eval_args(labelled_set, Path("/proc/fol"), tiny_weights))
    (tmp_path / "cache_json" / "cache").mkdir(parents=True)
    (tmp_path / "cache_json" / "cache" / "run.json").write_text("{broken")
    (tmp_path / "cache_json" / "cache" / "a.commits").write_bytes(b"x" * 16)
    message = user_error(caplog, *tiny_eval_args(labelled_set, tmp_path / "cache_json", tiny_weights))
    assert "cache_json/cache/run.json is damaged" in message and "rm -rf" in message
    for bad in (["--image_size", "-14", "224"], ["--num_preds_to_save", "-2"], ["--batch_size", "0"]):
        with pytest.raises(SystemExit) as exit_code:
            cli_run(*args, *bad)
        assert exit_code.value.code == 2 and "must be" in capsys.readouterr().err


@pytest.mark.parametrize(
    "predictions, message",
    [
        (np.full((5, 3), np.nan), r"hold nan at query 0, rank 0: database indices must be whole numbers"),
        (np.full((5, 3), 2.7), r"hold 2.7 at query 0, rank 0"),
        (np.zeros((5, 0), np.int64), r"are \(5, 0\), expected \[5 queries, K >= 1 predictions\]"),
        (np.array([[99, 0, 1]] * 5), r"hold database index 99 at query 0, rank 0, outside \[0, 17\)"),
    ],
)
def test_bad_prediction_files_are_named(labelled_set, tiny_weights, tmp_path, tiny_cli, caplog, predictions, message):
    np.save(tmp_path / "given.npy", predictions)
    line = user_error(
        caplog, "rerank", "--database_folder", str(labelled_set / "database"), "--queries_folder",
        str(labelled_set / "queries"), "--predictions", str(tmp_path / "given.npy"), "--backbone", "vitb",
        "--weights", str(tiny_weights), "--image_size", "126", "126", "--output_dir", str(tmp_path / "out"),
    )
    assert re.search(message, line)


def test_an_unreadable_image_read_in_a_worker_process_is_one_line(labelled_set, tiny_weights, tmp_path, tiny_cli, caplog):
    root = tmp_path / "broken"
    shutil.copytree(labelled_set, root)
    (root / "database" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    args = tiny_eval_args(root, tmp_path / "out", tiny_weights, "--no_labels")
    args[args.index("--num_workers") + 1] = "1"
    line = user_error(caplog, *args)
    assert line.startswith("cannot decode image ") and "zz_broken.jpg" in line and "\n" not in line


def test_every_flag_and_default_of_the_hand_written_parser_is_still_there():
    """The parser is generated from fol_plugin.config's fields: each command still has every flag
    the hand-written one had (``fixtures/cli_flags.json``), with the same default."""
    recorded = json.loads((Path(__file__).parent / "fixtures" / "cli_flags.json").read_text())["flags"]
    subparsers = next(action for action in cli.build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    for command, flags in recorded.items():
        actions = {max(a.option_strings, key=len): a for a in subparsers.choices[command]._actions if a.option_strings}
        for flag, default in flags.items():
            assert flag in actions, (command, flag)
            now = actions[flag].default
            if flag == "--num_workers":
                assert now == default_num_workers(), command
            else:
                assert json.loads(json.dumps(now, default=str)) == default, (command, flag, now, default)


def test_every_flag_is_a_field_of_a_configuration():
    """One source per option: each flag of each command (but --debug) is made from one field of
    fol_plugin.config, which holds its default and help; no field's flag is declared twice."""
    declared = []
    for value in vars(config_module).values():
        if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == config_module.__name__:
            declared += [f"--{f.metadata[FLAG]['flag'] or f.name}" for f in dataclasses.fields(value) if FLAG in f.metadata]
    subparsers = next(action for action in cli.build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    for command, parser in subparsers.choices.items():
        flags = {max(a.option_strings, key=len) for a in parser._actions if a.option_strings} - {"--help", "--debug"}
        assert flags <= set(declared), (command, flags - set(declared))
        assert all(action.help for action in parser._actions if action.option_strings), command  # every flag says what it does


@pytest.mark.parametrize(
    "command, flag, value, message",
    [
        ("eval", "--positive_dist_threshold", "-1", "-1.0 must be a positive finite number"),
        ("eval", "--positive_dist_threshold", "nan", "nan must be a positive finite number"),
        ("eval", "--positive_dist_threshold", "inf", "inf must be a positive finite number"),
        ("train", "--places_per_batch", "0", "0 must be at least 2: the metric loss needs other places as negatives"),
        ("train", "--places_per_batch", "-2", "-2 must be at least 2"),
        ("train", "--images_per_place", "1", "1 must be at least 2: the metric loss needs positives of the same place"),
        ("train", "--accumulation_steps", "0", "0 must be a positive integer"),
        ("train", "--epochs", "-1", "-1 must be a positive integer"),
        ("train", "--lr", "nan", "nan must be a positive finite number"),
        ("train", "--weight_decay", "-0.001", "-0.001 must be 0 or a positive finite number"),
        ("train", "--num_trainable_blocks", "-1", "-1 must be 0 or a positive integer"),
    ],
)
def test_numeric_flags_are_checked_where_they_are_declared(command, flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_code:
        cli.build_parser().parse_args([command, flag, value])
    assert exit_code.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_a_json_output_never_holds_nan(tmp_path):
    from fol_plugin.files import write_json

    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json(tmp_path / "recalls.json", {"R@1": float("nan")})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "planted, refused",
    [("recalls.json", True), ("queries/predictions.csv", True), (".fol-vpr.lock", True), ("cache/database_global.npy", False)],
)
def test_an_output_planted_as_a_link_is_refused_and_its_target_untouched(
    labelled_set, tiny_weights, tmp_path, tiny_cli, caplog, planted, refused
):
    """A run folder someone sent: an output (a result, a cache file, the lock) is a link to a file
    of yours. A cache without a record of finished work is cleared (the link with it), the rest refused."""
    victim = tmp_path / "bashrc"
    victim.write_text("precious")
    output = tmp_path / "out"
    (output / planted).parent.mkdir(parents=True, exist_ok=True)
    (output / planted).symlink_to(victim)
    args = tiny_eval_args(labelled_set, output, tiny_weights)
    if refused:
        message = user_error(caplog, *args)
        assert f"{planted} is a symbolic link (to {victim}); fol-plugin never writes an output through a link" in message
    else:
        assert cli_run(*args) == 0
    assert victim.read_text() == "precious"
