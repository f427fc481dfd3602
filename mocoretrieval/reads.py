"""What an index holds, read back without a model: its images, their stored vectors and
thumbnails. The read API of the app and the HTTP API; a part of `ImageIndex`, as `Searching` is.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageError, MoCoRetrievalError
from .pathsafety import inside_root
from .store import Store


class Reading:
    """The reading half of `ImageIndex` that needs no model: it reads the store, never writes."""

    # Set by ImageIndex.__init__.
    path: Path
    store: Store
    # ImageIndex's: follows another process's re-embedding before a read.
    _sync: Callable[[], None]
    # LibraryRoots': where the file of a key is now.
    absolute: Callable[[str], Path]

    def paths(self) -> list[str]:
        """The indexed images (embedded, not skipped) by key, sorted: relative to the root,
        POSIX (with the root's name in front in a library of several roots)."""
        self._sync()
        return [
            norm
            for rel, record in sorted(self.store.files().items())
            if record.vector_id is not None and (norm := inside_root(rel)) is not None
        ]

    def __contains__(self, path: object) -> bool:
        """Whether ``path`` (relative to the root, as :meth:`paths` lists it) is embedded."""
        if not isinstance(path, str):
            return False
        self._sync()
        record = self.store.file(path)
        return record is not None and record.vector_id is not None

    def vector(self, path: str) -> np.ndarray:
        """The stored embedding of an indexed image, ``(dim,)`` float32 and L2-normalised:
        search with it to find the images most like one of the index, without decoding it.

        Args:
            path: the image's path relative to the root, as :meth:`paths` gives it.

        Raises:
            ImageError: the image is not in the index (never indexed, skipped, or removed).
        """
        self._sync()
        vector = self.store.vector(path)
        if vector is None:
            raise ImageError(
                f"not in the index at {self.path}: pass a key as "
                "ImageIndex.paths() lists it, or run `mocoretrieval index` to add it",
                path,
            )
        return vector

    def thumbnail(self, path: str) -> Image.Image:
        """The thumbnail stored for an indexed image when it was embedded (its longest side at
        most :data:`~mocoretrieval.embed.DEFAULT_THUMBNAIL_SIZE`).

        It is given only while the file is as it was then (same size and modification time):
        an edited file's stored thumbnail shows its old content.

        Args:
            path: the image's path relative to the root, as :meth:`paths` and
                :attr:`SearchResult.relpath` give it.

        Raises:
            ImageError: the image is not indexed, has no stored thumbnail (an index built
                before thumbnails were stored), is gone or changed since it was indexed; make
                a thumbnail from the file instead, or update the index.
        """
        stored = self.store.thumbnails([path]).get(path)
        if stored is None:
            record = self.store.file(path)
            if record is None or record.vector_id is None:
                raise ImageError(
                    f"not in the index at {self.path}: pass a key as "
                    "ImageIndex.paths() lists it, or run `mocoretrieval index` to add it",
                    path,
                )
            raise ImageError(
                "no stored thumbnail (indexed before thumbnails were stored): make one from "
                "the file, or re-index with --rebuild to store them",
                path,
            )
        norm = inside_root(path)
        if norm is None:
            raise ImageError("not inside the indexed root", path)
        try:
            real = self.absolute(norm)
        except MoCoRetrievalError:
            raise ImageError("not inside a root of the library", path) from None
        try:
            st = os.stat(real)
        except OSError:
            raise ImageError("file not found (moved or deleted since indexing?)", path) from None
        if (st.st_size, st.st_mtime_ns) != tuple(stored.stat):
            raise ImageError(
                "changed since it was indexed: run `mocoretrieval index` to update the index, "
                "or make a thumbnail from the file",
                path,
            )
        try:
            image = Image.open(io.BytesIO(stored.jpeg))
            image.load()
        except Exception as e:  # noqa: BLE001 - a damaged blob: say so, with the fix
            raise ImageError(
                f"its stored thumbnail is damaged ({e}): re-index with --rebuild", path
            ) from None
        return image
