"""find_images: class folders at any depth, split and hidden folders skipped, loose files flagged."""

from pathlib import Path

import pytest

from cxr_fast.data.sources import find_images, shared_subfolders
from cxr_fast.errors import CxrFastError


def touch(root: Path, *relpaths: str) -> None:
    for relpath in relpaths:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def found(root: Path, **kwargs) -> list[tuple[str, str | None]]:
    return [
        (item.path.relative_to(root).as_posix(), item.source_label) for item in find_images(root, **kwargs)
    ]


def test_class_folders(tmp_path):
    touch(tmp_path, "Normal/b.png", "Normal/a.png", "COVID-19/COVID-19 (1).jpg")
    assert found(tmp_path) == [
        ("COVID-19/COVID-19 (1).jpg", "COVID-19"),
        ("Normal/a.png", "Normal"),
        ("Normal/b.png", "Normal"),
    ]


def test_split_folders_are_skipped_case_insensitively(tmp_path):
    touch(tmp_path, "train/PNEUMONIA/p1.jpeg", "Test/NORMAL/n1.jpeg", "VAL/NORMAL/n2.jpeg", "testing/x/y.png")
    labels = dict(found(tmp_path))
    assert labels == {
        "Test/NORMAL/n1.jpeg": "NORMAL",
        "VAL/NORMAL/n2.jpeg": "NORMAL",
        "testing/x/y.png": "x",
        "train/PNEUMONIA/p1.jpeg": "PNEUMONIA",
    }


def test_nested_folders_belong_to_their_class(tmp_path):
    touch(tmp_path, "Pneumonia/hospital_a/2020/p.png", "Pneumonia/train/q.png")
    assert dict(found(tmp_path)) == {
        "Pneumonia/hospital_a/2020/p.png": "Pneumonia",
        "Pneumonia/train/q.png": "Pneumonia",
    }


def test_hidden_and_underscore_entries_are_ignored(tmp_path):
    touch(
        tmp_path,
        "_masks/Normal/a.png",
        ".git/x.png",
        "Normal/.DS_Store",
        "Normal/._a.png",  # macOS's resource fork of a.png
        "Normal/_notes.txt",
        "_meta.csv",
        "Normal/a.png",
    )
    assert found(tmp_path) == [("Normal/a.png", "Normal")]


def test_a_camera_film_named_with_an_underscore_is_data(tmp_path):
    # cameras name films _DSC0001.JPG: a class of them was called empty and its films dropped without a count
    touch(tmp_path, "COVID-19/_DSC0001.JPG", "COVID-19/_dsc0002.dcm", "COVID-19/_README.txt")
    assert found(tmp_path) == [("COVID-19/_DSC0001.JPG", "COVID-19"), ("COVID-19/_dsc0002.dcm", "COVID-19")]


def test_loose_files_have_no_class(tmp_path):
    touch(tmp_path, "README.txt", "train/loose.png", "Normal/a.png")
    assert found(tmp_path) == [("Normal/a.png", "Normal"), ("README.txt", None), ("train/loose.png", None)]
    items = find_images(tmp_path)
    assert [item.has_class for item in items] == [True, False, False]


def test_non_image_files_inside_classes_are_kept_for_the_reader_to_judge(tmp_path):
    touch(tmp_path, "Normal/notes.txt", "Normal/IM0001")
    assert [label for _, label in found(tmp_path)] == ["Normal", "Normal"]


def test_skip(tmp_path):
    touch(tmp_path, "Normal/a.png", "out/cache/ab/x.png", "out/manifest.csv")
    assert found(tmp_path, skip=[tmp_path / "out"]) == [("Normal/a.png", "Normal")]


def test_missing_or_file_root(tmp_path):
    with pytest.raises(CxrFastError, match="not found"):
        find_images(tmp_path / "nope")
    touch(tmp_path, "file.png")
    with pytest.raises(CxrFastError, match="not a folder"):
        find_images(tmp_path / "file.png")


def test_linked_class_folders_are_read_and_a_link_loop_is_not_followed(tmp_path):
    src = tmp_path / "src"
    touch(src, "Normal/a.png")
    touch(tmp_path / "elsewhere", "Viral/v.png", "more/m.png")
    (src / "Viral").symlink_to(tmp_path / "elsewhere" / "Viral")  # a whole class kept on another disk
    (src / "Normal" / "more").symlink_to(tmp_path / "elsewhere" / "more")
    (src / "Normal" / "loop").symlink_to(src)  # would walk for ever
    assert found(src) == [("Normal/a.png", "Normal"), ("Normal/more/m.png", "Normal"), ("Viral/v.png", "Viral")]


def test_sibling_folders_linking_to_each_other_are_walked_once(tmp_path):
    # a -> c and c -> a are not above one another, yet walked as links they nest until the OS gives up; two links
    # to one folder double the paths at every level
    touch(tmp_path, "COVID/a/x.png", "COVID/c/y.png", "lost+found/z.png")
    (tmp_path / "COVID" / "a" / "toc1").symlink_to(tmp_path / "COVID" / "c")
    (tmp_path / "COVID" / "a" / "toc2").symlink_to(tmp_path / "COVID" / "c")
    (tmp_path / "COVID" / "c" / "toa").symlink_to(tmp_path / "COVID" / "a")
    assert found(tmp_path) == [("COVID/a/x.png", "COVID"), ("COVID/c/y.png", "COVID")]  # nor lost+found, a disk's own
    (tmp_path / "Alias").symlink_to(tmp_path / "COVID")  # sorts before its target: still known for a sibling
    assert found(tmp_path) == [("COVID/a/x.png", "COVID"), ("COVID/c/y.png", "COVID")]


def test_a_folder_that_cannot_be_listed_is_an_error_not_left_out(tmp_path, monkeypatch):
    import os

    touch(tmp_path, "Normal/a.png", "Pneumonia/p.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("Pneumonia"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(CxrFastError, match="Pneumonia: cannot list this folder .Permission denied"):
        find_images(tmp_path)


def test_a_source_folder_that_was_a_prepare_output_reads_only_its_images(tmp_path):
    touch(tmp_path, "Normal/a.png", "cache/ab/cd.png", "manifest.csv", "prepare_report.json")
    assert found(tmp_path) == [("Normal/a.png", "Normal")]


def test_split_folders_are_skipped_inside_sites_too(tmp_path):
    touch(tmp_path, "hospA/train/COVID/a.png", "hospA/Test/Normal/b.png", "hospB/COVID/val/c.png")
    assert [(item.path.relative_to(tmp_path).as_posix(), item.site, item.source_label)
            for item in find_images(tmp_path, sites=True)] == [("hospA/Test/Normal/b.png", "hospA", "Normal"),
                                                               ("hospA/train/COVID/a.png", "hospA", "COVID"),
                                                               ("hospB/COVID/val/c.png", "hospB", "COVID")]


def test_a_skipped_file_is_left_out_and_its_neighbours_kept(tmp_path):
    touch(tmp_path, "Normal/a.png", "Normal/b.png")
    assert found(tmp_path, skip=[tmp_path / "Normal" / "a.png"]) == [("Normal/b.png", "Normal")]


def test_an_earlier_output_inside_the_source_is_skipped_whole(tmp_path):
    # its manifest and cache go, and so does anything else there (notes, a copied film): it is no class folder
    touch(tmp_path, "Normal/a.png", "old/prepare_report.json", "old/manifest.csv", "old/cache/ab/x.png",
          "old/notes.txt", "old/film.png")
    assert found(tmp_path) == [("Normal/a.png", "Normal")]


def shared(root: Path) -> list[str]:
    return shared_subfolders(root, find_images(root))


def test_one_subfolder_name_in_common_is_no_sign_of_sites(tmp_path):
    touch(tmp_path, "COVID/2020/a.png", "COVID/2020/b.png", "Normal/2020/c.png", "Normal/2020/d.png")
    assert shared(tmp_path) == []
    touch(tmp_path, "COVID/2021/e.png", "Normal/2021/f.png")  # two in common: read as sites
    assert shared(tmp_path) == ["2020", "2021"]


def test_sites_are_named_when_the_shared_subfolders_hold_more_than_half_of_each_folder_s_files(tmp_path):
    touch(tmp_path, *[f"{site}/{label}/{i}.png" for site in ("hospA", "hospB") for label in ("COVID", "Normal")
                      for i in range(2)])
    assert shared(tmp_path) == ["COVID", "Normal"]
    touch(tmp_path, *[f"hospB/own{i}.png" for i in range(3)])  # hospB: 4 of 7 in the shared folders, still most
    assert shared(tmp_path) == ["COVID", "Normal"]
    touch(tmp_path, "hospB/own3.png")  # 4 of 8: half is not most, hospB is a class holding its own files
    assert shared(tmp_path) == []


def test_sites_are_named_below_a_split_folder(tmp_path):
    touch(tmp_path, *[f"train/{site}/{label}/{i}.png" for site in ("hospA", "hospB") for label in ("COVID", "Normal")
                      for i in range(2)])
    assert shared(tmp_path) == ["COVID", "Normal"]
