"""Image sets (``fol_plugin.data.datasets``): listing, paths files, labels."""
from __future__ import annotations

import os
import shutil

import pytest

from fol_plugin.data.datasets import list_images


@pytest.fixture
def two_datasets(tmp_path):
    """``a/database`` with its paths file, and ``b/database`` beside it."""
    for name in ("a", "b"):
        (tmp_path / name / "database").mkdir(parents=True)
        (tmp_path / name / "database" / "x.jpg").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("entry", ["../../b/database/x.jpg", "/etc/passwd", "sub/../../x.jpg"])
def test_paths_file_entries_outside_the_folder_are_refused(two_datasets, entry):
    folder = two_datasets / "a" / "database"
    (two_datasets / "a" / "database_images_paths.txt").write_text(f"x.jpg\n{entry}\n")
    with pytest.raises(ValueError, match=rf"lists 1 path\(s\) outside {folder}, e.g. '{entry}': .*--allow_outside_paths"):
        list_images(folder)
    assert list_images(folder, allow_outside_paths=True) == [str(folder / "x.jpg"), str(folder / entry)]


def test_paths_file_entries_inside_the_folder_are_taken_as_written(two_datasets):
    folder = two_datasets / "a" / "database"
    (folder / "sub").mkdir()
    (two_datasets / "a" / "database_images_paths.txt").write_text("sub/../x.jpg\n./x.jpg\n")
    assert list_images(folder) == [str(folder / "sub/../x.jpg"), str(folder / "x.jpg")]


def test_a_relative_folder_with_an_absolute_entry_is_refused(two_datasets, monkeypatch):
    monkeypatch.chdir(two_datasets)
    (two_datasets / "a" / "database_images_paths.txt").write_text(f"{two_datasets}/b/database/x.jpg\n")
    with pytest.raises(ValueError, match="outside a/database"):
        list_images("a/database")


def test_names_that_are_not_utf8_are_listed(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")
    (tmp_path / name).write_bytes(b"")
    (tmp_path / "plain.jpg").write_bytes(b"")
    assert sorted(list_images(tmp_path)) == sorted([str(tmp_path / name), str(tmp_path / "plain.jpg")])


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


def test_links_to_themselves_and_unreadable_folders_are_skipped_with_a_warning(labelled_set, tmp_path, caplog):
    folder = tmp_path / "db"
    shutil.copytree(labelled_set / "database", folder)
    (folder / "selfloop").symlink_to("selfloop")
    (folder / "selfloop.jpg").symlink_to("selfloop.jpg")
    locked = folder / "locked"
    locked.mkdir()
    locked.chmod(0)
    caplog.set_level("WARNING")
    try:
        found = list_images(folder)
    finally:
        locked.chmod(0o755)
    assert found == sorted(str(path) for path in folder.glob("*.jpg") if not path.is_symlink())
    assert "selfloop (Too many levels of symbolic links): skipping it" in caplog.text
    if os.geteuid() != 0:  # root reads any folder
        assert "locked (Permission denied): skipping it" in caplog.text
