"""Data versions (saft.steps.data_version): what a pipeline's caches follow.

A plain folder (its listing), an S3 prefix (its listing with ETags, on a local moto
server), a DVC-tracked folder at two git revisions of a real git + DVC repository
(read back at the old revision through DVC's API, and prepared from it), and the
embedded world (its parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dvc_repos import make_dvc_repo
from image_trees import write_image, write_tree

from saft.steps.data_version import DataVersionError, resolve_data_version, world_version


def test_a_folder_version_follows_its_files(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "tree")
    first = resolve_data_version(str(root))
    assert first.kind == "files" and first.files == 24 and first.version.startswith("files-")
    assert resolve_data_version(str(root)).version == first.version  # nothing changed
    write_image(root / "ant" / "new.png", 999)
    added = resolve_data_version(str(root))
    assert added.version != first.version and added.files == 25
    with pytest.raises(DataVersionError, match=f"data.version is '{first.version}' but .* is now {added.version}"):
        resolve_data_version(str(root), expected=first.version)
    assert resolve_data_version(str(root), expected=added.version) == added
    with pytest.raises(DataVersionError, match="not inside a DVC repository"):
        resolve_data_version(str(root), rev="main")


def test_the_world_version_follows_its_parameters() -> None:
    assert world_version(64, 100) == resolve_data_version("", pool_per_class=64, test_per_class=100)
    assert world_version(64, 100).version != world_version(32, 100).version
    with pytest.raises(DataVersionError, match="need a data.root"):
        resolve_data_version("", rev="abc")


def test_an_s3_prefix_version_follows_keys_and_etags(s3_bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    root = write_tree(tmp_path / "tree")
    for path in sorted(root.rglob("*.*")):
        client.put_object(Bucket=bucket, Key=f"ds/{path.relative_to(root).as_posix()}", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="other/ant/x.png", Body=b"not under the prefix")
    first = resolve_data_version(f"s3://{bucket}/ds")
    assert first.kind == "s3" and first.files == 24
    client.put_object(Bucket=bucket, Key="ds/ant/img00.png", Body=(root / "ant" / "img00.png").read_bytes())
    assert resolve_data_version(f"s3://{bucket}/ds").version == first.version  # same bytes, same ETag
    client.put_object(Bucket=bucket, Key="ds/ant/img00.png", Body=(root / "bee" / "img00.png").read_bytes())
    assert resolve_data_version(f"s3://{bucket}/ds").version != first.version  # rewritten in place
    with pytest.raises(DataVersionError, match="holds no objects"):
        resolve_data_version(f"s3://{bucket}/nothing-here")
    with pytest.raises(DataVersionError, match="applies to DVC-tracked data"):
        resolve_data_version(f"s3://{bucket}/ds", rev="abc")


@pytest.fixture
def dvc_repo(tmp_path: Path, monkeypatch) -> tuple[Path, str, str]:
    """A git + DVC repository whose data/ds has two committed versions; returns (repo, rev1, rev2)."""
    repo = tmp_path / "repo"
    rev1, rev2 = make_dvc_repo(repo, monkeypatch)
    return repo, rev1, rev2


def test_a_dvc_folder_is_versioned_and_read_at_a_git_revision(dvc_repo, tmp_path: Path) -> None:
    from saft.data.dvc_storage import DvcStorage
    from saft.data.prepare import PrepareConfig
    from saft.orchestration.tasks import prepare_task, prepared_root

    repo, rev1, rev2 = dvc_repo
    root = str(repo / "data" / "ds")
    v1, v2, work = (resolve_data_version(root, rev=rev1), resolve_data_version(root, rev=rev2),
                    resolve_data_version(root))
    assert v1.kind == v2.kind == work.kind == "dvc" and (v1.files, v2.files) == (24, 27)
    assert v1.version != v2.version and work.version == v2.version  # the working tree is at v2
    md5 = yaml_md5(repo / "data" / "ds.dvc")
    assert v2.version == f"dvc-{md5}"  # DVC's own hash of the folder, as its .dvc file records it
    assert resolve_data_version(root, rev="HEAD~1").version == v1.version
    old = DvcStorage(repo, "data/ds", rev1)
    assert "cat/extra0.png" not in old.list_files() and len(old.list_files()) == 24
    assert old.read_bytes("ant/img00.png") == (repo / "data" / "ds" / "ant" / "img00.png").read_bytes()

    out = tmp_path / "prepared"
    draw = PrepareConfig(dataset="imagefolder", shots=2, val_shots=1, seed=1)
    prepare_task(str(tmp_path / "no-world"), str(out), draw, data_root=root, data_version=v1.version, data_rev=rev1)
    recorded = json.loads((out / "data_version.json").read_text())
    assert recorded["version"] == v1.version and recorded["rev"] == rev1 and recorded["kind"] == "dvc"
    drawn = [json.loads(line)["path"] for name in ("train.jsonl", "val.jsonl")
             for line in (out / name).read_text().splitlines()]
    assert len(drawn) == 12 and not any("extra" in p for p in drawn)
    files = Path(prepared_root(str(out)))
    assert sorted(p.relative_to(files).as_posix() for p in files.rglob("*.*")) == sorted(drawn)
    for rel in drawn:  # the copies are the revision's bytes
        assert (files / rel).read_bytes() == old.read_bytes(rel)
    with pytest.raises(DataVersionError, match="the data changed since"):
        prepare_task(str(tmp_path / "no-world"), str(tmp_path / "again"), draw, data_root=root,
                     data_version=v1.version)  # the working tree is v2


def yaml_md5(dvc_file: Path) -> str:
    import yaml

    return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"].removesuffix(".dir")


def test_a_folder_dvc_does_not_track_is_a_plain_folder(dvc_repo) -> None:
    repo, rev1, _ = dvc_repo
    write_tree(repo / "loose")
    assert resolve_data_version(str(repo / "loose")).kind == "files"
    with pytest.raises(DataVersionError, match=f"loose does not exist in {repo} at revision {rev1}"):
        resolve_data_version(str(repo / "loose"), rev=rev1)
    with pytest.raises(DataVersionError, match="not inside the repository"):
        resolve_data_version(str(repo.parent / "elsewhere"), repo=str(repo))
