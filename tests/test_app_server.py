"""The launched app over HTTP: the `/search` endpoint through gradio_client, what the server
refuses to serve, the upload limit, and the safe launch defaults."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from urllib.parse import quote

import httpx
import pytest
from app_helpers import build_photo_index, free_port, launch_app, make_images, shown_paths

from app import views
from app.server import DEFAULT_HOST, launch_options


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(url, index)`` of the app launched on a free port, with a 1 MB upload limit."""
    index = build_photo_index(tmp_path_factory.mktemp("server"))
    url, page = launch_app(index, max_upload_mb=1)
    yield url, index
    page.close()
    index.close()


def test_launch_defaults_are_local_and_private():
    opts = launch_options()
    assert opts["server_name"] == DEFAULT_HOST == "127.0.0.1"
    assert opts["share"] is False and opts["allowed_paths"] == []
    assert opts["max_file_size"] == f"{views.MAX_UPLOAD_MB}mb" and opts["show_error"] is False
    assert launch_options(host="0.0.0.0", share=True)["server_name"] == "0.0.0.0"


def test_search_endpoint_matches_image_index(served, tmp_path):
    from gradio_client import Client, handle_file

    url, index = served
    query = tmp_path / "query.png"  # a copy, uploaded like a user's file
    shutil.copy(index.root / "sub" / "img_0001.png", query)
    client = Client(url, verbose=False)
    gallery, message = client.predict(handle_file(str(query)), 5, api_name="/search")
    expected = index.search(query, k=5)
    got = [views.parse_caption(item["caption"]) for item in gallery]
    assert [p for p, _ in got] == shown_paths(index, expected)
    scores = {r.relpath: r.score for r in expected}
    assert [s for _, s in got] == pytest.approx([scores[p] for p, _ in got], abs=1e-3)
    assert got[0][0] == "sub/img_0001.png"
    assert ("could not be shown" in message) == (len(got) < len(expected))

    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a picture")
    gallery, message = client.predict(handle_file(str(bad)), 5, api_name="/search")
    assert gallery == [] and "not an image" in message
    client.close()


def _file_url(url: str, path) -> str:
    return f"{url}/gradio_api/file={quote(str(path))}"


def test_nothing_on_disk_is_served(served):
    url, index = served
    root = index.root
    denied = [
        root / "img_0000.jpg",  # even indexed images: the page gets thumbnails, not files
        f"{root}/../secret.txt",
        f"{root}/sub/../../secret.txt",
        root.parent / "secret.txt",
        root / "link_out.png",  # symlink inside the root to a file outside
        (root / "link_out.png").resolve(),
        index.path / "index.db",  # the index database
        index.path / "manifest.json",
    ]
    with httpx.Client() as http:
        for path in denied:
            r = http.get(_file_url(url, path))
            assert r.status_code in (403, 404), (path, r.status_code)
            assert b"not for the browser" not in r.content
        # raw traversal, not normalised by the client
        r = http.get(f"{url}/gradio_api/file={root}/../secret.txt")
        assert r.status_code in (403, 404) and b"not for the browser" not in r.content


def test_result_images_are_served_from_gradios_cache(served, tmp_path):
    from gradio_client import Client, handle_file

    url, index = served
    client = Client(url, verbose=False, download_files=False)
    gallery, _ = client.predict(
        handle_file(str(index.root / "img_0002.jpg")), 3, api_name="/search"
    )
    client.close()
    with httpx.Client() as http:
        for item in gallery:
            image = item["image"]
            assert str(index.root) not in image["path"]  # a cached thumbnail, not the original
            r = http.get(image["url"])
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


def test_search_refuses_files_that_were_not_uploaded(served):
    """The search handler reads the uploaded file itself (preprocess=False); Gradio still
    checks that the path it is given is one of its uploads, so an API caller cannot make the
    server read and search any file on disk."""
    url, index = served
    outside = index.root.parent / "outside" / "img_0000.jpg"
    assert outside.is_file()
    payload = {"data": [{"path": str(outside), "meta": {"_type": "gradio.FileData"}}, 5]}
    with httpx.Client(timeout=60) as http:
        event = http.post(f"{url}/gradio_api/call/search", json=payload).json()["event_id"]
        stream = http.get(f"{url}/gradio_api/call/search/{event}").text
    assert "event: error" in stream and "event: complete" not in stream
    assert "score" not in stream and "·" not in stream


def test_uploads_over_the_limit_are_refused(served):
    url, _ = served
    with httpx.Client() as http:
        r = http.post(
            f"{url}/gradio_api/upload",
            files={"files": ("big.jpg", b"\xff" * 1_500_000, "image/jpeg")},
        )
    assert r.status_code == 413


def test_serve_command_line():
    from mocoretrieval.cli import build_parser

    args = build_parser().parse_args(["serve", "--index", "photos"])
    assert args.host is None and args.share is False and args.index == "photos"
    assert args.backend == "auto"  # as for `search`: onnxruntime on a CPU
    assert args.func.__name__ == "_cmd_serve"
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "8000", "--share"])
    assert (args.host, args.port, args.share) == ("0.0.0.0", 8000, True)


def test_serve_reports_a_missing_index(tmp_path, capsys):
    from mocoretrieval.cli import main

    assert main(["serve", "--index", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


@pytest.fixture
def saved_index(tmp_path, tiny_encoder_dir):
    """An index whose encoder has a source on disk, as `serve` opens it."""
    from mocoretrieval.index import ImageIndex

    root = tmp_path / "photos"
    make_images(root, 6)
    ImageIndex.build(root, model=str(tiny_encoder_dir), workers=0).close()
    return root


def test_open_index_with_torch_loads_the_model_once(saved_index):
    from app.server import open_index
    from mocoretrieval import MoCoEncoder

    index = open_index(saved_index, backend="torch")
    encoder = index.encoder
    assert isinstance(encoder, MoCoEncoder)
    query = saved_index / "img_0001.png"
    assert index.search(query, k=1)[0].path == str(query)
    assert index.encoder is encoder  # loaded at start-up, not per query
    index.close()


def test_python_m_app_serves_on_localhost(saved_index, tmp_path):
    """The real entry point as a user starts it, with the default backend (auto: onnxruntime on
    a CPU): blocks, binds 127.0.0.1 only, and its search endpoint answers like the index."""
    from gradio_client import Client, handle_file

    from mocoretrieval.index import ImageIndex

    port = free_port()
    cmd = [sys.executable, "-m", "app", "--index", str(saved_index), "--port", str(port)]
    env = {**os.environ, "MOCORETRIEVAL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the app did not start"
                time.sleep(0.5)
        assert r.status_code == 200 and "mocoretrieval" in r.text
        # Bound to 127.0.0.1 only: another loopback address (what 0.0.0.0 would accept) is refused.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.2:{port}/", timeout=2)
        assert list((tmp_path / "cache").rglob("*.onnx"))  # the query encoder is onnxruntime
        query = saved_index / "img_0003.png"
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        gallery, _ = client.predict(handle_file(str(query)), 3, api_name="/search")
        client.close()
        with ImageIndex.open(saved_index) as index:  # torch
            expected = index.search(query, k=3)
        got = [views.parse_caption(item["caption"]) for item in gallery]
        assert got[0][0] == "img_0003.png"
        assert [s for _, s in got] == pytest.approx([r.score for r in expected], abs=1e-3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # The index was built with torch: start-up exported the model once, and said so.
    assert "exporting the model to ONNX once" in proc.stdout.read()
