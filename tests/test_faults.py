"""Trustworthy runs: every fault of the fault-injection report (issue 9), one test each, in its
order. Checkpoints never run code; one run per output folder; a damaged cache is found, reported
and recomputed; the cache fingerprint covers weights and images; outputs stay in --output_dir;
symlinked folders are searched; re-ranking works in any grad mode; bad input is one line, exit 2."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fol_plugin
from fol_plugin import checkpoint, cli
from fol_plugin.cache import CacheMismatchError, DiskFullError, RunCache, RunLockedError, checkpoint_digest
from fol_plugin.cache import fingerprint as fingerprint_module
from fol_plugin.checkpoint import CheckpointError, UnsafeCheckpointError, load_model, read_checkpoint
from fol_plugin.data.datasets import list_images
from fol_plugin.evaluation import config as config_module
from fol_plugin.evaluation import run_eval
from fol_plugin.features import LocalFeatureStore, ResumableArray
from fol_plugin.features import store as store_module
from fol_plugin.models import FoLModel
from fol_plugin.rerank import mutual_match_scores, rerank

from .conftest import TINY_VIT, config_for

OUTPUT_FILES = ("predictions_global.npy", "predictions_reranked.npy", "rerank_scores.npy")
REPO_ROOT = Path(__file__).resolve().parents[1]


def same_outputs(run: Path, reference: Path, key: str = "queries") -> bool:
    return all(np.array_equal(np.load(run / key / name), np.load(reference / key / name)) for name in OUTPUT_FILES)


@pytest.fixture(scope="module")
def reference_run(labelled_set, tiny_weights, tmp_path_factory) -> Path:
    """An uninterrupted run of the labelled toy set: what every damaged or resumed run must give."""
    output = tmp_path_factory.mktemp("reference") / "run"
    run_eval(config_for(labelled_set, output, tiny_weights, keep_cache=False))
    return output


class ModelCalls:
    """Counts the images that go through the model (forward and extract)."""

    def __init__(self, monkeypatch) -> None:
        self.images = 0
        for name in ("forward", "extract"):
            method = getattr(FoLModel, name)

            def counting(model, images, method=method):
                self.images += len(images)
                return method(model, images)

            monkeypatch.setattr(FoLModel, name, counting)


def run_cli(*args: str) -> int:
    return cli.main(list(args))


@pytest.fixture
def tiny_cli(monkeypatch):
    """``--backbone vitb`` builds the tiny ViT, so the command line runs fast."""
    monkeypatch.setattr(checkpoint, "FoLModel", lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs))


def eval_args(root: Path, output: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "eval", "--database_folder", str(root / "database"), "--queries_folder", str(root / "queries"),
        "--backbone", "vitb", "--weights", str(weights), "--image_size", "126", "126", "--num_workers", "0",
        "--rerank_topk", "8", "--output_dir", str(output), *extra,
    ]


# 1. A checkpoint can run arbitrary code.


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
    assert run_cli(*eval_args(labelled_set, tmp_path / "out", evil)) == 2
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


# 2. Two runs on one --output_dir.


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
        assert run_cli(*eval_args(labelled_set, output, tiny_weights)) == 2
        assert f"process {holder.pid}" in caplog.text
        assert not (output / "cache" / "run.json").exists()  # the refused run wrote nothing
    finally:
        holder.communicate("done\n", timeout=30)
    run_eval(config_for(labelled_set, output, tiny_weights))  # free again once the other run ends


# 3. A damaged cache is reused without a word.


def kept_run(labelled_set, tiny_weights, output: Path) -> Path:
    run_eval(config_for(labelled_set, output, tiny_weights, keep_cache=True))
    return output / "cache"


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_damaged_global_descriptors_are_found_and_recomputed(
    labelled_set, tiny_weights, reference_run, tmp_path, monkeypatch, caplog, damage
):
    cache = kept_run(labelled_set, tiny_weights, tmp_path / "run")
    array = cache / "database_global.npy"
    header = array.stat().st_size - 17 * 8448 * 4
    if damage == "truncate":  # the file ends inside row 9
        os.truncate(array, header + 9 * 8448 * 4 + 100)
    else:  # rows 12-13 zeroed in place
        with open(array, "r+b") as handle:
            handle.seek(header + 12 * 8448 * 4)
            handle.write(bytes(2 * 8448 * 4))
    calls = ModelCalls(monkeypatch)
    caplog.set_level("WARNING")
    run_eval(config_for(labelled_set, tmp_path / "run", tiny_weights, keep_cache=True))
    assert same_outputs(tmp_path / "run", reference_run)
    assert "database_global.npy: rows" in caplog.text and "are damaged" in caplog.text
    # Only the damaged batches (of 4) go through the model again: rows 8-16 of the truncated
    # file, the batch of rows 12-15 of the zeroed one.
    assert calls.images == (17 - 8 if damage == "truncate" else 4)


def test_a_truncated_local_store_is_found_and_its_images_recomputed(
    labelled_set, tiny_weights, reference_run, tmp_path, monkeypatch, caplog
):
    cache = kept_run(labelled_set, tiny_weights, tmp_path / "run")
    store = cache / "database_local_float32"
    descriptors = store / "descriptors.bin"
    records = np.fromfile(store / "entries.commits", np.int64).reshape(-1, 4)
    cut = descriptors.stat().st_size // 2
    damaged = set(records[(records[:, 1] + records[:, 2]) * 512 > cut, 0].tolist())
    os.truncate(descriptors, cut)
    for scores in (cache / "queries").glob("rerank_scores_*"):
        scores.unlink()  # else the finished scores are reused and the store is never read
    calls = ModelCalls(monkeypatch)
    caplog.set_level("WARNING")
    run_eval(config_for(labelled_set, tmp_path / "run", tiny_weights, keep_cache=True))
    assert same_outputs(tmp_path / "run", reference_run)
    assert "missing data (truncated files), left out so they are computed again" in caplog.text
    candidates = set(np.load(tmp_path / "run" / "queries" / "predictions_global.npy")[:, :8].ravel().tolist())
    assert damaged & candidates and calls.images == len(damaged & candidates)


def store_features(image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(image_id)
    count = 5 + image_id % 50
    return F.normalize(torch.randn(count, 128, generator=generator), dim=-1), torch.rand(count, 2, generator=generator)


def test_store_damage_is_reported_never_read_as_zeros(tmp_path, caplog):
    with LocalFeatureStore(tmp_path, num_ids=10, dtype="float32") as store:
        for image_id in range(6):
            store.add([image_id], *[[part] for part in store_features(image_id)])
    rows = sum(len(store_features(i)[0]) for i in range(6))
    # Bit rot in image 2, and the file cut inside image 5.
    with open(tmp_path / "descriptors.bin", "r+b") as handle:
        handle.seek(sum(len(store_features(i)[0]) for i in range(2)) * 512 + 40)
        handle.write(b"\x7f")
    os.truncate(tmp_path / "descriptors.bin", (rows - 3) * 512)
    caplog.set_level("WARNING")
    reader = LocalFeatureStore(tmp_path, num_ids=10, dtype="float32", mode="r")
    assert reader.missing(np.arange(6)).tolist() == [2, 5]
    assert all(torch.equal(reader[i], store_features(i)[0]) for i in (0, 1, 3, 4))
    assert "checksum mismatch" in caplog.text and "ids 2" in caplog.text and "ids 5" in caplog.text
    assert (tmp_path / "descriptors.bin").stat().st_size == (rows - 3) * 512  # a reader never writes
    # A writer drops the damaged records and stores the images again.
    with LocalFeatureStore(tmp_path, num_ids=10, dtype="float32") as writer:
        assert writer.missing(np.arange(6)).tolist() == [2, 5]
        writer.add([2, 5], *[list(parts) for parts in zip(store_features(2), store_features(5))])
    again = LocalFeatureStore(tmp_path, num_ids=10, dtype="float32", mode="r")
    assert all(torch.equal(again[i], store_features(i)[0]) for i in range(6))


def test_a_second_writer_of_a_store_is_refused(tmp_path):
    with LocalFeatureStore(tmp_path, num_ids=3):
        with pytest.raises(RunLockedError, match="local-feature store"):
            LocalFeatureStore(tmp_path, num_ids=3)
        LocalFeatureStore(tmp_path, num_ids=3, mode="r")  # readers are always welcome


WRITER = """
import sys
import torch, torch.nn.functional as F
from fol_plugin.features import LocalFeatureStore
from tests.test_faults import store_features
with LocalFeatureStore(sys.argv[1], num_ids=400, dtype="float32") as store:
    print("open", flush=True)
    for image_id in range(400):
        store.add([image_id], *[[part] for part in store_features(image_id)])
"""


def test_a_reader_beside_a_writer_sees_only_complete_entries(tmp_path):
    folder = tmp_path / "store"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert writer.stdout.readline().strip() == "open"
    seen, checked = 0, 0
    while writer.poll() is None or seen < 400:
        reader = LocalFeatureStore(folder, num_ids=400, dtype="float32", mode="r")
        stored = [i for i in range(400) if i in reader]
        for image_id in stored[-5:]:  # the newest entries, the ones a torn write would hit
            descriptors, keypoints = store_features(image_id)
            assert torch.equal(reader[image_id], descriptors) and torch.equal(reader.keypoints(image_id), keypoints)
            checked += 1
        seen = len(stored)
        if writer.poll() is not None and seen < 400:
            break
    assert writer.wait(timeout=60) == 0
    final = LocalFeatureStore(folder, num_ids=400, dtype="float32", mode="r")
    assert len(final) == 400 and all(torch.equal(final[i], store_features(i)[0]) for i in range(400))
    assert checked > 5


# 4. The cache fingerprint.


def test_new_weights_at_the_same_path_invalidate_the_cache(labelled_set, tiny_weights, tmp_path):
    weights = tmp_path / "weights.pth"
    shutil.copyfile(tiny_weights, weights)
    kept_run(labelled_set, weights, tmp_path / "run")
    torch.manual_seed(1)
    torch.save({"model_state_dict": FoLModel(TINY_VIT).state_dict()}, weights)
    with pytest.raises(CacheMismatchError, match=r"holds .* MB of results of another configuration \(differs in weights:.*"
                       r"To reuse them, rerun the command that made them: .*to discard them, `rm -rf .*cache`"):
        run_eval(config_for(labelled_set, tmp_path / "run", weights))


def test_a_replaced_image_invalidates_the_cache(labelled_set, tiny_weights, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(labelled_set, root)
    kept_run(root, tiny_weights, tmp_path / "run")
    images = sorted((root / "database").iterdir())
    shutil.copyfile(images[1], images[3])  # same name, another photo
    with pytest.raises(CacheMismatchError, match=r"differs in database\.listing"):
        run_eval(config_for(root, tmp_path / "run", tiny_weights))


def test_a_run_that_computed_nothing_never_blocks_the_next(labelled_set, tiny_weights, tmp_path, reference_run):
    """The model fails to load after the cache was set up: the fixed command then just runs."""
    wrong = tmp_path / "vitb_shaped.pth"
    torch.save({"model_state_dict": {"aggregator.x": torch.zeros(1)}}, wrong)
    with pytest.raises(CheckpointError):
        run_eval(config_for(labelled_set, tmp_path / "run", wrong))
    assert (tmp_path / "run" / "cache" / "run.json").exists()
    run_eval(config_for(labelled_set, tmp_path / "run", tiny_weights, keep_cache=False))
    assert same_outputs(tmp_path / "run", reference_run)


def test_checkpoint_digests_are_computed_once_per_file_version(tmp_path, monkeypatch, user_cache):
    path = tmp_path / "w.pth"
    path.write_bytes(b"a" * 1000)
    reads = []
    digest = fingerprint_module.file_digest
    monkeypatch.setattr(fingerprint_module, "file_digest", lambda p: reads.append(p) or digest(p))
    first = checkpoint_digest(path)
    assert checkpoint_digest(path) == first and len(reads) == 1
    assert json.loads((user_cache / "checkpoint_digests.json").read_text())[str(path.resolve())]["digest"] == first
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(1, 1))
    assert checkpoint_digest(path) != first and len(reads) == 2


# 5. Query folders whose names are hostile.


def test_query_folder_names_cannot_write_into_the_cache_or_outside(labelled_set, tiny_weights, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(labelled_set, root)
    shutil.copytree(root / "queries", root / "cache")
    output = tmp_path / "out"
    outside = lambda: {p for p in tmp_path.rglob("*") if p != output and output not in p.parents}  # noqa: E731
    before = outside()
    summary = run_eval(config_for(
        root, output, tiny_weights, queries_folders=[root / "cache", root / "queries" / "..", root / "queries"],
        recall_values=(1,), keep_cache=False, labelled=False, num_preds_to_save=0,
    ))
    assert list(summary["query_sets"]) == ["queries_cache", "data", "queries"]
    assert sorted(p.name for p in output.iterdir()) == [".fol-vpr.lock", "data", "queries", "queries_cache", "recalls.json"]
    assert (output / "queries_cache" / "predictions_global.npy").exists()
    assert outside() == before  # nothing written outside
    assert config_module.output_key(Path("a/b c:*"), set()) == "b_c"
    assert config_module.output_key(Path("/"), set()) == "queries"


# 6. Symlinked subfolders.


def test_image_search_follows_directory_symlinks_without_looping(labelled_set, tmp_path, caplog):
    folder = tmp_path / "database"
    folder.mkdir()
    shutil.copyfile(sorted((labelled_set / "database").iterdir())[0], folder / "own.jpg")
    (folder / "linked").symlink_to(labelled_set / "database", target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "._own.jpg").write_bytes(b"macOS metadata")  # hidden: glob skips it, so do we
    caplog.set_level("WARNING")
    found = list_images(folder)
    assert len(found) == 18 and found[-1] == str(folder / "own.jpg")
    assert all(path.startswith(str(folder / "linked")) for path in found[:17])
    assert "symlink loop" in caplog.text


# 7. Re-ranking in any grad mode.


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "plain"])
def test_reranking_works_in_every_grad_mode(mode):
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(300, 128, generator=generator), dim=-1)
    noise = 0.01 * torch.randn(300, 128, generator=generator)
    database = {i: F.normalize(query[: 300 - 50 * i] + noise[: 300 - 50 * i], dim=-1) for i in range(4)}
    expected = torch.tensor([mutual_match_scores(query, [database[i]])[0] for i in range(4)])
    global_order = np.array([3, 2, 1, 0])
    context = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "plain": torch.enable_grad}[mode]
    with context():
        scores = mutual_match_scores(query.clone(), [database[i].clone() for i in range(4)])
        reranked = rerank(global_order[None], [query.clone()], database, top_k=4, progress=False)
    assert torch.equal(scores, expected) and len(set(expected.tolist())) == 4
    assert reranked[0].tolist() == global_order[np.argsort(-expected.numpy()[global_order])].tolist()


# 8. Faults and bad input: one line naming the value and the fix, exit code 2, no traceback.


def test_numpy_descriptors_are_accepted_by_the_engine():
    generator = torch.Generator().manual_seed(1)
    query = F.normalize(torch.randn(100, 128, generator=generator), dim=-1)
    candidate = F.normalize(query + 0.1 * torch.randn(100, 128, generator=generator), dim=-1)
    assert torch.equal(mutual_match_scores(query.numpy(), [candidate.numpy()]), mutual_match_scores(query, [candidate]))


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(0, 3, 126, 126), "empty batch"),
        (torch.zeros(1, 3, 126, 126, dtype=torch.uint8), r"float images.*not torch\.uint8.*preprocess"),
        (torch.zeros(1, 3, 126, 126, dtype=torch.float16), r"float16 but the model's weights are torch\.float32"),
    ],
)
def test_model_input_errors_name_the_fix(tiny_model, images, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_model(images)


@pytest.mark.parametrize("mode", ["CMYK", "LA", "I;16"])
def test_image_modes_pillow_reads_are_converted_as_pillow_does(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    image = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)) if mode == "I;16" else rgb.convert(mode)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path)
    expected = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255
    loaded = fol_plugin.load_image(path)
    assert loaded.shape == (3, 30, 40) and np.array_equal(loaded.permute(1, 2, 0).numpy(), expected)


def user_error(caplog, *args: str) -> str:
    """Run the CLI, expect exit code 2 and one error line without a traceback; return the line."""
    caplog.clear()
    assert run_cli(*args) == 2
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and "Traceback" not in caplog.text
    return errors[0].getMessage()


def test_command_line_faults_are_one_line_messages(labelled_set, tiny_weights, tmp_path, tiny_cli, caplog, capsys):
    args = eval_args(labelled_set, tmp_path / "out", tiny_weights)
    if not torch.cuda.is_available():
        assert "CUDA is not available here; use --device cpu" in user_error(caplog, *args, "--device", "cuda")
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in user_error(caplog, *eval_args(labelled_set, tmp_path / "file", tiny_weights))
    assert "cannot create --output_dir /proc/fol" in user_error(caplog, *eval_args(labelled_set, Path("/proc/fol"), tiny_weights))
    (tmp_path / "cache_json" / "cache").mkdir(parents=True)
    (tmp_path / "cache_json" / "cache" / "run.json").write_text("{broken")
    (tmp_path / "cache_json" / "cache" / "a.commits").write_bytes(b"x" * 16)
    message = user_error(caplog, *eval_args(labelled_set, tmp_path / "cache_json", tiny_weights))
    assert "cache_json/cache/run.json is damaged" in message and "rm -rf" in message
    for bad in (["--image_size", "-14", "224"], ["--num_preds_to_save", "-2"], ["--batch_size", "0"]):
        with pytest.raises(SystemExit) as exit_code:
            run_cli(*args, *bad)
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


def fail_when_full(limit_calls: int):
    """A write wrapper: the disk is full from the ``limit_calls``-th append on."""
    calls = {"n": 0}
    append = store_module.fsync_append

    def append_until_full(path, chunks):
        calls["n"] += 1
        if calls["n"] >= limit_calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        append(path, chunks)

    return append_until_full


def test_disk_full_mid_run_stops_with_the_fix_and_resumes(
    labelled_set, tiny_weights, reference_run, tmp_path, tiny_cli, monkeypatch, caplog
):
    output = tmp_path / "run"
    with monkeypatch.context() as full:
        full.setattr(store_module, "fsync_append", fail_when_full(9))
        message = user_error(caplog, *eval_args(labelled_set, output, tiny_weights, "--keep_cache"))
    assert re.search(r"disk full at .*database_local_float32/(descriptors|keypoints)\.bin; free \d+\.\d GB and rerun "
                     r"the same command to resume", message)
    assert run_cli(*eval_args(labelled_set, output, tiny_weights)) == 0
    assert same_outputs(output, reference_run)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MB tmpfs, where the test may mount one (root); skipped otherwise."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def test_a_memory_mapped_array_the_disk_cannot_hold_fails_at_creation_not_with_sigbus(small_tmpfs):
    with pytest.raises(OSError) as error:
        ResumableArray(small_tmpfs / "big.npy", (64, 8448))  # 2.2 MB on a 1 MB disk
    assert error.value.errno == errno.ENOSPC
    with LocalFeatureStore(small_tmpfs / "store", num_ids=4000, dtype="float32") as store, pytest.raises(OSError):
        for image_id in range(4000):
            store.add([image_id], *[[part] for part in store_features(image_id)])
    with pytest.raises(DiskFullError, match="disk full at .*; free"):
        with fol_plugin.cache.disk_full_guard(small_tmpfs, lambda: 2e9):
            ResumableArray(small_tmpfs / "again.npy", (64, 8448))


def test_an_unreadable_image_read_in_a_worker_process_is_one_line(labelled_set, tiny_weights, tmp_path, tiny_cli, caplog):
    root = tmp_path / "broken"
    shutil.copytree(labelled_set, root)
    (root / "database" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    args = eval_args(root, tmp_path / "out", tiny_weights, "--no_labels")
    args[args.index("--num_workers") + 1] = "1"
    line = user_error(caplog, *args)
    assert line.startswith("cannot decode image ") and "zz_broken.jpg" in line and "\n" not in line


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
