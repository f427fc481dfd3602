"""Issue 13, defects 3 and 16: the `/search` API reads only files Gradio received as uploads,
and result thumbnails go to a private folder that is removed when the app stops."""

from __future__ import annotations

import os
import stat

import httpx
import pytest
from app_helpers import build_photo_index, launch_app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(url, index, private folder)`` of the app launched in its private cache."""
    from app.server import private_cache

    index = build_photo_index(tmp_path_factory.mktemp("safety"))
    with private_cache() as folder:
        url, page = launch_app(index)
        yield url, index, folder
        page.close()
    index.close()


def _call_search(url: str, image: dict) -> str:
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{url}/gradio_api/call/search", json={"data": [image, 5]})
        return http.get(f"{url}/gradio_api/call/search/{r.json()['event_id']}").text


def test_search_without_meta_cannot_open_a_file_on_the_server(served):
    """Defect 3. Fails without the fix: a payload with a ``path`` and no ``meta`` skipped
    Gradio's upload check, and the server decoded and searched the file it named."""
    url, index, _ = served
    outside = index.root.parent / "outside" / "img_0000.jpg"
    assert outside.is_file()
    for image in ({"path": str(outside)}, {"path": str(index.root / "img_0001.png")}):
        stream = _call_search(url, image)
        assert "\\u00b7" not in stream and "·" not in stream  # no gallery caption
        assert "not an uploaded file" in stream or "event: error" in stream


def test_uploads_still_search(served, tmp_path):
    from gradio_client import Client, handle_file

    url, index, folder = served
    client = Client(url, verbose=False, download_files=False)
    gallery, message = client.predict(
        handle_file(str(index.root / "img_0002.jpg")), 3, api_name="/search"
    )
    client.close()
    assert gallery and message == ""
    # Defect 16: the thumbnails sent to the browser are files in the private folder.
    for item in gallery:
        assert os.path.realpath(item["image"]["path"]).startswith(os.path.realpath(folder))


def test_the_private_cache_is_private_and_removed():
    """Defect 16. Fails without the fix (no private folder: thumbnails were written under the
    shared, world-readable ``<tmp>/gradio``)."""
    from gradio.utils import get_upload_folder

    from app.server import private_cache

    with private_cache() as folder:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert os.path.realpath(get_upload_folder()) == os.path.realpath(folder)
        (folder / "thumb.jpg").write_bytes(b"x")
    assert not folder.exists()
