"""Cleaning up duplicates never loses a file: tiers, keep rules, reference folders, journaled
moves and trash, `undo`, a crash mid-way, and "not duplicates" decisions.

On a generated folder: ``a/`` holds six distinct images, ``b/`` an exact byte copy of one, an
enlarged copy of another and a shrunk copy of a third. The tiny random encoder puts every
image of this folder above 0.98 of the others, so the tests use its own scale: 0.999 for
near-duplicates, 0.99 for "similar".

Each test's docstring says how its mechanism was broken once on purpose to see it fail.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from factories import make_images, make_tiny_encoder
from PIL import Image

from mocoretrieval import dedupe, duplicates
from mocoretrieval.cli import main
from mocoretrieval.errors import IndexBusyError
from mocoretrieval.index import ImageIndex
from mocoretrieval.layout import UpdateLock

NEAR, SIMILAR = 0.999, 0.99
INDEX_DIR = ".mocoretrieval"


def blake(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root`` but the index: relative path -> (BLAKE2b, mtime_ns)."""
    return {
        p.relative_to(root).as_posix(): (blake(p), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and INDEX_DIR not in p.parts
    }


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    make_tiny_encoder().save_pretrained(folder)
    return folder


@pytest.fixture
def library(tmp_path, encoder_dir):
    """``(root, index)``: the folder of the module docstring, indexed."""
    root = tmp_path / "photos"
    make_images(root / "a", 6)
    (root / "b").mkdir()
    shutil.copy(root / "a" / "img_0001.png", root / "b" / "copy_1.png")
    Image.open(root / "a" / "img_0003.png").resize((128, 96)).save(root / "b" / "big_3.png")
    Image.open(root / "a" / "img_0005.png").resize((48, 36)).save(root / "b" / "small_5.png")
    index = ImageIndex.build(root, model=encoder_dir, workers=0)
    yield root, index
    index.close()


@pytest.fixture
def trash_home(tmp_path, monkeypatch):
    """A freedesktop trash in a temporary folder: the real trash is never touched."""
    import send2trash
    from send2trash import plat_other

    data = tmp_path / "xdg"
    data.mkdir()
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    monkeypatch.setattr(plat_other, "XDG_DATA_HOME", os.fsencode(data))
    monkeypatch.setattr(plat_other, "HOMETRASH_B", os.fsencode(data / "Trash"))
    monkeypatch.setattr(plat_other, "HOMETRASH", str(data / "Trash"))
    # send2trash prefers gio where installed, which would use the real trash: never here.
    monkeypatch.setattr(send2trash, "send2trash", plat_other.send2trash)
    return data / "Trash"


def _groups(index, **kwargs) -> dict[frozenset[str], str]:
    return {frozenset(g.relpaths): g.tier for g in index.duplicates(NEAR, **kwargs)}


def _cli(root: Path, *args: str) -> int:
    return main(["duplicates", "--threshold", str(NEAR), "--index", str(root), *args])


def test_tiers_and_lazy_hashing(library, monkeypatch):
    """Broken on purpose: `group_tier` returning NEAR always (identical tier lost), and
    hashing every member regardless of size (5 hashes, not 2): both fail here."""
    _, index = library
    hashed = []
    real = duplicates.file_hash
    monkeypatch.setattr(duplicates, "file_hash", lambda p: hashed.append(p) or real(p))
    assert _groups(index) == {
        frozenset({"a/img_0001.png", "b/copy_1.png"}): "identical",
        frozenset({"a/img_0003.png", "b/big_3.png"}): "near",
        frozenset({"a/img_0005.png", "b/small_5.png"}): "near",
    }
    assert len(hashed) == 2  # only the group whose files have one size
    with_similar = _groups(index, similar=SIMILAR)
    assert with_similar[frozenset({"a/img_0005.png", "b/small_5.png"})] == "near"
    weak = [g for g, tier in with_similar.items() if tier == "similar"]
    assert len(weak) == 2 and all(len(g) == 3 for g in weak)  # one image 0.99 alike joined each
    assert any({"a/img_0001.png", "b/copy_1.png"} <= g for g in weak)


def test_keep_rules(library):
    """Broken on purpose: `oldest` with min and max swapped, and a pattern that matches nothing
    falling back to the first member instead of leaving the group alone: both fail here."""
    root, _ = library
    big = [str(root / "a" / "img_0003.png"), str(root / "b" / "big_3.png")]
    small = [str(root / "a" / "img_0005.png"), str(root / "b" / "small_5.png")]
    assert dedupe.keeper(big, "largest") == big[1]  # 128x96 beats 64x48
    assert dedupe.keeper(small, "largest") == small[0]
    os.utime(big[0], ns=(1_000_000_000, 1_000_000_000))
    os.utime(big[1], ns=(2_000_000_000, 2_000_000_000))
    assert dedupe.keeper(big, "oldest") == big[0]
    assert dedupe.keeper(big, "newest") == big[1]
    assert dedupe.keeper(big, "b/*", root) == big[1]
    assert dedupe.keeper(big, "*/img_*", root) == big[0]
    assert dedupe.keeper(big, "*.gif", root) is None
    group = _FakeGroup(big)
    (left,) = dedupe.suggest([group], "*.gif", root=root)
    assert left.remove == [] and "no file matches" in left.note


class _FakeGroup(list):
    tier, id = "near", "x"

    def __init__(self, paths):
        super().__init__(_Hit(p) for p in paths)


class _Hit:
    def __init__(self, path):
        self.path = path


def test_reference_folder_is_never_touched(library, tmp_path, trash_home):
    """Broken on purpose: `suggest` ignoring `references` (keeping the largest instead) moves
    a/img_0005.png... and a/img_0003.png: the hashes and mtimes of a/ change and this fails."""
    root, index = library
    shutil.copy(root / "a" / "img_0002.jpg", root / "a" / "again_2.jpg")  # a reference-only group
    index.update(workers=0)
    before = {k: v for k, v in tree(root).items() if k.startswith("a/")}
    assert _cli(root, "--reference", str(root / "a"), "--move-to", str(tmp_path / "out")) == 0
    assert {k: v for k, v in tree(root).items() if k.startswith("a/")} == before
    assert not any(k.startswith("b/") for k in tree(root))  # every b/ copy moved out
    assert sorted(tree(tmp_path / "out")) == ["b/big_3.png", "b/copy_1.png", "b/small_5.png"]
    assert main(["undo", "--index", str(root)]) == 0
    index.update(workers=0)
    assert _cli(root, "--reference", str(root / "a"), "--trash") == 0
    assert {k: v for k, v in tree(root).items() if k.startswith("a/")} == before
    assert sorted(p.name for p in (trash_home / "files").iterdir()) == [
        "big_3.png",
        "copy_1.png",
        "small_5.png",
    ]


def test_move_then_undo_restores_every_file_byte_for_byte(library, tmp_path, capsys):
    """Broken on purpose: `undo` skipping the restore (only marking the journal), and
    `plan_steps` dropping the relative folder (all into DIR flat): both fail here."""
    root, index = library
    before = tree(root)
    out = tmp_path / "out"
    assert _cli(root, "--keep", "a/*", "--move-to", str(out)) == 0
    assert sorted(tree(out)) == ["b/big_3.png", "b/copy_1.png", "b/small_5.png"]
    assert "3 moved files dropped from the index" in capsys.readouterr().out
    assert not [p for p in index.paths() if p.startswith("b/")]  # moved files left the index
    assert main(["undo", "--index", str(root)]) == 0
    assert {k: v[0] for k, v in tree(root).items()} == {k: v[0] for k, v in before.items()}
    assert tree(out) == {}
    assert "index them again" in capsys.readouterr().out
    assert main(["undo", "--index", str(root)]) == 1  # nothing left to undo


def test_trash_then_undo(library, trash_home):
    """Broken on purpose: `apply` not recording where the trash put a file fails the journal
    check; `locate_trashed` finding nothing (also when `undo` looks again) makes undo report
    the files missing: both fail here."""
    root, index = library
    before = tree(root)
    assert _cli(root, "--keep", "a/*", "--trash") == 0
    assert len(list((trash_home / "info").iterdir())) == 3
    (journal,) = dedupe.journals(index.path)
    done = [r for r in dedupe.Journal(journal).records() if r["op"] == "done"]
    assert sorted(Path(r["dst"]).parent for r in done) == [trash_home / "files"] * 3
    assert main(["undo", "--index", str(root)]) == 0
    assert {k: v[0] for k, v in tree(root).items()} == {k: v[0] for k, v in before.items()}
    assert list((trash_home / "info").iterdir()) == []  # the .trashinfo files went too


def test_undo_says_where_to_look_when_the_trash_lost_a_file(library, trash_home, capsys):
    """Broken on purpose: `undo` reporting success for a file it could not find (no problem
    recorded): the exit status 0 and the missing message fail this."""
    root, _ = library
    assert _cli(root, "--keep", "a/*", "--trash") == 0
    shutil.rmtree(trash_home)  # emptied by the user
    capsys.readouterr()
    assert main(["undo", "--index", str(root)]) == 1
    err = capsys.readouterr().err
    assert "cannot find it in the trash" in err and ".local/share/Trash/files" in err


def test_dry_run_touches_nothing(library, tmp_path, trash_home, capsys):
    """Broken on purpose: `apply` ignoring `dry_run`: files move and a journal appears."""
    root, index = library
    before = tree(root)
    out = tmp_path / "out"
    assert _cli(root, "--keep", "a/*", "--move-to", str(out), "--dry-run") == 0
    assert _cli(root, "--keep", "a/*", "--trash", "--dry-run") == 0
    text = capsys.readouterr().out
    assert "would move" in text and "would trash" in text and "nothing was touched" in text
    assert tree(root) == before and not out.exists() and not trash_home.exists()
    assert dedupe.journals(index.path) == []
    assert len(index.paths()) == 9


def test_a_crash_mid_apply_is_undone(library, tmp_path):
    """The second move crashes after the file moved but before `done` is written; the third
    never starts. Broken on purpose: writing the journal's `move` line after the move (not
    before): the crashed file has no line and stays out of place, so this fails."""
    root, index = library
    before = tree(root)
    calls = []

    def crashing(src: Path, dst: Path) -> None:
        calls.append(src)
        dedupe.move_file(src, dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a crash, not an error apply would catch

    proposals = dedupe.suggest(index.duplicates(NEAR), "a/*", root=root)
    with pytest.raises(KeyboardInterrupt):
        dedupe.apply(index, proposals, move_to=tmp_path / "out", mover=crashing)
    assert len(tree(root)) == len(before) - 2
    report = dedupe.undo(index.path)
    assert not report.problems and len(report.restored) == 2
    assert {k: v[0] for k, v in tree(root).items()} == {k: v[0] for k, v in before.items()}


def test_not_duplicates_are_kept_apart_pair_by_pair(library, capsys):
    """Broken on purpose: `duplicate_groups` ignoring `apart` regroups the copy with its
    original; joining deferred pairs without `_kept_apart` puts all three in one group."""
    root, index = library
    shutil.copy(root / "a" / "img_0001.png", root / "b" / "copy_1b.png")
    index.update(workers=0)
    (trio,) = [g for g in index.duplicates(NEAR) if "b/copy_1.png" in g.relpaths]
    assert len(trio) == 3
    assert _cli(root, "--not-duplicates", "a/img_0001.png", str(root / "b" / "copy_1.png")) == 0
    groups = [set(g.relpaths) for g in index.duplicates(NEAR)]
    assert not any({"a/img_0001.png", "b/copy_1.png"} <= g for g in groups)
    assert any("b/copy_1b.png" in g and len(g) == 2 for g in groups)  # A-C or B-C still groups
    big = next(g for g in index.duplicates(NEAR) if "b/big_3.png" in g.relpaths)
    assert _cli(root, "--not-duplicates", big.id) == 0  # by the group's id
    assert not any("b/big_3.png" in g.relpaths for g in index.duplicates(NEAR))
    assert "recorded 1 pair(s)" in capsys.readouterr().out


def test_undo_refuses_while_another_writer_holds_the_lock(library, tmp_path, capsys):
    """`undo` is a writer: while an update (or a watch, or another undo) holds the index lock
    it changes nothing and says so, and runs once the lock is free. Broken on purpose: `undo`
    without `UpdateLock`: the files move back under the running update and this fails."""
    root, index = library
    before = tree(root)
    out = tmp_path / "out"
    assert _cli(root, "--keep", "a/*", "--move-to", str(out)) == 0
    moved = tree(out)
    (journal,) = dedupe.journals(index.path)
    lines = journal.read_text()
    capsys.readouterr()
    with UpdateLock(index.path):  # another writer is running
        with pytest.raises(IndexBusyError, match="another"):
            dedupe.undo(index.path)
        assert main(["undo", "--index", str(root)]) == 1
        assert "wait for it to end" in capsys.readouterr().err
    assert tree(out) == moved and journal.read_text() == lines  # nothing touched
    assert main(["undo", "--index", str(root)]) == 0  # the lock is free again
    assert {k: v[0] for k, v in tree(root).items()} == {k: v[0] for k, v in before.items()}


def test_undo_never_overwrites(library, tmp_path, capsys):
    """Broken on purpose: `undo` moving back with `os.replace` and no occupancy check: the new
    file at the original path is overwritten and this fails."""
    root, _ = library
    out = tmp_path / "out"
    assert _cli(root, "--keep", "a/*", "--move-to", str(out)) == 0
    (root / "b" / "copy_1.png").write_bytes(b"a new file under the old name")
    capsys.readouterr()
    assert main(["undo", "--index", str(root)]) == 1
    assert "another file is now at this path" in capsys.readouterr().err
    assert (root / "b" / "copy_1.png").read_bytes() == b"a new file under the old name"
    assert (out / "b" / "copy_1.png").is_file()  # the moved original is kept where it is
    assert (root / "b" / "big_3.png").is_file()  # the others came back


def test_move_never_overwrites(tmp_path):
    """Broken on purpose: `move_file` as `os.replace`: the file at the destination is lost."""
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(b"one")
    dst.write_bytes(b"two")
    with pytest.raises(FileExistsError):
        dedupe.move_file(src, dst)
    assert src.read_bytes() == b"one" and dst.read_bytes() == b"two"


def test_move_to_inside_the_root_is_refused(library, capsys):
    root, _ = library
    assert _cli(root, "--move-to", str(root / "dups")) == 1
    assert "inside the indexed folder" in capsys.readouterr().err


def test_an_index_made_before_decisions_opens_and_learns_them(library):
    """An index whose database predates the `not_duplicates` table: read-only it groups as
    before, and the first decision adds the table (no schema version bump). Broken on purpose:
    `Store.not_duplicate_ids` without its OperationalError guard fails the read-only run."""
    root, index = library
    index.close()
    db = sqlite3.connect(root / INDEX_DIR / "index.db")
    db.execute("DROP TABLE not_duplicates")
    db.commit()
    db.close()
    old = ImageIndex.open(root)
    assert len(old.duplicates(NEAR)) == 3
    old.mark_not_duplicates(["a/img_0001.png", "b/copy_1.png"])
    assert len(old.duplicates(NEAR)) == 2
    old.close()
