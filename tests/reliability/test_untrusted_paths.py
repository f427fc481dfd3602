"""Issue 13, defect 18: paths from the database are untrusted, and index discovery stops at
another user's index."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mocoretrieval.errors import IndexFormatError
from mocoretrieval.index import ImageIndex
from mocoretrieval.layout import find_index_dir
from mocoretrieval.store import FileStat, Store


def test_stored_paths_that_leave_the_root_are_never_returned(indexed):
    """Fails without the fix: a crafted row's ``root/../../../../etc/passwd`` was returned by
    search and duplicates as it was, and its control characters were printed by info."""
    index = ImageIndex.open(indexed)
    vector = index.store.all_vectors()[1][0]
    crafted = ["../../../../etc/passwd", "/etc/shadow", "a/../../x.jpg", "ok/../img_9.jpg"]
    writer = Store(index.store.path, index.dim)
    writer.add_batch(crafted, np.repeat(vector[None], 4, 0), [FileStat(1, 1)] * 4)
    writer.add_batch(
        [], np.zeros((0, index.dim), np.float32), [], [("\x1b[2Jx.jpg", "x", FileStat(1, 1))]
    )
    writer.close()
    root = str(indexed.resolve())
    hits = index.search(vector, k=10)
    groups = index.duplicates(0.99)
    for path in [h.path for h in hits] + [r.path for g in groups for r in g]:
        assert os.path.normpath(path) == path and path.startswith(root + os.sep), path
    assert f"{root}/img_9.jpg" in {h.path for h in hits}  # normalised, inside: kept
    assert "\\x1b[2Jx.jpg" in index.info()["skipped"]  # escaped, not sent to the terminal


@pytest.mark.skipif(not hasattr(os, "chown") or os.geteuid() != 0, reason="needs chown (root)")
def test_discovery_refuses_an_index_owned_by_another_user(indexed, monkeypatch):
    """Fails without the fix: an index planted in a parent folder by another user was used."""
    (indexed / "sub").mkdir()
    monkeypatch.chdir(indexed / "sub")
    assert find_index_dir() == indexed / ".mocoretrieval"
    os.chown(indexed / ".mocoretrieval", 12345, 12345)
    with pytest.raises(IndexFormatError, match="another user"):
        find_index_dir()
    assert find_index_dir(indexed) == (indexed / ".mocoretrieval").resolve()  # explicit: trusted
