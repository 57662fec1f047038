"""Runs spread over processes: torchrun (gloo, CPU, tiny ViT) gives the single-process outputs,
resumes a killed rank without recomputing, and fails as a whole when one rank fails; the shared
files take several writers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fol_plugin.distributed import Processes
from fol_plugin.features import LocalFeatureStore, ResumableArray
from fol_plugin.retrieval import exact_search, merge_top_k

from .conftest import DATA, REPO_ROOT, require
from .conftest import tiny_cli_args as tiny_args


TESTS = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
OUTPUT_FILES = ("predictions_global.npy", "predictions_reranked.npy", "rerank_scores.npy", "queries_descriptors.npy")
RUN_TIMEOUT_S = 300
COMPUTED = re.compile(
    r"(?:\[rank (\d)\] )?(Queries queries|Database|Database \(local\)|Queries queries \(local\)): computed images (.*)$"
)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    # One thread per process in both runs: CPU kernels round differently with other thread counts.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, **kwargs)


def outputs(output: Path) -> dict[str, bytes]:
    found = {name: (output / "queries" / name).read_bytes() for name in OUTPUT_FILES}
    found["database_descriptors.npy"] = (output / "database_descriptors.npy").read_bytes()
    found["recalls"] = json.dumps(json.loads((output / "recalls.json").read_text())["query_sets"]).encode()
    return found


@pytest.fixture(scope="module")
def single_process(labelled_set, tiny_weights, tmp_path_factory) -> dict[str, bytes]:
    output = tmp_path_factory.mktemp("single") / "run"
    result = run([sys.executable, *tiny_args(labelled_set, output, tiny_weights)])
    assert result.returncode == 0, result.stderr
    return outputs(output)


def test_two_processes_give_the_single_process_outputs_byte_for_byte(
    single_process, labelled_set, tiny_weights, tmp_path
):
    result = run([*TORCHRUN, *tiny_args(labelled_set, tmp_path / "run", tiny_weights)])
    assert result.returncode == 0, result.stderr
    assert outputs(tmp_path / "run") == single_process
    assert result.stderr.count("Only 17 database images") == 1  # a warning once, from rank 0
    summary = json.loads((tmp_path / "run" / "recalls.json").read_text())
    assert summary["processes"] == 2 and summary["query_sets"]["queries"]["reranked"]["R@1"] == 60.0
    # Each process wrote its own commit log and store files.
    cache = tmp_path / "run" / "cache"
    assert (cache / "database_global.commits").stat().st_size and (cache / "database_global.1.commits").stat().st_size
    assert (cache / "database_local_float32" / "entries.1.commits").stat().st_size


def test_two_processes_rerank_given_predictions_as_one(single_process, labelled_set, tiny_weights, tmp_path):
    given = tmp_path / "given.npy"
    given.write_bytes(single_process["predictions_global.npy"])
    args = tiny_args(labelled_set, tmp_path / "run", tiny_weights, "--predictions", str(given))
    args[1] = "rerank"
    args.remove("--save_descriptors")
    result = run([*TORCHRUN, *args])
    assert result.returncode == 0, result.stderr
    for name in ("predictions_reranked.npy", "rerank_scores.npy"):
        assert (tmp_path / "run" / "queries" / name).read_bytes() == single_process[name]


def _child_with_rank(parent: int, rank: int) -> int | None:
    """The pid of the child of ``parent`` started with RANK=rank (Linux /proc)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environment:
            return int(child)
    return None


def _computed(log: str) -> Counter:
    """(stage, image id) -> how many times a process logged it as computed and committed."""
    counts: Counter = Counter()
    for line in log.splitlines():
        match = COMPUTED.search(line)
        if not match:
            continue
        ids = match.group(3)
        if ids.startswith("["):
            image_ids = json.loads(ids)
        else:
            first, last = (int(value) for value in ids.split("-"))
            image_ids = range(first, last + 1)
        counts.update((match.group(2), image_id) for image_id in image_ids)
    return counts


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank's process in /proc (Linux)")
def test_a_killed_rank_is_resumed_without_recomputing_anything(single_process, labelled_set, tiny_weights, tmp_path):
    args = [*TORCHRUN, *tiny_args(labelled_set, tmp_path / "run", tiny_weights, "--debug")]
    args[args.index("126") : args.index("126") + 2] = ["252", "252"]  # slower images: time to kill rank 1 mid-way
    args[args.index("--batch_size") + 1] = "1"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(args, env=environment, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log, killed = [], False
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for line in first.stderr:
        log.append(line)
        if not killed and "[rank 1]" in line and "Database: computed images" in line:
            os.kill(_child_with_rank(first.pid, 1), signal.SIGKILL)
            killed = True
        assert time.monotonic() < deadline
    assert first.wait(timeout=RUN_TIMEOUT_S) != 0 and killed
    before = _computed("".join(log))
    database_ids = {image_id for stage, image_id in before if stage == "Database"}
    assert 0 < len(database_ids) < 17, "the kill came before or after the database pass"
    second = run(args)
    assert second.returncode == 0, second.stderr
    after = _computed(second.stderr)
    assert not set(before) & set(after), "an image committed before the kill was computed again"
    assert max((before + after).values()) == 1
    everything = before + after
    assert {image_id for stage, image_id in everything if stage == "Database"} == set(range(17))
    assert {image_id for stage, image_id in everything if stage == "Queries queries"} == set(range(5))


def test_a_failing_rank_fails_the_run_with_its_error(labelled_set, tiny_weights, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(labelled_set, root)
    last = sorted((root / "database").iterdir())[-1]  # rank 1's part of the database
    last.write_bytes(b"\xff\xd8\xff not really a jpeg")
    began = time.monotonic()
    result = run([*TORCHRUN, *tiny_args(root, tmp_path / "run", tiny_weights)])
    assert result.returncode != 0
    assert time.monotonic() - began < RUN_TIMEOUT_S / 2
    assert "[rank 1]" in result.stderr and f"cannot decode image {last}" in result.stderr
    assert "ValueError" in result.stderr  # torchrun's summary names the failed rank's error
    assert not (tmp_path / "run" / "recalls.json").exists()


@pytest.mark.parametrize("count, block, processes", [(17, 2, 2), (16, 4, 3), (5, 4, 4), (0, 1, 2), (100, 1, 7)])
def test_shards_are_contiguous_block_aligned_and_cover_everything(count, block, processes):
    parts = [Processes(rank, processes).shard(count, block) for rank in range(processes)]
    assert [i for part in parts for i in part] == list(range(count))
    assert all(part.start % block == 0 for part in parts if len(part))
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= block


def test_array_parts_of_two_writers_are_reused_by_a_run_with_another_number_of_writers(tmp_path):
    path, rows = tmp_path / "a.npy", np.arange(30, dtype=np.float32).reshape(10, 3)
    first = ResumableArray(path, (10, 3), rows=range(0, 5), writer=0)
    second = ResumableArray(path, (10, 3), rows=range(5, 10), writer=1)
    first.write(0, rows[0:2])
    second.write(5, rows[5:8])
    with pytest.raises(ValueError, match="rows range"):
        second.write(3, rows[3:5])  # not this writer's rows
    alone = ResumableArray(path, (10, 3))  # the next run has one process
    assert alone.todo() == [range(2, 5), range(8, 10)]
    np.testing.assert_array_equal(alone.array[[0, 1, 5, 6, 7]], rows[[0, 1, 5, 6, 7]])


def test_a_store_read_by_every_writer_sees_the_others_after_refresh(tmp_path):
    descriptors = [torch.nn.functional.normalize(torch.randn(3 + i, 8), dim=1) for i in range(4)]
    keypoints = [torch.rand(3 + i, 2) for i in range(4)]
    first = LocalFeatureStore(tmp_path / "s", 4, 8, "float32", writer=0)
    second = LocalFeatureStore(tmp_path / "s", 4, 8, "float32", writer=1)
    first.add([0, 1], descriptors[:2], keypoints[:2])
    second.add([3], descriptors[3:], keypoints[3:])
    assert list(first.missing(np.arange(4))) == [2, 3]
    first.refresh()
    assert list(first.missing(np.arange(4))) == [2]
    torch.testing.assert_close(first[3], descriptors[3], rtol=0, atol=0)
    reader = LocalFeatureStore(tmp_path / "s", 4, 8, "float32", mode="r")
    assert len(reader) == 3 and torch.equal(reader.keypoints(1), keypoints[1])


def test_merging_partial_searches_in_any_order_is_the_exact_search():
    generator = np.random.default_rng(0)
    database = generator.standard_normal((40, 16)).astype(np.float32)
    database[25] = database[3]  # a tie: the lower index first
    queries = np.concatenate([database[3:4], generator.standard_normal((4, 16)).astype(np.float32)])
    whole = exact_search(database, queries, 6, chunk_size=10)
    parts = [exact_search(database[s : s + 10], queries, 6, chunk_size=10) for s in range(0, 40, 10)]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        merged = merge_top_k([parts[i][0] for i in order], [parts[i][1] + 10 * i for i in order], 6)
        np.testing.assert_array_equal(merged[1], whole[1])
        np.testing.assert_array_equal(merged[0], whole[0])
    assert list(whole[1][0, :2]) == [3, 25]


@pytest.mark.slow
def test_the_readme_torchrun_command_gives_the_single_process_results(parity_torch_home, tmp_path):
    """The README's two toy commands as written (ViT-B, the fixture weights in TORCH_HOME)."""
    require(DATA / "toy_dataset")
    blocks = re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    single = next(b for b in blocks if b.startswith("fol-vpr eval --backbone vitb") and "runs/toy\n" in b)
    distributed = next(b for b in blocks if b.startswith("torchrun --standalone --nproc_per_node 2"))
    environment = {**os.environ, "TORCH_HOME": str(parity_torch_home)}
    outputs = {}
    for name, block in (("single", single), ("torchrun", distributed)):
        output = tmp_path / name
        command = re.sub(r"--output_dir runs/\S+", f"--output_dir {output}", block)
        result = subprocess.run(
            command,
            shell=True,
            executable="/bin/bash",
            cwd=REPO_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        assert result.returncode == 0, result.stderr
        outputs[name] = output
    for name in ("predictions_global.npy", "predictions_reranked.npy", "rerank_scores.npy"):
        np.testing.assert_array_equal(
            np.load(outputs["single"] / "queries" / name), np.load(outputs["torchrun"] / "queries" / name)
        )
    recalls = [json.loads((outputs[name] / "recalls.json").read_text())["query_sets"] for name in outputs]
    assert recalls[0] == recalls[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL)")
def test_two_gpus_give_the_one_gpu_predictions(labelled_set, tiny_weights, tmp_path):
    outputs = {}
    for name, launcher in (("one", [sys.executable]), ("two", TORCHRUN)):
        output = tmp_path / name
        result = run([*launcher, *tiny_args(labelled_set, output, tiny_weights, "--device", "cuda")])
        assert result.returncode == 0, result.stderr
        outputs[name] = output
    for name in ("predictions_global.npy", "predictions_reranked.npy", "rerank_scores.npy"):
        np.testing.assert_array_equal(np.load(outputs["one"] / "queries" / name), np.load(outputs["two"] / "queries" / name))
