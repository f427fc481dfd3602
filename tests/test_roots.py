"""Several roots in one library (`mocoretrieval.roots`, `library`, `library_walk`, `roots_table`):
indexed together, searched together, removed, offline and back, moved, an index made before
roots existed, the app's path guard, and overlapping roots refused.

Each test that guards a mechanism says how the mechanism was broken to watch it fail."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from factories import make_images

from app.thumbnails import PathOutsideRootError, resolve_in_root
from mocoretrieval import embed
from mocoretrieval.cli import main
from mocoretrieval.index import ImageIndex
from mocoretrieval.roots import RootError

WORKERS = 0


@pytest.fixture
def two_roots(tmp_path):
    """Two folders whose files have the same names (``img_0000.jpg``...): only the root tells
    them apart."""
    photos, nas = tmp_path / "photos", tmp_path / "mnt" / "nas"
    make_images(photos, 4)
    make_images(nas, 3, seed=1)
    return photos, nas, tmp_path / "library"


@pytest.fixture
def library(two_roots, tiny_encoder):
    photos, nas, lib = two_roots
    index = ImageIndex.build([photos, nas], model=tiny_encoder, index_dir=lib, workers=WORKERS)
    yield index
    index.close()


def _no_model_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an image was embedded again")

    monkeypatch.setattr(embed, "iter_embeddings", refuse)


def test_two_roots_are_indexed_and_searched_together(library, two_roots):
    """Mutation: `Root.key` returning the relative path alone (no root name): the two folders'
    same-named files collide on one key, 4 entries instead of 7, and hits name the wrong file."""
    photos, nas, _ = two_roots
    assert len(library) == 7
    assert [r.name for r in library.roots] == ["photos", "nas"]
    assert library.paths()[:3] == ["nas/img_0000.jpg", "nas/img_0001.png", "nas/img_0002.jpg"]
    for folder, name in ((photos, "photos"), (nas, "nas")):
        hit = library.search(folder / "img_0001.png", k=1)[0]
        assert hit.path == str(folder / "img_0001.png") and hit.relpath == f"{name}/img_0001.png"
        assert library.absolute(hit.relpath) == folder / "img_0001.png"
        assert library.relative(folder / "img_0001.png") == hit.relpath
    found = {r.path for r in library.search(nas / "img_0000.jpg", k=7)}
    assert found == {str(p) for p in [*photos.iterdir(), *nas.iterdir()]}
    assert library.update(workers=WORKERS).added == []  # a rerun finds nothing new


def test_removing_a_root_drops_its_entries(library, two_roots):
    """Mutation: `remove_root` without `store.remove(keys)`: the entries stay (7, and the nas
    files are still found)."""
    photos, nas, _ = two_roots
    assert library.remove_root("nas") == 3
    assert len(library) == 4 and [r.name for r in library.roots] == ["photos"]
    assert all(r.path.startswith(str(photos)) for r in library.search(nas / "img_0000.jpg", k=7))
    assert len(list(nas.iterdir())) == 3  # the files are not touched
    assert library.update(workers=WORKERS).added == []
    with pytest.raises(RootError, match="only root"):
        library.remove_root("photos")


def test_offline_root_keeps_its_entries_and_comes_back_without_reembedding(
    library, two_roots, monkeypatch
):
    """Mutation: `offline_reason` returning None: the missing root raises (not a folder), and the
    empty mount point counts its 3 files as deleted."""
    _, nas, _ = two_roots
    away = nas.with_name("nas-away")
    nas.rename(away)
    report = library.update(workers=WORKERS)
    assert report.removed == [] and len(library) == 7
    assert report.offline == {str(nas): ("folder missing (unmounted or moved?)", 3)}
    state = {r["name"]: r for r in library.info()["roots"]}
    assert state["nas"]["state"] == "offline" and state["nas"]["files"] == 3
    assert state["photos"]["state"] == "online"

    nas.mkdir()  # an unmounted drive: its mount point is an empty folder
    report = library.update(workers=WORKERS)
    assert report.removed == [] and len(library) == 7
    assert report.offline[str(nas)] == ("folder empty (an unmounted drive?)", 3)

    nas.rmdir()
    away.rename(nas)
    _no_model_work(monkeypatch)
    report = library.update(workers=WORKERS)
    assert (report.added, report.updated, report.removed, report.offline) == ([], [], [], {})
    assert library.roots_info()[1]["state"] == "online"


def test_prune_empty_forgets_an_empty_root_but_never_a_missing_one(library, two_roots):
    _, nas, _ = two_roots
    shutil.rmtree(nas)
    assert library.update(workers=WORKERS, prune_empty=True).removed == []  # missing: kept
    nas.mkdir()
    assert len(library.update(workers=WORKERS, prune_empty=True).removed) == 3
    assert len(library) == 4


def test_moving_the_index_folder_and_a_root(library, two_roots, tiny_encoder, monkeypatch):
    """Mutation: `move_root` without `table.move` (the row keeps the old folder): the root it
    returns, and the library's, is still at the old folder (then offline, with old paths)."""
    _, nas, lib = two_roots
    library.close()
    moved_lib = lib.with_name("library-moved")
    shutil.move(lib, moved_lib)
    index = ImageIndex.open(moved_lib, model=tiny_encoder)
    hit = index.search(nas / "img_0002.jpg", k=1)[0]
    assert hit.path == str(nas / "img_0002.jpg") and len(index) == 7

    new = nas.parent / "bigger-disk" / "nas"
    new.parent.mkdir()
    shutil.move(nas, new)  # a move keeps sizes and mtimes: nothing to re-embed
    root = index.move_root(nas, new)
    assert root.name == "nas" and root.path == new
    _no_model_work(monkeypatch)
    report = index.update(workers=WORKERS)
    assert (report.added, report.updated, report.removed, report.offline) == ([], [], [], {})
    assert index.search(new / "img_0002.jpg", k=1)[0].path == str(new / "img_0002.jpg")
    index.close()


def test_a_default_index_inside_its_root_moves_with_it(tmp_path, tiny_encoder):
    root = tmp_path / "photos"
    make_images(root, 3)
    ImageIndex.build(root, model=tiny_encoder, workers=WORKERS).close()
    shutil.move(root, tmp_path / "renamed")
    index = ImageIndex.open(tmp_path / "renamed", model=tiny_encoder)
    assert index.root == tmp_path / "renamed" and len(index) == 3
    assert index.search(tmp_path / "renamed" / "img_0000.jpg", k=1)[0].relpath == "img_0000.jpg"
    index.close()


def _make_old(index_dir):
    """The layout of an index made before roots: no roots table, manifest format 1."""
    db = sqlite3.connect(index_dir / "index.db")
    db.execute("DROP TABLE roots")
    db.commit()
    db.close()
    manifest = json.loads((index_dir / "manifest.json").read_text())
    manifest["format_version"] = 1
    (index_dir / "manifest.json").write_text(json.dumps(manifest))


def test_an_old_single_root_index_opens_works_and_takes_a_second_root(
    tmp_path, tiny_encoder, monkeypatch
):
    """Mutation: `RootTable.add` without prefixing the first root's keys: its 4 files are keys
    of no root once it has a name; the update removes them (removed is not empty) and embeds
    them again."""
    root, other = tmp_path / "photos", tmp_path / "nas"
    make_images(root, 4)
    make_images(other, 3, seed=1)
    index = ImageIndex.build(root, model=tiny_encoder, workers=WORKERS)
    index.mark_not_duplicates(["img_0000.jpg", "img_0001.png"])
    index.close()
    _make_old(root / ".mocoretrieval")

    old = ImageIndex.open(root, model=tiny_encoder)  # read as it is: nothing written
    assert old.paths()[0] == "img_0000.jpg" and old.info()["format_version"] == 1
    assert old.search(root / "img_0003.png", k=1)[0].path == str(root / "img_0003.png")
    assert old.update(workers=WORKERS).added == []  # the first writer migrates it
    assert old.info()["format_version"] == 2 and old.roots[0].bare
    old.close()

    grown = ImageIndex.build(
        [root, other], model=tiny_encoder, index_dir=root / ".mocoretrieval", workers=WORKERS
    )
    report = grown.last_report
    assert report.added_roots == [str(other)] and report.removed == []
    assert sorted(report.added) == ["nas/img_0000.jpg", "nas/img_0001.png", "nas/img_0002.jpg"]
    assert "photos/img_0000.jpg" in grown.paths() and len(grown) == 7
    assert grown.store.not_duplicates() == [("photos/img_0000.jpg", "photos/img_0001.png")]
    grown.close()


def test_the_manifest_says_format_2_and_names_the_first_root(library, two_roots):
    manifest = json.loads((two_roots[2] / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["root"] == str(two_roots[0])


def test_the_app_path_guard_accepts_every_root_and_nothing_else(library, two_roots, tmp_path):
    """Mutation: `Roots.locate` ignoring the name (every key resolved in the first root): the
    nas keys are refused, `photos/../mnt/nas/...` is not checked against the right root."""
    from fastapi.testclient import TestClient

    from app.api import API_PREFIX
    from app.server import build_server

    photos, nas, _ = two_roots
    (tmp_path / "secret.jpg").write_bytes((photos / "img_0000.jpg").read_bytes())
    (photos / "link_to_nas.jpg").symlink_to(nas / "img_0000.jpg")
    roots = library.roots
    assert resolve_in_root(roots, "photos/img_0000.jpg") == photos / "img_0000.jpg"
    assert resolve_in_root(roots, "nas/img_0002.jpg") == nas / "img_0002.jpg"
    for bad in (
        "../secret.jpg",
        "photos/../secret.jpg",
        "photos/../mnt/nas/img_0000.jpg",
        "photos/link_to_nas.jpg",  # resolves into another root: not its own
        "elsewhere/img_0000.jpg",
        "img_0000.jpg",
        str(tmp_path / "secret.jpg"),
    ):
        with pytest.raises(PathOutsideRootError):
            resolve_in_root(roots, bad)

    with TestClient(build_server(library, k=5), raise_server_exceptions=False) as http:
        for key in ("photos/img_0001.png", "nas/img_0001.png"):
            assert http.get(f"{API_PREFIX}/thumbnail/{key}").status_code == 200
        for bad in ("photos/../../secret.jpg", "elsewhere/img_0000.jpg", "..%2Fsecret.jpg"):
            assert http.get(f"{API_PREFIX}/thumbnail/{bad}").status_code in (400, 404)
        body = http.post(
            f"{API_PREFIX}/search",
            files={"image": ("q.png", (nas / "img_0001.png").read_bytes(), "image/png")},
        ).json()
        assert body["results"][0]["path"] == "nas/img_0001.png"
        info = http.get(f"{API_PREFIX}/info").json()
        assert [r["name"] for r in info["roots"]] == ["photos", "nas"]
        assert str(nas) not in json.dumps(info)  # folders stay on the server


def test_overlapping_roots_are_refused(two_roots, tiny_encoder, library):
    """Mutation: `check_disjoint` that returns at once: a root inside another is accepted and
    its files would be indexed twice."""
    photos, nas, lib = two_roots
    (photos / "sub").mkdir()
    with pytest.raises(RootError, match="must not overlap"):
        ImageIndex.create([photos, photos / "sub"], model=tiny_encoder, index_dir=lib.parent / "x")
    for bad in (photos / "sub", nas.parent, photos):
        with pytest.raises(RootError, match="overlap"):
            library.add_root(bad)
    with pytest.raises(RootError, match="overlap"):
        ImageIndex.create(nas.parent, model=tiny_encoder, index_dir=lib)
    with pytest.raises(RootError, match="--index DIR"):
        ImageIndex.create([photos, nas], model=tiny_encoder)
    assert len(library.roots) == 2


def test_the_cli(two_roots, tiny_encoder_dir, capsys):
    photos, nas, lib = two_roots
    base = ["--model", str(tiny_encoder_dir), "--backend", "torch", "--workers", "0", "-q"]
    assert main(["index", str(photos), str(nas), "--index", str(lib), *base]) == 0
    out = capsys.readouterr().out
    assert f"indexed {photos}, {nas} into {lib}: 7 images" in out

    third = nas.parent / "scans"
    make_images(third, 2, seed=2)
    again = ["--backend", "torch", "--workers", "0", "-q"]  # the index's own model
    assert main(["index", str(third), "--index", str(lib), *again]) == 0
    out = capsys.readouterr().out
    assert f"added the root {third}" in out and "added 2," in out

    nas.rename(nas.with_name("gone"))
    assert main(["index", "--index", str(lib), *again]) == 0
    out = capsys.readouterr().out
    assert f"root {nas} is offline" in out and "3 indexed images are kept" in out
    assert "removed 0" in out
    assert main(["roots", "list", "--index", str(lib)]) == 0
    out = capsys.readouterr().out
    assert "OFFLINE" in out and "scans" in out
    assert main(["roots", "move", "nas", str(nas.with_name("gone")), "--index", str(lib)]) == 0
    assert main(["roots", "remove", "scans", "--index", str(lib)]) == 0
    assert "forgot 2 indexed files" in capsys.readouterr().out
    assert main(["info", "--index", str(lib)]) == 0
    out = capsys.readouterr().out
    assert "roots:                2" in out and "online" in out and "OFFLINE" not in out
    assert main(["roots", "add", str(photos / "x"), "--index", str(lib)]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_a_duplicate_across_roots_moves_under_its_key_and_comes_back(
    two_roots, tiny_encoder, tmp_path
):
    """Mutation: `plan_steps` given the first root's folder for every file (as with one root):
    the nas copy goes to ``out/../mnt/nas/...``, outside ``--move-to`` (back onto itself)."""
    from mocoretrieval import dedupe

    photos, nas, lib = two_roots
    shutil.copy(photos / "img_0003.png", nas / "copy.png")
    index = ImageIndex.build([photos, nas], model=tiny_encoder, index_dir=lib, workers=WORKERS)
    group = next(g for g in index.duplicates(0.99) if "nas/copy.png" in g.relpaths)
    assert "photos/img_0003.png" in group.relpaths  # across the two roots
    proposal = dedupe.Proposal(group.id, group.tier, [str(photos / "img_0003.png")])
    proposal.remove = [str(nas / "copy.png")]
    with pytest.raises(Exception, match="inside the indexed folder"):
        dedupe.apply(index, [proposal], move_to=nas / "dupes")
    out = tmp_path / "out"
    report = dedupe.apply(index, [proposal], move_to=out)
    assert report.moved == [str(nas / "copy.png")] and (out / "nas" / "copy.png").is_file()
    assert "nas/copy.png" not in index.paths() and len(index) == 7
    dedupe.undo(lib)
    assert (nas / "copy.png").is_file() and not (out / "nas" / "copy.png").exists()
    index.close()


def test_keep_pattern_matches_the_key_in_a_library(two_roots, tiny_encoder):
    """``--keep 'nas/*'`` keeps the copy in the root named nas: patterns match keys (NAME/...).
    Mutation: `suggest` given the first root's folder (as with one root): the nas copy's path
    relative to it is ``../mnt/nas/copy.png``, which the pattern misses, and the group is left
    alone."""
    from mocoretrieval import dedupe

    photos, nas, lib = two_roots
    shutil.copy(photos / "img_0003.png", nas / "copy.png")
    index = ImageIndex.build([photos, nas], model=tiny_encoder, index_dir=lib, workers=WORKERS)
    groups = [g for g in index.duplicates(0.99) if "nas/copy.png" in g.relpaths]
    (proposal,) = dedupe.suggest(groups, "nas/*", root=index.relative)
    assert proposal.keeper == str(nas / "copy.png")  # the first of the group under nas/
    assert str(photos / "img_0003.png") in proposal.remove
    index.close()


def test_an_export_of_a_library_names_every_root(library, two_roots, tmp_path):
    """paths.csv holds keys; embeddings.json the roots that turn them into files. Mutation:
    the ``roots`` entry left out of the manifest (only the first root's folder, as before)."""
    from mocoretrieval.export_vectors import export_embeddings

    photos, nas, _ = two_roots
    export_embeddings(library.path, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "embeddings.json").read_text())
    roots = {r["prefix"]: Path(r["path"]) for r in manifest["roots"]}
    assert roots == {"photos/": photos, "nas/": nas}
    keys = (tmp_path / "out" / "paths.csv").read_text().split()[1:]
    for key in (row.split(",", 1)[1] for row in keys):
        prefix, rel = key.split("/", 1)
        assert (roots[prefix + "/"] / rel).is_file()


def test_watch_counts_no_change_for_an_offline_root(library, two_roots):
    """Mutation: `count_changes` without the offline keys left out: the 3 files of the missing
    root count as changes, and a polling watch would run an update for nothing."""
    from mocoretrieval.watch import count_changes

    _, nas, _ = two_roots
    assert count_changes(library) == 0
    nas.rename(nas.with_name("nas-away"))
    assert count_changes(library) == 0
    make_images(two_roots[0] / "new", 2, seed=9)
    assert count_changes(library) == 2
