"""Ignore rules: defaults, .mocoretrievalignore files, --exclude kept in the manifest, pruning.

Each test says in its docstring which line of the mechanism it was seen to fail without.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from factories import make_images

from mocoretrieval.cli import main
from mocoretrieval.errors import IgnoreRuleError
from mocoretrieval.ignore import DEFAULT_PATTERNS, DEFAULTS, EXCLUDE, IgnoreRules
from mocoretrieval.layout import MANIFEST
from mocoretrieval.walk import scan_images, walk_images


def _touch(root: Path, *paths: str) -> None:
    for rel in paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def _index(root: Path, encoder: Path, *extra: str) -> int:
    return main(["index", str(root), "--model", str(encoder), "--workers", "0", "-q", *extra])


# An entry each default is for, as a NAS or an OS leaves it, with an image inside or by its name.
CLUTTER = {
    ".*": ".Trash-1000/files/a.jpg",
    "@eaDir": "trip/@eaDir/IMG_1.jpg/SYNOFILE_THUMB_XL.jpg",
    "\\#recycle": "#recycle/trip/IMG_2.jpg",
    ".DS_Store": "trip/.DS_Store",
    "._*": "trip/._IMG_1.jpg",
    "$RECYCLE.BIN": "$RECYCLE.BIN/S-1-5-21/$RABC123.jpg",
    "System Volume Information": "System Volume Information/tracking.jpg",
    ".thumbnails": "Pictures/.thumbnails/normal/abc.png",
}


def test_every_default_has_a_clutter_example():
    assert set(CLUTTER) == set(DEFAULT_PATTERNS)


@pytest.mark.parametrize("pattern", list(CLUTTER))
def test_each_default_clutter_name_is_excluded(tmp_path, pattern):
    """Each default leaves out what it is for, by its own rule. Seen failing with the pattern
    deleted from DEFAULT_PATTERNS ('.thumbnails', '@eaDir'): excluded by `.*` or not at all."""
    clutter = CLUTTER[pattern]
    _touch(tmp_path, "trip/IMG_1.jpg", clutter)
    scan = scan_images(tmp_path)
    assert list(scan.files) == ["trip/IMG_1.jpg"]
    # The first segment the rule matches: the entry itself, or the folder holding it.
    parts = clutter.split("/")
    rules = IgnoreRules.for_root()
    for i in range(1, len(parts) + 1):
        rule = rules.match("/".join(parts[:i]), is_dir=i < len(parts))
        if rule is not None:
            break
    assert rule is not None and (rule.source, rule.pattern) == (DEFAULTS, pattern)
    if clutter.endswith((".jpg", ".png")) or i < len(parts):
        key = "/".join(parts[:i]) + ("/" if i < len(parts) else "")
        assert scan.excluded == {key: rule}


def test_a_default_is_included_again_by_a_negation(tmp_path):
    """`!@eaDir/` in an ignore file brings the thumbnails back. Seen failing with the ignore
    file not read (`rules = rules.with_file(...)` deleted from scan_images), and with the file
    read as "utf-8" rather than "utf-8-sig" (the BOM glued to the first pattern)."""
    _touch(tmp_path, "a.jpg", "@eaDir/t.jpg", ".hidden/h.jpg")
    # As a Windows editor saves it: a BOM first, which is no part of the first pattern.
    (tmp_path / ".mocoretrievalignore").write_text("\ufeff!@eaDir/\n!.hidden\n", "utf-8")
    assert walk_images(tmp_path) == [".hidden/h.jpg", "@eaDir/t.jpg", "a.jpg"]
    assert walk_images(tmp_path, exclude=[tmp_path / ".hidden"]) == ["@eaDir/t.jpg", "a.jpg"]


def test_nested_ignore_file_with_a_negation(tmp_path):
    """A deeper file's `!` includes what a shallower one excluded, its patterns relative to its
    own folder. Seen failing with `_rebased` not applied (patterns read relative to the root)
    and with the rules of a folder not handed to its sub-folders (`rules_of[path] = rules`
    deleted: a KeyError)."""
    _touch(
        tmp_path,
        "a.png",
        "b.jpg",
        "raw/c.jpg",
        "trip/d.png",
        "trip/keep.png",
        "trip/day1/keep.png",
        "trip/day1/e.jpg",
        "trip/raw/f.jpg",
        "trip/tmp/g.jpg",
    )
    (tmp_path / ".mocoretrievalignore").write_text("# comment\n*.png\n/raw/\n")
    (tmp_path / "trip" / ".mocoretrievalignore").write_text("!keep.png\n/tmp/\nday1/*.jpg\n")
    scan = scan_images(tmp_path)
    assert list(scan.files) == ["b.jpg", "trip/day1/keep.png", "trip/keep.png", "trip/raw/f.jpg"]
    where = {path: (rule.source, rule.line) for path, rule in scan.excluded.items()}
    assert where == {
        "a.png": (".mocoretrievalignore", 2),
        "raw/": (".mocoretrievalignore", 3),
        "trip/d.png": (".mocoretrievalignore", 2),
        "trip/day1/e.jpg": ("trip/.mocoretrievalignore", 3),
        "trip/tmp/": ("trip/.mocoretrievalignore", 2),
    }


@pytest.mark.skipif(shutil.which("git") is None, reason="git is the reference")
def test_same_files_as_git_lists(tmp_path):
    """The same rules as .gitignore files leave git the same images (git is the reference).
    Seen failing with the anchoring in `_rebased` deleted (every pattern at any depth), with
    `regex += ".+"` deleted ("doc/**" excludes doc/ itself) and with `fullmatch` replaced by
    pathspec's prefix matching (a folder's negation re-includes the files inside it)."""
    files = [
        "a.jpg", "a.png", "x/a.png", "x/b.jpg", "x/y/a.png", "x/y/keep.png", "x/y/z/c.jpg",
        "x/tmp/d.jpg", "x/tmp/keep.png", "w/tmp/e.jpg", "[x]/f.jpg", "[x]/g.png", "x/[y]/h.jpg",
        "doc/sub/i.jpg", "doc/j.jpg", "q/keep.jpg", "q/r.jpg", "q/s/keep.jpg", "x/m/k.jpg",
        "x/m/n/l.jpg", "x/m/n/o/p.jpg", "sp ace/t.jpg",
    ]  # fmt: skip
    rules = {
        "": "*.png\ntmp/\n!x/tmp/\ndoc/**\n!doc/j.jpg\n",
        "x": "!keep.png\ny/z/\n/*.jpg\n",
        "x/y": "!*.png\n",
        "[x]": "!g.png\nf.jpg\n",
        "x/[y]": "*\n",
        "q": "**\n!keep.jpg\n",
        "x/m": "**\n!n/\n!n/*.jpg\n",
        "sp ace": "t.jpg \n",
    }
    _touch(tmp_path, *files)
    for folder, text in rules.items():
        (tmp_path / folder / ".mocoretrievalignore").write_text(text)
        (tmp_path / folder / ".gitignore").write_text(text)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    listed = subprocess.run(
        ["git", "-C", str(tmp_path), "ls-files", "--others", "--exclude-standard", "-z"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    expected = sorted(p for p in listed if p.endswith((".jpg", ".png")))
    assert walk_images(tmp_path) == expected


def test_excluded_folders_are_never_listed(tmp_path, monkeypatch):
    """An excluded folder is pruned, not listed and filtered. Seen failing with the `continue`
    after `ignored[path + "/"] = rule` deleted (the folder is walked, its files excluded)."""
    _touch(
        tmp_path,
        "trip/a.jpg",
        "trip/@eaDir/a.jpg/SYNOFILE_THUMB_M.jpg",
        "old/b.jpg",
        "old/deep/c.jpg",
        "trip/skip/d.jpg",
    )
    (tmp_path / "trip" / ".mocoretrievalignore").write_text("skip/\n")
    listed: list[str] = []
    scandir = os.scandir

    def spy(path=".", *args):
        listed.append(Path(path).relative_to(tmp_path).as_posix())
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", spy)
    scan = scan_images(tmp_path, patterns=["/old/"])
    assert list(scan.files) == ["trip/a.jpg"]
    assert sorted(listed) == [".", "trip"]
    assert set(scan.excluded) == {"old/", "trip/@eaDir/", "trip/skip/"}


def test_malformed_pattern_names_the_file_and_line(tmp_path, capsys, tiny_encoder_dir):
    """A line git cannot read either is an error with its file and line, and nothing is
    indexed. Seen failing with the `except ValueError` in `_check` deleted (a bare traceback)."""
    make_images(tmp_path / "photos", 2)
    ignore = tmp_path / "photos" / "sub" / ".mocoretrievalignore"
    ignore.parent.mkdir()
    ignore.write_text("# ok\n*.tmp\n!\n")
    with pytest.raises(IgnoreRuleError, match=rf"{ignore}, line 3: '!' is not a gitignore"):
        walk_images(tmp_path / "photos")
    with pytest.raises(IgnoreRuleError, match=r"--exclude: 'raw\\\\' is not a gitignore"):
        IgnoreRules.for_root(["*.tmp", "raw\\"])
    capsys.readouterr()
    assert _index(tmp_path / "photos", tiny_encoder_dir) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {ignore}, line 3: '!' is not a gitignore pattern"), err
    assert len(err.splitlines()) == 1
    assert main(["info", "--index", str(tmp_path / "photos"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 0  # the walk came first


def test_exclude_is_kept_removes_what_it_now_excludes_and_info_counts(
    tmp_path, capsys, tiny_encoder_dir
):
    """--exclude is stored in the manifest and applies to the next run without the flag; what
    it newly excludes leaves the index (files untouched); `info` counts what each rule left out.

    Seen failing with `self.manifest["exclude"] = patterns` deleted (the second run indexes
    raw/ again), with `report.excluded_removed` left empty (no 'now exclude' line) and with
    `self.manifest["excluded"] = report.excluded` deleted (`info` shows no counts).
    """
    root = tmp_path / "photos"
    make_images(root, 4)
    make_images(root / "raw", 3, seed=1)
    make_images(root / "trip", 2, seed=2)
    _touch(root, "trip/@eaDir/img_0000.jpg/SYNOFILE_THUMB_M.jpg", "trip/._img_0000.jpg")
    (root / "trip" / ".mocoretrievalignore").write_text("*.png\n")
    assert _index(root, tiny_encoder_dir) == 0
    out = capsys.readouterr().out
    assert ": 8 images, Flat" in out  # of 9: trip/img_0001.png is excluded
    assert "excluded 2 images and 1 folder (not entered) by the ignore rules" in out

    assert _index(root, tiny_encoder_dir, "--exclude", "raw/", "--exclude", "*.tmp") == 0
    out = capsys.readouterr().out
    assert ": 5 images, Flat" in out and "removed 3," in out
    assert "removed 3 images from the index that the ignore rules now exclude" in out
    assert sorted(p.name for p in (root / "raw").iterdir()) == [  # the files are untouched
        "img_0000.jpg",
        "img_0001.png",
        "img_0002.jpg",
    ]
    manifest = json.loads((root / ".mocoretrieval" / MANIFEST).read_text())
    assert manifest["exclude"] == ["raw/", "*.tmp"]

    assert _index(root, tiny_encoder_dir) == 0  # no flag: the stored patterns still apply
    out = capsys.readouterr().out
    assert ": 5 images, Flat" in out and "added 0, updated 0, removed 0" in out
    assert "now exclude" not in out

    assert main(["info", "--index", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["exclude"] == ["raw/", "*.tmp"]
    assert info["excluded"] == {
        DEFAULTS: {"@eaDir": {"files": 0, "folders": 1}, "._*": {"files": 1, "folders": 0}},
        EXCLUDE: {"raw/": {"files": 0, "folders": 1}},
        "trip/.mocoretrievalignore": {"*.png": {"files": 1, "folders": 0}},
    }
    assert main(["info", "--index", str(root)]) == 0
    out = capsys.readouterr().out
    assert "exclude:              raw/ *.tmp" in out
    assert "excluded:             2 images, 2 folders (not entered)" in out
    assert "  --exclude: raw/: 1 folder" in out
    assert "  trip/.mocoretrievalignore: *.png: 1 image" in out

    assert _index(root, tiny_encoder_dir, "--no-exclude") == 0  # dropped: raw/ comes back
    out = capsys.readouterr().out
    assert ": 8 images, Flat" in out and "added 3," in out
    assert json.loads((root / ".mocoretrieval" / MANIFEST).read_text())["exclude"] == []
