"""Shared test fixtures. Data and reference runs live in ../shared beside the clone; tests that
need them skip with a reason when it is absent."""
from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fol_plugin import checkpoint, cli
from fol_plugin.evaluation import EvalConfig, run_eval
from fol_plugin.features import ExtractionConfig
from fol_plugin.models import FoLModel, ViTConfig


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"
TINY_VIT = ViTConfig(embed_dim=32, depth=2, num_heads=2)


def utm_name(east: float, north: float, stem: str) -> str:
    """A VPR-datasets-downloader file name carrying UTM coordinates."""
    return f"@{east:.2f}@{north:.2f}@17@T@{stem}@.jpg"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: clone the project beside ../shared to run this test")
    return path


@pytest.fixture(autouse=True)
def user_cache(tmp_path_factory, monkeypatch) -> Path:
    """fol-plugin's per-user state (checkpoint digests) in a temporary folder, never in the home."""
    folder = tmp_path_factory.mktemp("user_cache")
    monkeypatch.setenv("FOL_PLUGIN_CACHE", str(folder))
    return folder


IMAGE_SIZE = (126, 126)  # 81 patches: the smallest square FoL takes, fast for the tiny ViT
SPACING = 100.0  # metres between database places
NEAR_QUERIES = (0, 3, 7)  # database images whose copy is a query labelled 10 m from it
FAR_QUERIES = (5, 11)  # copies labelled 1 km past the last place: no positive at all


def toy_database_on_a_line(root: Path) -> list[Path]:
    """``root/database``: the 17 toy database photos on a line, ``SPACING`` metres apart (UTM
    names), and an empty ``root/queries``; returns the source photos, in order."""
    sources = sorted(require(DATA / "toy_dataset" / "database").glob("*.jpg"))
    (root / "database").mkdir(parents=True)
    (root / "queries").mkdir()
    for i, source in enumerate(sources):
        shutil.copyfile(source, root / "database" / utm_name(SPACING * i, 0.0, f"db{i:02d}"))
    return sources


@pytest.fixture(scope="session")
def labelled_set(tmp_path_factory) -> Path:
    """17 toy database photos on a line, 100 m apart; 5 queries, each an exact copy of a
    database photo, three labelled 10 m from it and two far from every place."""
    root = tmp_path_factory.mktemp("labelled")
    sources = toy_database_on_a_line(root)
    for q, i in enumerate(NEAR_QUERIES + FAR_QUERIES):
        east = SPACING * i + 10 if i in NEAR_QUERIES else SPACING * (len(sources) + 10)
        shutil.copyfile(sources[i], root / "queries" / utm_name(east, 0.0, f"copy{i:02d}"))
    return root


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save({"model_state_dict": FoLModel(TINY_VIT).state_dict()}, path)
    return path


def copy_indices(database_paths: list[str], query_paths: list[str]) -> list[int]:
    """The database index of each query's source photo."""
    names = [Path(p).name.split("@")[-2] for p in database_paths]
    return [names.index("db" + Path(p).name.split("@")[-2].removeprefix("copy")) for p in query_paths]


def config_for(root: Path, output: Path, weights: Path, **overrides) -> EvalConfig:
    settings = dict(
        database_folder=root / "database",
        queries_folders=[root / "queries"],
        output_dir=output,
        backbone=TINY_VIT,
        weights=str(weights),
        extraction=ExtractionConfig(image_size=IMAGE_SIZE, batch_size=4, num_workers=0),
        rerank_topk=8,
        num_preds_to_save=2,
        keep_cache=True,
    )
    settings.update(overrides)
    return EvalConfig(**settings)


def tiny_cli_args(root: Path, output: Path, weights: Path, *extra: str) -> list[str]:
    """``fol-vpr eval`` with the tiny ViT (``tests/tiny_fol_vpr.py``, ``--backbone vitb``); 17
    database images in batches of 2 and search chunks of 5 rows: two processes split 9 batches and
    4 chunks unevenly."""
    return [
        str(Path(__file__).parent / "tiny_fol_vpr.py"), "eval",
        "--database_folder", str(root / "database"), "--queries_folder", str(root / "queries"),
        "--backbone", "vitb", "--weights", str(weights), "--image_size", *map(str, IMAGE_SIZE),
        "--num_workers", "0", "--rerank_topk", "8", "--batch_size", "2", "--search_chunk_size", "5",
        "--save_descriptors", "--keep_cache", "--output_dir", str(output), *extra,
    ]  # fmt: skip


def write_blank_png(path: Path, width: int, height: int) -> Path:
    """A valid 8-bit greyscale PNG of ``width`` x ``height`` black pixels, compressed row by row, so
    that a 20000 x 20000 image (400 MB decoded as bytes, 4.8 GB as float32 RGB) is written in
    seconds as a 0.4 MB file without holding its pixels in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, rows = zlib.compressobj(1), bytes(width + 1) * 100  # per row: filter byte 0, the pixels
    pixels = b"".join(compressor.compress(rows) for _ in range(height // 100))
    pixels += compressor.compress(bytes(width + 1) * (height % 100)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def tiny_model() -> FoLModel:
    torch.manual_seed(0)
    return FoLModel(TINY_VIT).eval()


@pytest.fixture
def hub_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME; returns its hub/checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any attempt to open a network connection."""

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def closed_port_url(name: str) -> str:
    """A URL on a local port nobody listens on: connecting fails at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def save_upstream_checkpoint(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """Save weights as the original repository does: DataParallel keys under "model_state_dict"."""
    torch.save({"model_state_dict": {"module." + key: value for key, value in state_dict.items()}}, path)
    return path


def imagenet_input(images_uint8: np.ndarray) -> torch.Tensor:
    """The fixture's network input: (uint8 / 255 - mean) / std in float32."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (torch.from_numpy(images_uint8).float() / 255 - mean) / std


@pytest.fixture(scope="session")
def parity_fixture() -> dict:
    """The reference run of the original code (ViT-B, 322x322) and the weights it used."""
    folder = require(FIXTURES / "parity-vitb-322")
    spec = importlib.util.spec_from_file_location("detweights", FIXTURES / "detweights.py")
    detweights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(detweights)
    meta = json.loads((folder / "meta.json").read_text())
    keys = json.loads((FIXTURES / "keys_vitb.json").read_text())
    expected = dict(np.load(folder / "expected.npz"))
    return {"meta": meta, "expected": expected, "state_dict": detweights.make_state_dict(keys, meta["seed"])}


@pytest.fixture(scope="session")
def parity_torch_home(parity_fixture, tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds the fixture weights as FoL_base.pth, upstream format."""
    home = tmp_path_factory.mktemp("parity_torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    save_upstream_checkpoint(parity_fixture["state_dict"], checkpoints / "FoL_base.pth")
    return home


OUTPUT_FILES = ("predictions_global.npy", "predictions_reranked.npy", "rerank_scores.npy")


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


def cli_run(*args: str) -> int:
    return cli.main(list(args))


@pytest.fixture
def tiny_cli(monkeypatch):
    """``--backbone vitb`` builds the tiny ViT, so the command line runs fast."""
    monkeypatch.setattr(checkpoint, "FoLModel", lambda backbone, **kwargs: FoLModel(TINY_VIT, **kwargs))


def tiny_eval_args(root: Path, output: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "eval", "--database_folder", str(root / "database"), "--queries_folder", str(root / "queries"),
        "--backbone", "vitb", "--weights", str(weights), "--image_size", "126", "126", "--num_workers", "0",
        "--rerank_topk", "8", "--output_dir", str(output), *extra,
    ]


def kept_run(labelled_set, tiny_weights, output: Path) -> Path:
    run_eval(config_for(labelled_set, output, tiny_weights, keep_cache=True))
    return output / "cache"


def user_error(caplog, *args: str) -> str:
    """Run the CLI, expect exit code 2 and one error line without a traceback; return the line."""
    caplog.clear()
    assert cli_run(*args) == 2
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and "Traceback" not in caplog.text
    return errors[0].getMessage()


def store_features(image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(image_id)
    count = 5 + image_id % 50
    return F.normalize(torch.randn(count, 128, generator=generator), dim=-1), torch.rand(count, 2, generator=generator)
