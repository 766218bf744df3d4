"""``ablate data imagenet1k``: an image-folder root from an ImageNet-1K tree (validation images in
class folders, or flat with a labels file), and ``fake-imagenet --classes imagenet1k --flat-val``
that rehearses it. The commands run in process (CliRunner); the trees are generated once."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from ablate.cli import cli
from ablate.data.fake_imagenet import LABELS_FILE
from ablate.data.imagenet1k import CLASS_LIST, build_imagenet1k, imagenet1k_classes, read_val_labels
from ablate.data.imagenet100 import cmc_classes
from ablate.data.scan import scan_tree
from ablate.errors import AblateError

#: sha256 of timm's data/_info/imagenet_synsets.txt (timm 1.0), which imagenet1k_classes.txt copies
TIMM_SYNSETS_SHA256 = "70002b0ff5de60a3a17a82dbfcff291931f96225ddf941ad2e182fc39e183d15"
CLASSES = imagenet1k_classes()
VAL_PER_CLASS = 2


def data(*args: str):
    return CliRunner().invoke(cli, ["data", *map(str, args)])


def val_name(n: int) -> str:
    return f"ILSVRC2012_val_{n:08d}.JPEG"


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """1,000 classes x 1 train image, 2 validation images each, flat in val/ with Kaggle's labels."""
    root = tmp_path_factory.mktemp("fake") / "imagenet"
    result = data("fake-imagenet", "--out", root, "--classes", "imagenet1k", "--flat-val", "--train-per-class", 1,
                  "--val-per-class", VAL_PER_CLASS, "--max-side", 16)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def tree(tmp_path, generated) -> Path:
    """A copy of the generated tree that a test may break (the images hard links: never written to)."""
    def copy(src: str, dst: str) -> None:
        os.link(src, dst) if src.endswith(".JPEG") else shutil.copy2(src, dst)

    return Path(shutil.copytree(generated, tmp_path / "imagenet", copy_function=copy))


def lines(result) -> list[str]:
    return result.output.strip().splitlines()


def staging_left(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if "building" in p.name]


# ---- the class list and the generated tree -----------------------------------------------------

def test_class_list_is_timms_ilsvrc2012_list():
    ours = Path(__file__).resolve().parents[1] / "ablate" / "data" / CLASS_LIST
    timm = Path(importlib.util.find_spec("timm").origin).parent / "data" / "_info" / "imagenet_synsets.txt"
    assert hashlib.sha256(ours.read_bytes()).hexdigest() == TIMM_SYNSETS_SHA256
    assert hashlib.sha256(timm.read_bytes()).hexdigest() == TIMM_SYNSETS_SHA256
    assert len(CLASSES) == len(set(CLASSES)) == 1000 and CLASSES == sorted(CLASSES)
    assert set(cmc_classes()) <= set(CLASSES)


def test_fake_imagenet_writes_the_1000_classes_with_flat_val(generated):
    assert sorted(p.name for p in (generated / "train").iterdir()) == CLASSES
    val = sorted((generated / "val").iterdir())
    assert [p.name for p in val] == [val_name(n) for n in range(1, 1000 * VAL_PER_CLASS + 1)]
    labels = read_val_labels(generated / LABELS_FILE)
    assert len(labels) == 2000 and labels["ILSVRC2012_val_00000001"].wnid == CLASSES[0]
    assert labels["ILSVRC2012_val_00002000"].wnid == CLASSES[-1]
    with Image.open(val[0]) as image:
        assert max(image.size) <= 16
    assert (generated / LABELS_FILE).read_text().startswith("ImageId,PredictionString\nILSVRC2012_val_00000001,"
                                                            f"{CLASSES[0]} 0 0 ")


def test_fake_imagenet_refuses_decoys_and_mixed_val_layouts(tmp_path):
    result = data("fake-imagenet", "--out", tmp_path / "a", "--classes", "imagenet1k", "--decoys", 3)
    assert result.exit_code == 2 and lines(result) == [
        "error: --decoys: only with --classes imagenet100 (ImageNet-1K has no other classes)"]
    (tmp_path / "b" / "val" / "n01440764").mkdir(parents=True)
    result = data("fake-imagenet", "--out", tmp_path / "b", "--classes", "imagenet1k", "--flat-val")
    assert result.exit_code == 2 and len(lines(result)) == 1 and "already holds class folders" in result.output
    assert not (tmp_path / "b" / "train").exists()


# ---- building the root ----------------------------------------------------------------------------

def test_imagenet1k_sorts_flat_val_into_class_folders_of_links(tmp_path, generated):
    out = tmp_path / "in1k"
    result = data("imagenet1k", "--imagenet", generated, "--out", out)
    assert result.exit_code == 0, result.output
    assert lines(result) == [f"val: sorted into class folders by {generated / LABELS_FILE}",
                             f"ImageNet-1K: 1000 classes, 1000 train images, 2000 val images -> {out}"]
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in1k"]  # no staging folder left beside it
    train = out / "train" / CLASSES[3]
    assert train.is_symlink() and os.readlink(train) == str(generated / "train" / CLASSES[3])
    last = out / "val" / CLASSES[-1]
    assert not last.is_symlink() and sorted(p.name for p in last.iterdir()) == [val_name(1999), val_name(2000)]
    assert (last / val_name(2000)).resolve() == (generated / "val" / val_name(2000)).resolve()
    splits = scan_tree(out)  # what data.name: imagefolder reads
    assert splits["train"].classes == CLASSES and len(splits["train"].samples) == 1000
    assert len(splits["val"].samples) == 2000 and not splits["val"].skipped


def test_imagenet1k_links_val_class_folders_as_they_are(tmp_path, generated):
    sorted_tree = tmp_path / "sorted"
    build_imagenet1k(generated, sorted_tree)  # val/<wnid>/ folders, as valprep.sh leaves them
    out = tmp_path / "in1k"
    result = data("imagenet1k", "--imagenet", sorted_tree, "--out", out, "--val-labels", tmp_path / "unused.csv")
    assert result.exit_code == 0, result.output
    assert lines(result) == [f"--val-labels: not used: {sorted_tree}/val is already in class folders",
                             f"ImageNet-1K: 1000 classes, 1000 train images, 2000 val images -> {out}"]
    val = out / "val" / CLASSES[0]
    assert val.is_symlink() and os.readlink(val) == str(sorted_tree / "val" / CLASSES[0])
    assert len(scan_tree(out)["val"].samples) == 2000


def test_imagenet1k_reads_plain_labels_files(tmp_path, tree):
    labels = read_val_labels(tree / LABELS_FILE)
    (tree / LABELS_FILE).unlink()
    result = data("imagenet1k", "--imagenet", tree, "--out", tmp_path / "none")
    assert result.exit_code == 2 and len(lines(result)) == 1 and "no labels file was found" in result.output
    assert "--val-labels FILE" in result.output and not (tmp_path / "none").exists()

    two_columns = tmp_path / "labels.txt"  # <file name> <wnid>, in any order, with a comment
    two_columns.write_text("# file wnid\n" + "".join(f"{k}.JPEG {v.wnid}\n" for k, v in reversed(labels.items())))
    result = data("imagenet1k", "--imagenet", tree, "--out", tmp_path / "a", "--val-labels", two_columns)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a" / "val" / CLASSES[1]).iterdir()) == [val_name(3), val_name(4)]

    # TensorFlow's one wnid per line, found beside the tree
    one_column = tmp_path / "imagenet_2012_validation_synset_labels.txt"
    one_column.write_text("".join(f"{v.wnid}\n" for v in labels.values()))
    result = data("imagenet1k", "--imagenet", tree, "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert f"by {one_column}" in result.output
    assert sorted(p.name for p in (tmp_path / "b" / "val" / CLASSES[1]).iterdir()) == [val_name(3), val_name(4)]


def test_imagenet1k_force_replaces_train_and_val_only(tmp_path, generated):
    out = tmp_path / "in1k"
    build_imagenet1k(generated, out)
    (out / ".ablate-cache").mkdir()
    shutil.rmtree(out / "val" / CLASSES[0])
    result = data("imagenet1k", "--imagenet", generated, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [".ablate-cache", "train", "val"]
    assert len(list((out / "val" / CLASSES[0]).iterdir())) == VAL_PER_CLASS and not staging_left(out)


# ---- what is wrong: one line each, exit 2, nothing written -----------------------------------------

def _missing_class(tree: Path, tmp_path: Path) -> list[str]:
    shutil.rmtree(tree / "train" / CLASSES[7])
    return []


def _unlabelled_image(tree: Path, tmp_path: Path) -> list[str]:
    shutil.copy(tree / "val" / val_name(1), tree / "val" / val_name(49_999))
    return []


def _unknown_wnid(tree: Path, tmp_path: Path) -> list[str]:
    text = (tree / LABELS_FILE).read_text().replace(f"{val_name(3)[:-5]},{CLASSES[1]}", f"{val_name(3)[:-5]},n99999999")
    (tmp_path / "labels.csv").write_text(text)
    return ["--val-labels", str(tmp_path / "labels.csv")]


def _unreadable_labels(tree: Path, tmp_path: Path) -> list[str]:
    (tmp_path / "labels.csv").write_bytes(b"\xff\xfe\x00garbage")
    return ["--val-labels", str(tmp_path / "labels.csv")]


def _absent_labels(tree: Path, tmp_path: Path) -> list[str]:
    return ["--val-labels", str(tmp_path / "nowhere.csv")]


def _malformed_labels(tree: Path, tmp_path: Path) -> list[str]:
    (tree / LABELS_FILE).write_text((tree / LABELS_FILE).read_text() + "ILSVRC2012_val_00002001\n")
    return []


def _path_in_labels(tree: Path, tmp_path: Path) -> list[str]:
    (tmp_path / "labels.txt").write_text(f"../train/{CLASSES[0]}/{CLASSES[0]}_1.JPEG {CLASSES[0]}\n")
    return ["--val-labels", str(tmp_path / "labels.txt")]


def _half_sorted_val(tree: Path, tmp_path: Path) -> list[str]:
    (tree / "val" / CLASSES[0]).mkdir()
    shutil.move(tree / "val" / val_name(1), tree / "val" / CLASSES[0] / val_name(1))
    return []


def _out_not_empty(tree: Path, tmp_path: Path) -> list[str]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    return []


def _out_inside_the_tree(tree: Path, tmp_path: Path) -> list[str]:
    return ["--out", str(tree / "train" / "in1k")]


def _out_under_a_file(tree: Path, tmp_path: Path) -> list[str]:
    (tmp_path / "a-file").write_text("")
    return ["--out", str(tmp_path / "a-file" / "in1k")]


BROKEN = {
    "missing class": (_missing_class, f"train/ lacks 1 of the 1000 classes: {CLASSES[7]}"),
    "unlabelled image": (_unlabelled_image, f"1 image(s) in {{tree}}/val have no label: {val_name(49_999)} "),
    "unknown wnid": (_unknown_wnid, "1 label(s) name unknown wnids: n99999999 (line 4) (allowed: the 1000 ILSVRC-2012"),
    "unreadable labels": (_unreadable_labels, "labels.csv: not a text file (allowed: Kaggle's LOC_val_solution.csv"),
    "absent labels": (_absent_labels, "nowhere.csv: cannot read it (No such file or directory;"),
    "malformed labels": (_malformed_labels, f"{LABELS_FILE}:2002: 1 line(s) are not 'ImageId,<wnid> ...'"),
    "path in labels": (_path_in_labels, "is a path; 1 line(s) name files outside val/"),
    "half-sorted val": (_half_sorted_val, "holds 1 class folders and 1999 images outside them"),
    "out not empty": (_out_not_empty, "is not empty (allowed: a new or empty directory, or --force"),
    "out inside the tree": (_out_inside_the_tree, "overlaps --imagenet"),
    "out under a file": (_out_under_a_file, "a-file/in1k: cannot write "),
}


@pytest.mark.parametrize("case", BROKEN)
def test_imagenet1k_names_each_problem_on_one_line_and_writes_nothing(tmp_path, tree, case):
    breaking, expected = BROKEN[case]
    args = ["--out", str(tmp_path / "out"), *breaking(tree, tmp_path)]
    before = sorted(tmp_path.rglob("*"))
    result = data("imagenet1k", "--imagenet", tree, *args)
    assert result.exit_code == 2, result.output
    assert len(lines(result)) == 1 and lines(result)[0].startswith("error: ") and "Traceback" not in result.output
    assert expected.format(tree=tree) in result.output, result.output
    assert sorted(tmp_path.rglob("*")) == before  # no OUT, no staging folder, nothing changed


def test_imagenet1k_reports_every_problem_at_once(tmp_path, tree):
    _missing_class(tree, tmp_path)
    _unlabelled_image(tree, tmp_path)
    _out_not_empty(tree, tmp_path)
    result = data("imagenet1k", "--imagenet", tree, "--out", tmp_path / "out")
    assert result.exit_code == 2 and len(lines(result)) == 3, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_read_val_labels_takes_the_first_box_of_kaggle_rows(tmp_path):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text("\ufeffImageId,PredictionString\n"
                    "ILSVRC2012_val_00000002,n01443537 1 2 3 4 n01443537 5 6 7 8 \n\n"
                    "ILSVRC2012_val_00000001,n01440764 0 0 9 9\n")
    assert {k: v.wnid for k, v in read_val_labels(path).items()} == {
        "ILSVRC2012_val_00000002": "n01443537", "ILSVRC2012_val_00000001": "n01440764"}
    path.write_text("a.JPEG n01440764\na.JPEG n01443537\n")
    with pytest.raises(AblateError, match=r":2: a.JPEG is labelled n01440764 on line 1 and n01443537 here"):
        read_val_labels(path)


def test_a_build_that_stops_half_way_leaves_nothing(tmp_path, generated, monkeypatch):
    link, made = os.symlink, []

    def full_disk(src, dst, **kwargs):
        if len(made) == 1500:
            raise OSError(28, "No space left on device", str(dst))
        made.append(dst)
        link(src, dst, **kwargs)

    monkeypatch.setattr(os, "symlink", full_disk)
    result = data("imagenet1k", "--imagenet", generated, "--out", tmp_path / "in1k")
    assert result.exit_code == 2 and len(lines(result)) == 1 and "No space left on device" in result.output
    assert list(tmp_path.iterdir()) == []
