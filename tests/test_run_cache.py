"""The run cache (``fol_plugin.cache.run_cache``): one run per output folder, and a rerun that
resumes, starts afresh or refuses by the fingerprint of its inputs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fol_plugin.cache import CacheMismatchError, RunCache, RunLockedError
from fol_plugin.checkpoint import CheckpointError
from fol_plugin.evaluation import run_eval
from fol_plugin.features import ExtractionConfig
from fol_plugin.models import FoLModel

from .conftest import IMAGE_SIZE, REPO_ROOT, TINY_VIT, cli_run, config_for, kept_run, same_outputs, tiny_eval_args


def test_a_second_run_on_the_same_output_folder_is_refused(labelled_set, tiny_weights, tmp_path, tiny_cli, caplog):
    output = tmp_path / "shared"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from fol_plugin.cache import RunCache
            with RunCache({str(output)!r}):
                print("locked", flush=True)
                sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"--output_dir {output} is in use by another process \(process {holder.pid} on"):
            run_eval(config_for(labelled_set, output, tiny_weights))
        assert cli_run(*tiny_eval_args(labelled_set, output, tiny_weights)) == 2
        assert f"process {holder.pid}" in caplog.text
        assert not (output / "cache" / "run.json").exists()  # the refused run wrote nothing
    finally:
        holder.communicate("done\n", timeout=30)
    run_eval(config_for(labelled_set, output, tiny_weights))  # free again once the other run ends


def test_new_weights_at_the_same_path_invalidate_the_cache(labelled_set, tiny_weights, tmp_path):
    weights = tmp_path / "weights.pth"
    shutil.copyfile(tiny_weights, weights)
    kept_run(labelled_set, weights, tmp_path / "run")
    torch.manual_seed(1)
    torch.save({"model_state_dict": FoLModel(TINY_VIT).state_dict()}, weights)
    with pytest.raises(CacheMismatchError, match=r"holds .* MB of results of another configuration \(differs in weights:.*"
                       r"To reuse them, rerun the command that made them: .*to discard them, `rm -rf .*cache`"):
        run_eval(config_for(labelled_set, tmp_path / "run", weights))


def test_a_replaced_image_invalidates_the_cache(labelled_set, tiny_weights, tmp_path, monkeypatch):
    """Another command on changed images is refused; the cache is the user's to discard."""
    root = tmp_path / "data"
    shutil.copytree(labelled_set, root)
    kept_run(root, tiny_weights, tmp_path / "run")
    images = sorted((root / "database").iterdir())
    shutil.copyfile(images[1], images[3])  # same name, another photo
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--another-command"])
    with pytest.raises(CacheMismatchError, match=r"differs in database\.listing"):
        run_eval(config_for(root, tmp_path / "run", tiny_weights))


def test_the_same_command_after_fixing_an_image_starts_afresh_with_a_warning(labelled_set, tiny_weights, tmp_path, caplog):
    """Issue 29, 10: a run fails on an undecodable image; the user removes it and reruns the same
    command: the cached rows are of the earlier images, so they go (said aloud) and the run finishes."""
    root = tmp_path / "data"
    shutil.copytree(labelled_set, root)
    bad = root / "database" / "@0000100.00@0000000.00@17@T@zz_bad@.jpg"
    bad.write_bytes(b"not an image")
    one_at_a_time = ExtractionConfig(image_size=IMAGE_SIZE, batch_size=1, num_workers=0)
    with pytest.raises(ValueError, match="cannot decode image"):
        run_eval(config_for(root, tmp_path / "run", tiny_weights, extraction=one_at_a_time))
    assert list((tmp_path / "run" / "cache").rglob("*.commits"))  # the failed run cached some work
    bad.unlink()
    caplog.set_level("WARNING")
    summary = run_eval(config_for(root, tmp_path / "run", tiny_weights, extraction=one_at_a_time))
    assert "The images changed since this command last ran" in caplog.text and "database.images: 18 -> 17" in caplog.text
    assert summary["query_sets"]["queries"]["reranked"]["R@1"] is not None


def test_a_run_that_computed_nothing_never_blocks_the_next(labelled_set, tiny_weights, tmp_path, reference_run):
    """The model fails to load after the cache was set up: the fixed command then just runs."""
    wrong = tmp_path / "vitb_shaped.pth"
    torch.save({"model_state_dict": {"aggregator.x": torch.zeros(1)}}, wrong)
    with pytest.raises(CheckpointError):
        run_eval(config_for(labelled_set, tmp_path / "run", wrong))
    assert (tmp_path / "run" / "cache" / "run.json").exists()
    run_eval(config_for(labelled_set, tmp_path / "run", tiny_weights, keep_cache=False))
    assert same_outputs(tmp_path / "run", reference_run)


def test_the_run_cache_decides_between_resuming_starting_afresh_and_refusing(tmp_path):
    fingerprint = {"weights": "a", "image_size": [126, 126]}
    with RunCache(tmp_path) as cache:
        cache.check(fingerprint)
        (cache.folder / "part.commits").write_bytes(b"\x01" * 16)  # finished work
        cache.check(fingerprint)  # the same run: resume
        with pytest.raises(CacheMismatchError, match=r'differs in image_size: \[126, 126\] -> \[224, 224\]'):
            cache.check({**fingerprint, "image_size": [224, 224]})
        (cache.folder / "run.json").unlink()
        with pytest.raises(CacheMismatchError, match="run.json is missing, so the .* MB of results"):
            cache.check(fingerprint)
        (cache.folder / "part.commits").write_bytes(b"")  # no finished work: anything goes
        cache.check({**fingerprint, "image_size": [224, 224]})
        assert json.loads((cache.folder / "run.json").read_text())["fingerprint"]["image_size"] == [224, 224]
        assert not (cache.folder / "part.commits").exists()
