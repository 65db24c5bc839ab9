"""Few-shot splits, base/new halves and manifests: determinism down to the bytes."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from saft.data.fewshot import (
    FewShotError,
    select_few_shot,
    shot_order,
    split_base_new,
    subsample_classes,
)
from saft.data.imagefolder import ImageEntry, scan_image_folder
from saft.data.manifest import (
    ManifestEntry,
    ManifestError,
    hash_entries,
    manifest_classes,
    manifest_hash,
    read_manifest,
    write_manifest,
)


def synthetic(classes: int = 3, per_class: int = 10) -> list[ImageEntry]:
    return [
        ImageEntry(path=f"c{c}/img{i:03d}.png", label=c, class_name=f"c{c}")
        for c in range(classes)
        for i in range(per_class)
    ]


def fake_manifest(entries: list[ImageEntry]) -> list[ManifestEntry]:
    return [
        ManifestEntry(e.path, e.label, e.class_name, hashlib.sha256(e.path.encode()).hexdigest()) for e in entries
    ]


# --- split selection -------------------------------------------------------------------


GOLDEN_TRAIN = ["c0/img002.png", "c0/img008.png", "c1/img007.png", "c1/img008.png", "c2/img004.png", "c2/img009.png"]
GOLDEN_VAL = ["c0/img005.png", "c1/img005.png", "c2/img008.png"]


def test_selection_is_pinned() -> None:
    """Golden values: a change here changes every published split, so it must be deliberate."""
    split = select_few_shot(synthetic(), shots=2, seed=1, val_shots=1)
    assert [e.path for e in split.train] == GOLDEN_TRAIN
    assert [e.path for e in split.val] == GOLDEN_VAL


def test_selection_ignores_input_order() -> None:
    entries = synthetic()
    shuffled = entries[:]
    random.Random(7).shuffle(shuffled)
    assert select_few_shot(entries, 4, seed=3) == select_few_shot(shuffled, 4, seed=3)


def test_seeds_differ_and_shots_nest() -> None:
    entries = synthetic(per_class=40)
    a, b = select_few_shot(entries, 4, seed=0), select_few_shot(entries, 4, seed=1)
    assert a.train != b.train
    nested = [set(select_few_shot(entries, k, seed=5).train) for k in (1, 2, 4, 8, 16)]
    assert all(small < large for small, large in zip(nested, nested[1:]))
    assert all(len(s) == 3 * k for s, k in zip(nested, (1, 2, 4, 8, 16)))


def test_train_and_val_are_disjoint_per_class() -> None:
    split = select_few_shot(synthetic(), 3, seed=2, val_shots=2)
    assert not set(split.train) & set(split.val)
    for c in ("c0", "c1", "c2"):
        assert sum(e.class_name == c for e in split.train) == 3
        assert sum(e.class_name == c for e in split.val) == 2
    assert [e.path for e in split.train] == sorted(e.path for e in split.train)


def test_order_depends_on_path_not_on_other_classes() -> None:
    only_c0 = [e for e in synthetic() if e.class_name == "c0"]
    full = select_few_shot(synthetic(), 2, seed=9)
    alone = select_few_shot(only_c0, 2, seed=9)
    assert [e for e in full.train if e.class_name == "c0"] == list(alone.train)
    assert shot_order(only_c0, 9)[:2] == sorted(alone.train, key=lambda e: shot_order(only_c0, 9).index(e))


def test_short_class_is_an_error_unless_allowed() -> None:
    entries = synthetic(per_class=10) + [ImageEntry("small/a.png", 3, "small"), ImageEntry("small/b.png", 3, "small")]
    with pytest.raises(FewShotError, match=r"1 class\(es\) have fewer than 4 images.*'small' \(2\)"):
        select_few_shot(entries, 3, seed=0, val_shots=1)
    split = select_few_shot(entries, 3, seed=0, val_shots=1, allow_fewer=True)
    assert sum(e.class_name == "small" for e in split.train) == 2
    assert sum(e.class_name == "small" for e in split.val) == 0


def test_all_shots_and_bad_arguments() -> None:
    entries = synthetic()
    assert len(select_few_shot(entries, None, seed=0).train) == 30
    for bad in (0, -1, 1.5, True, "4"):
        with pytest.raises(FewShotError, match="shots must be"):
            select_few_shot(entries, bad, seed=0)  # type: ignore[arg-type]
    with pytest.raises(FewShotError, match="seed must be an integer"):
        select_few_shot(entries, 1, seed="0")  # type: ignore[arg-type]
    with pytest.raises(FewShotError, match="listed twice"):
        select_few_shot(entries + entries[:1], 1, seed=0)
    with pytest.raises(FewShotError, match=r"have no images: 'c9'"):
        select_few_shot(entries, 1, seed=0, classes=["c0", "c1", "c2", "c9"])


# --- base / new ------------------------------------------------------------------------


def test_base_new_halves() -> None:
    assert split_base_new(["a", "b", "c", "d"]) == (["a", "b"], ["c", "d"])
    assert split_base_new(["a", "b", "c", "d", "e"]) == (["a", "b", "c"], ["d", "e"])  # ceil, as CoOp
    with pytest.raises(FewShotError, match="at least 2"):
        split_base_new(["a"])
    with pytest.raises(FewShotError, match="duplicate"):
        split_base_new(["a", "a"])


def test_subsample_relabels_new_half() -> None:
    entries = synthetic(classes=5, per_class=2)
    classes = [f"c{i}" for i in range(5)]
    base, base_classes = subsample_classes(entries, classes, "base")
    new, new_classes = subsample_classes(entries, classes, "new")
    assert base_classes == ["c0", "c1", "c2"] and new_classes == ["c3", "c4"]
    assert {(e.class_name, e.label) for e in new} == {("c3", 0), ("c4", 1)}
    assert {(e.class_name, e.label) for e in base} == {("c0", 0), ("c1", 1), ("c2", 2)}
    kept, _ = subsample_classes(entries, classes, "new", relabel=False)
    assert {e.label for e in kept} == {3, 4}
    assert len(subsample_classes(entries, classes, "all")[0]) == 10
    with pytest.raises(FewShotError, match="half must be"):
        subsample_classes(entries, classes, "odd")  # type: ignore[arg-type]
    with pytest.raises(FewShotError, match="missing from the class list"):
        subsample_classes(entries, classes[:4], "base")


# --- manifests -------------------------------------------------------------------------


GOLDEN_MANIFEST_HASH = "dc9ead90e007be2f1817dd26ae2d61bb7466dd0c7fb7f0b55726ea3fc3733840"


def test_manifest_bytes_and_hash_are_pinned(tmp_path: Path) -> None:
    entries = fake_manifest(synthetic(classes=2, per_class=2))
    entries.append(ManifestEntry("é/ü.png", 2, "café", "f" * 64))
    digest = write_manifest(tmp_path / "m.jsonl", reversed(entries))
    text = (tmp_path / "m.jsonl").read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert first == (
        '{"class_name":"c0","label":0,"path":"c0/img000.png","sha256":"'
        + hashlib.sha256(b"c0/img000.png").hexdigest()
        + '"}'
    )
    assert text.splitlines()[-1] == '{"class_name":"café","label":2,"path":"é/ü.png","sha256":"' + "f" * 64 + '"}'
    assert text.endswith("\n")
    assert digest == manifest_hash(tmp_path / "m.jsonl") == hashlib.sha256(text.encode()).hexdigest()
    assert digest == GOLDEN_MANIFEST_HASH


def test_same_inputs_give_byte_identical_manifests(image_tree: Path, tmp_path: Path) -> None:
    index = scan_image_folder(image_tree)
    shuffled = list(index.entries)
    random.Random(1).shuffle(shuffled)
    one = write_manifest(tmp_path / "a.jsonl", hash_entries(image_tree, select_few_shot(index.entries, 2, 0).train))
    two = write_manifest(tmp_path / "b.jsonl", hash_entries(image_tree, select_few_shot(shuffled, 2, 0).train, workers=1))
    assert one == two
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    other = write_manifest(tmp_path / "c.jsonl", hash_entries(image_tree, select_few_shot(index.entries, 2, 1).train))
    assert other != one
    back = read_manifest(tmp_path / "a.jsonl")
    assert len(back) == 8 and all(
        e.sha256 == hashlib.sha256((image_tree / e.path).read_bytes()).hexdigest() for e in back
    )
    assert manifest_classes(back) == {0: "ant", 1: "bee", 2: "cat", 3: "dog"}


def test_s3_manifest_equals_local_manifest(s3_bucket, image_tree: Path, upload, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    upload(client, bucket, image_tree, "tree")
    remote = scan_image_folder(f"s3://{bucket}/tree")
    local = scan_image_folder(image_tree)
    a = write_manifest(tmp_path / "s3.jsonl", hash_entries(f"s3://{bucket}/tree", select_few_shot(remote.entries, 3, 4).train))
    b = write_manifest(tmp_path / "local.jsonl", hash_entries(image_tree, select_few_shot(local.entries, 3, 4).train))
    assert a == b


def test_failed_hashing_writes_nothing(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.jsonl"
    out.write_text("previous manifest\n")
    entries = list(scan_image_folder(image_tree).entries) + [ImageEntry("ant/gone.png", 0, "ant")]
    with pytest.raises(FileNotFoundError, match="gone.png"):
        write_manifest(out, hash_entries(image_tree, entries))
    with pytest.raises(ManifestError, match="'..'"):
        hash_entries(image_tree, [ImageEntry("../x.png", 0, "ant")])
    assert out.read_text() == "previous manifest\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl", "tree"]


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (ManifestEntry("../x.png", 0, "a", "0" * 64), "'..'"),
        (ManifestEntry("/abs/x.png", 0, "a", "0" * 64), "absolute"),
        (ManifestEntry("a/x.png", -1, "a", "0" * 64), "'label'"),
        (ManifestEntry("a/x.png", 0, "", "0" * 64), "'class_name'"),
        (ManifestEntry("a/x.png", 0, "a", "XYZ"), "'sha256'"),
        (ManifestEntry("c0/img000.png", 0, "c0", "1" * 64), "already listed"),
        (ManifestEntry("a/x.png", 0, "other", "0" * 64), "label 0 is class"),
    ],
)
def test_write_refuses_bad_entries_and_keeps_old_file(tmp_path: Path, bad: ManifestEntry, needle: str) -> None:
    out = tmp_path / "m.jsonl"
    good = fake_manifest(synthetic(classes=1, per_class=2))
    write_manifest(out, good)
    before = out.read_bytes()
    with pytest.raises(ManifestError, match=needle):
        write_manifest(out, good + [bad])
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


GOOD_LINE = '{"class_name":"a","label":0,"path":"a/x.png","sha256":"' + "0" * 64 + '"}'


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"path":"a/y.png","label":0,"class_name":"a"}', "missing field.*sha256"),
        (GOOD_LINE[:-1] + ',"extra":1}', "unknown field.*extra"),
        (GOOD_LINE.replace('"a/x.png"', '"../y.png"'), "field 'path'.*'..'"),
        (GOOD_LINE.replace('"a/x.png"', '"/etc/y.png"'), "field 'path'.*absolute"),
        (GOOD_LINE.replace('"label":0', '"label":"0"'), "field 'label'"),
        (GOOD_LINE.replace('"label":0', '"label":true'), "field 'label'"),
        (GOOD_LINE.replace('"0000', '"zzzz'), "field 'sha256'"),
        ("", "blank line"),
        (GOOD_LINE, "already listed at .*m.jsonl:2"),
        (GOOD_LINE.replace('"a/x.png"', '"a/z.png"').replace('"label":0', '"label":1'), "class 'a' has label 1"),
    ],
)
def test_reader_names_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([GOOD_LINE.replace("x.png", "w.png"), GOOD_LINE, line, GOOD_LINE.replace("x.png", "v.png")]) + "\n")
    with pytest.raises(ManifestError, match=rf"m\.jsonl:3: .*{needle}"):
        read_manifest(path)


def test_reader_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "absent.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ManifestError, match="has no entries"):
        read_manifest(empty)
    assert read_manifest(empty, allow_empty=True) == []
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(GOOD_LINE.encode() + b"\n\xff\xfe\n")
    with pytest.raises(ManifestError, match=r"bin\.jsonl:2: not valid UTF-8"):
        read_manifest(binary)
    parsed = json.loads(GOOD_LINE)
    no_newline = tmp_path / "nonl.jsonl"
    no_newline.write_text(GOOD_LINE)
    assert read_manifest(no_newline) == [ManifestEntry(**parsed)]
