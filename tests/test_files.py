"""Atomic writes (``fol_plugin.files``): never through a planted link, never over a folder."""
from __future__ import annotations

import os

import numpy as np
import pytest

from fol_plugin import files


def plant_link_at_every_old_temporary_name(path) -> list:
    """The old fixed temporary name ``<target>.tmp``, as someone sending a folder would plant it."""
    victim = path.parent / "victim.txt"
    victim.write_text("precious")
    (path.parent / f"{path.name}.tmp").symlink_to(victim)
    return [victim]


@pytest.mark.parametrize(
    "writer",
    [
        lambda path: files.write_text(path, "new"),
        lambda path: files.write_json(path, {"a": 1}),
        lambda path: files.write_csv(path, ["a"], [[1]]),
        lambda path: files.save_npy(path, np.zeros(3)),
        lambda path: files.save_torch(path, {"a": 1}),
    ],
    ids=["text", "json", "csv", "npy", "torch"],
)
def test_a_planted_temporary_link_is_never_written_through(tmp_path, writer):
    target = tmp_path / "out.bin"
    (victim,) = plant_link_at_every_old_temporary_name(target)
    writer(target)
    assert victim.read_text() == "precious"
    assert target.is_file() and not target.is_symlink() and target.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.bin.tmp", "victim.txt"]  # no temporary left


def test_a_target_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "report.html"
    target.symlink_to(victim)
    with pytest.raises(files.UnsafeTargetError, match=r"report.html is a symbolic link \(to .*victim.txt\); .* remove the link"):
        files.write_text(target, "page")
    assert victim.read_text() == "precious" and target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "victim.txt"]


def test_a_target_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "report.html").mkdir()
    with pytest.raises(files.UnsafeTargetError, match="report.html is a folder, where an output file goes"):
        files.write_text(tmp_path / "report.html", "page")


def test_temporary_files_are_fresh_even_when_a_name_is_taken(tmp_path, monkeypatch):
    names = iter(["taken", "taken", "free"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    (tmp_path / ".out.txt.taken.tmp").symlink_to(tmp_path / "elsewhere")
    files.write_text(tmp_path / "out.txt", "x")
    assert (tmp_path / "out.txt").read_text() == "x" and not (tmp_path / "elsewhere").exists()


def test_outputs_get_the_users_usual_permissions(tmp_path):
    files.write_text(tmp_path / "out.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o666 & ~umask
