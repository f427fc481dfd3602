"""The HTTP API (`app.api`, mounted by `app.server.build_server`) through an in-process client:
each endpoint on a small index, the upload limits, ids that try to leave the indexed folder,
JSON errors, the metrics text, and ``serve --api-only`` (no page, no Gradio).

Each test that guards a mechanism says how the mechanism was broken to watch it fail."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from app_helpers import build_photo_index, free_port, shown_paths
from factories import make_images, make_tiny_encoder
from fastapi.testclient import TestClient
from PIL import Image

from app.api import API_PREFIX
from mocoretrieval.duplicates import DEFAULT_DUPLICATE_THRESHOLD

LIMIT_MB = 0.05  # 50 kB: the generated images are ~10 kB, a 60 kB upload is over


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory):
    index = build_photo_index(tmp_path_factory.mktemp("api"))
    yield index
    index.close()


@pytest.fixture(scope="module")
def client(photo_index):
    from app.server import build_server

    app = build_server(photo_index, k=5, max_upload_mb=LIMIT_MB)
    with TestClient(app, raise_server_exceptions=False) as http:
        yield http


def _upload(client, path, k=None, name=None, **kwargs):
    params = {} if k is None else {"k": k}
    files = {"image": (name or path.name, path.read_bytes(), "application/octet-stream")}
    return client.post(f"{API_PREFIX}/search", params=params, files=files, **kwargs)


def _assert_error(r, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"]
    for word in words:
        assert word in body["error"], body
    return body


def test_search_by_upload_matches_the_index(client, photo_index):
    """Results are the index's, in its order, as relative paths with scores and working
    thumbnail URLs; the symlink pointing out of the folder is left out (counted in
    ``left_out``). Checked: without the `Api.shown` filter in `Api.results`, link_out.png is
    listed and the test fails."""
    query = photo_index.root / "sub" / "img_0001.png"
    r = _upload(client, query, k=100)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = photo_index.search(query, k=100)
    assert [x["path"] for x in body["results"]] == shown_paths(photo_index, expected)
    assert body["left_out"] == 1 and body["k"] == 100
    assert body["results"][0]["path"] == "sub/img_0001.png"
    scores = {h.relpath: h.score for h in expected}
    for item in body["results"]:
        assert item["score"] == pytest.approx(scores[item["path"]], abs=1e-5)
    for item in body["results"][:3]:
        assert item["thumbnail"] == f"{API_PREFIX}/thumbnail/{item['path']}"
        thumb = client.get(item["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 320
    default_k = _upload(client, query)  # the server's -k (5)
    assert len(default_k.json()["results"]) == 5
    form_k = client.post(
        f"{API_PREFIX}/search", data={"k": "2"}, files={"image": ("q.png", query.read_bytes())}
    )
    assert len(form_k.json()["results"]) == 2


def test_search_refuses_bad_requests_with_a_reason(client, photo_index, tmp_path):
    query = photo_index.root / "img_0001.png"
    _assert_error(_upload(client, query, k=0), 400, "k must be a whole number from 1 to 100")
    _assert_error(_upload(client, query, k="lots"), 400, "k must be")
    _assert_error(client.post(f"{API_PREFIX}/search", json={"image": "x"}), 400, "multipart")
    r = client.post(f"{API_PREFIX}/search", files={"photo": ("a.png", query.read_bytes())})
    _assert_error(r, 400, "form field 'image'")
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a picture")
    body = _assert_error(_upload(client, bad), 400, "cannot read image notes.png", "not an image")
    assert "mocoretrieval-upload" not in body["error"]  # the user's name, not the server's copy
    assert not list(Path(tempfile.gettempdir()).glob("mocoretrieval-upload-*"))  # removed


def test_uploads_over_the_byte_limit_get_413(client, photo_index):
    """Declared (Content-Length) or streamed (chunked, no length), a body over the limit is
    refused with 413 and the limit. Checked: with the Content-Length check, the counting
    `bounded` receive and the exact `upload.size` check all removed, the upload is searched
    (200) and the test fails; each check alone is enough to refuse it."""
    big = b"\xff\xd8" + os.urandom(60_000)
    files = {"image": ("big.jpg", big, "image/jpeg")}
    _assert_error(client.post(f"{API_PREFIX}/search", files=files), 413, "0.05 MB", "50000 bytes")
    request = client.build_request("POST", f"{API_PREFIX}/search", files=files)
    body = request.read()

    def chunks():
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    r = client.post(
        f"{API_PREFIX}/search",
        content=chunks(),
        headers={"content-type": request.headers["content-type"]},
    )
    _assert_error(r, 413, "upload too large")
    ok = _upload(client, photo_index.root / "img_0002.jpg")
    assert ok.status_code == 200  # the same server still searches


def test_uploads_over_the_pixel_limit_get_413(client, photo_index, monkeypatch):
    """The pixel bound is the indexer's (Pillow's decompression-bomb limit). Checked: without
    the 413 branch in `Api.search_file` this is a 400 and the test fails."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 64x48 images are 3072 pixels
    body = _assert_error(_upload(client, photo_index.root / "img_0001.png"), 413, "pixels")
    assert "at most 1000 pixels" in body["error"]


def test_similar_to_an_indexed_image_by_its_id(client, photo_index):
    """The id is the relative path, plain or percent-encoded; the image itself is left out.
    Checked: without the ``r.relpath != rel`` filter, img_0004.jpg comes first and it fails."""
    r = client.get(f"{API_PREFIX}/similar/img_0004.jpg", params={"k": 3})
    assert r.status_code == 200, r.text
    paths = [x["path"] for x in r.json()["results"]]
    assert len(paths) == 3 and "img_0004.jpg" not in paths
    assert paths[0] == "sub/copy_of_4.jpg"  # an exact copy
    assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    expected = [h.relpath for h in photo_index.search(photo_index.vector("sub/img_0001.png"), 4)]
    for url in ("sub/img_0001.png", "sub%2Fimg_0001.png"):
        got = client.get(f"{API_PREFIX}/similar/{url}", params={"k": 3}).json()["results"]
        assert [x["path"] for x in got] == [p for p in expected if p != "sub/img_0001.png"][:3]
    _assert_error(client.get(f"{API_PREFIX}/similar/nope.jpg"), 404, "no image 'nope.jpg'")
    _assert_error(client.get(f"{API_PREFIX}/similar/img_0001.png?k=101"), 400, "k must")


@pytest.mark.parametrize("endpoint", ["thumbnail", "similar"])
def test_ids_that_leave_the_folder_are_refused(client, photo_index, endpoint):
    """``..``, absolute paths and URL-encoded forms are refused as ids (400); files inside the
    folder that are not indexed (the index database) and a symlink out of the folder are not
    found (404). Checked, one at a time: without `checked_id`'s test the traversals become
    404s (the index does not hold them) and the 400 assertions fail; without the ``rel in
    index`` test in `Api.indexed`, the database is resolved and answered with an image error
    instead of "no image"; without `resolve_in_root`'s ``is_relative_to`` test, link_out.png
    (its target outside the folder) is served with 200."""
    base = f"{API_PREFIX}/{endpoint}"
    secret = photo_index.root.parent / "secret.txt"
    for raw in (
        "%2E%2E/secret.txt",  # httpx would drop a literal ".." from the URL
        "..%2Fsecret.txt",
        "sub/%2E%2E/%2E%2E/secret.txt",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        f"{secret}",  # an absolute path: // in the URL
        "img_0001.png%00.txt",
        "%2E/img_0001.png",  # a "." part, encoded: httpx drops a literal one
    ):
        r = client.get(f"{base}/{raw}")
        _assert_error(r, 400, "relative to the indexed folder")
        assert b"not for the browser" not in r.content
    for raw in (".mocoretrieval/index.db", ".mocoretrieval/manifest.json", "secret.txt"):
        _assert_error(client.get(f"{base}/{raw}"), 404, "no image")
    assert "link_out.png" in photo_index  # indexed, but its real path is outside the folder
    _assert_error(client.get(f"{base}/link_out.png"), 404, "not available")


def test_thumbnail_of_a_vanished_file_is_404(client, photo_index):
    path = photo_index.root / "img_0011.png"
    moved = path.with_suffix(".bak")
    path.rename(moved)
    try:
        _assert_error(client.get(f"{API_PREFIX}/thumbnail/img_0011.png"), 404, "not available")
    finally:
        moved.rename(path)
    assert client.get(f"{API_PREFIX}/thumbnail/img_0011.png").status_code == 200


def test_duplicates_with_a_bounded_threshold(client, photo_index):
    """Checked: with `threshold_param`'s bound removed, 0.5 is accepted (200) and it fails."""
    r = client.get(f"{API_PREFIX}/duplicates", params={"threshold": 0.99})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["threshold"] == 0.99
    groups = [[x["path"] for x in g] for g in body["groups"]]
    expected = [shown_paths(photo_index, g) for g in photo_index.duplicates(0.99)]
    assert groups == [g for g in expected if len(g) > 1]
    assert any({"img_0004.jpg", "sub/copy_of_4.jpg"} <= set(g) for g in groups)
    assert not any("link_out.png" in g for g in groups)  # its real path is outside the folder
    assert all(x["thumbnail"].startswith(f"{API_PREFIX}/thumbnail/") for x in body["groups"][0])
    default = client.get(f"{API_PREFIX}/duplicates").json()["threshold"]
    assert default == DEFAULT_DUPLICATE_THRESHOLD
    for bad in ("0.5", "1.5", "nan", "close"):
        r = client.get(f"{API_PREFIX}/duplicates", params={"threshold": bad})
        _assert_error(r, 400, "threshold must be a similarity from 0.8 to 1")


def test_info_and_health(client, photo_index):
    info = client.get(f"{API_PREFIX}/info").json()
    assert info["count"] == len(photo_index) and info["dim"] == photo_index.dim
    assert "root" not in info and "index_dir" not in info
    assert str(photo_index.root) not in str(info)
    assert client.get(f"{API_PREFIX}/health").json() == {
        "status": "ok",
        "images": len(photo_index),
    }
    assert client.get(f"{API_PREFIX}/ready").json() == {
        "status": "ready",
        "images": len(photo_index),
    }


def test_readiness_fails_when_the_index_cannot_be_opened(tmp_path):
    """Liveness stays 200; readiness is 503 with the reason once the manifest is gone.
    Checked: with `Api.ready` answering 200 without reading the index, it fails."""
    from app.server import build_server
    from mocoretrieval.index import ImageIndex

    make_images(tmp_path / "photos", 3)
    index = ImageIndex.build(tmp_path / "photos", model=make_tiny_encoder(), workers=0)
    with TestClient(build_server(index)) as http:
        assert http.get(f"{API_PREFIX}/ready").status_code == 200
        (index.path / "manifest.json").unlink()
        assert http.get(f"{API_PREFIX}/health").json() == {"status": "ok", "images": 3}
        _assert_error(http.get(f"{API_PREFIX}/ready"), 503, "cannot be opened")
    index.close()


# A sample line of the text format: name, optional {label="value",...}, value.
_LABELS = r'\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\}'
_SAMPLE = re.compile(rf"^([a-zA-Z_:][a-zA-Z0-9_:]*)({_LABELS})? (-?[0-9.e+-]+|\+Inf|NaN)$")


def _metrics(client) -> dict[str, float]:
    r = client.get(f"{API_PREFIX}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"not `name{{labels}} value`: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def test_metrics_parse_and_count_requests(client, photo_index):
    """Checked: with `Measured` not calling `observe`, the counts stay put and it fails; with
    the raw path as the label, /similar/img_0001.png gets a label of its own and it fails."""
    before = _metrics(client)
    health = (
        'mocoretrieval_http_requests_total{endpoint="/api/v1/health",method="GET",status="200"}'
    )
    similar = (
        'mocoretrieval_http_requests_total{endpoint="/api/v1/similar/{image_id}",'
        'method="GET",status="404"}'
    )
    for _ in range(2):
        client.get(f"{API_PREFIX}/health")
    client.get(f"{API_PREFIX}/similar/nope_{time.time()}.jpg")
    after = _metrics(client)
    assert after[health] == before.get(health, 0) + 2
    assert after[similar] == before.get(similar, 0) + 1
    hist = 'mocoretrieval_http_request_duration_seconds_count{endpoint="/api/v1/health"}'
    assert after[hist] == before.get(hist, 0) + 2
    inf = 'mocoretrieval_http_request_duration_seconds_bucket{endpoint="/api/v1/health",le="+Inf"}'
    assert after[inf] == after[hist]
    assert after["mocoretrieval_index_images"] == len(photo_index)
    assert not any("nope_" in name for name in after)


def test_errors_are_json_and_never_a_traceback(client, photo_index, monkeypatch):
    """Checked: without the `Exception` handler in `add_json_errors`, the 500 is Starlette's
    plain-text "Internal Server Error" and it fails."""
    _assert_error(client.get(f"{API_PREFIX}/nope"), 404, "no such endpoint")
    _assert_error(client.get(f"{API_PREFIX}/search"), 405, "GET is not allowed")

    def broken(*args, **kwargs):
        raise RuntimeError("internal detail /secret/path")

    monkeypatch.setattr(photo_index, "duplicates", broken)
    body = _assert_error(client.get(f"{API_PREFIX}/duplicates"), 500, "server log")
    assert "secret" not in body["error"] and "RuntimeError" not in body["error"]


def test_page_and_api_on_one_server_and_api_only_without_the_page(photo_index):
    """The page's server answers the API too; `build_server` without a page serves the API
    alone: / and Gradio's routes are JSON 404s."""
    from app.server import build_server, private_cache
    from app.ui import build_app

    with private_cache():
        page = build_app(photo_index, k_default=5, max_upload_mb=1)
        with TestClient(build_server(photo_index, page, max_upload_mb=1)) as http:
            r = http.get("/")
            assert r.status_code == 200 and "mocoretrieval" in r.text
            assert http.get(f"{API_PREFIX}/health").json()["status"] == "ok"
            r = http.post(
                f"{API_PREFIX}/search",
                files={"image": ("big.jpg", b"\xff" * 1_500_000, "image/jpeg")},
            )
            _assert_error(r, 413, "at most 1 MB")
        page.close()
    with TestClient(build_server(photo_index)) as http:
        assert http.get(f"{API_PREFIX}/health").status_code == 200
        for path in ("/", "/gradio_api/info", "/config"):
            _assert_error(http.get(path), 404, "no such endpoint")


def test_serve_api_only_runs_without_gradio_on_localhost(tmp_path, tiny_encoder_dir):
    """The real command, with ``import gradio`` made to fail: it serves /api/v1 on 127.0.0.1
    only, and no page. Checked: with `app.server` importing gradio at the top again, the
    process exits with ImportError and the test fails."""
    from mocoretrieval.index import ImageIndex

    root = tmp_path / "photos"
    make_images(root, 4)
    ImageIndex.build(root, model=str(tiny_encoder_dir), workers=0).close()
    port = free_port()
    code = (
        "import sys; sys.modules['gradio'] = None\n"  # `import gradio` raises ImportError
        "from mocoretrieval.cli import main\n"
        f"sys.exit(main(['serve', '--api-only', '--index', {str(root)!r}, '--port', '{port}',"
        " '--backend', 'torch']))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.get(f"{url}{API_PREFIX}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        assert r.status_code == 200 and r.json() == {"status": "ok", "images": 4}
        assert httpx.get(f"{url}/").status_code == 404
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.2:{port}{API_PREFIX}/health", timeout=2)
        with (root / "img_0001.png").open("rb") as f:
            r = httpx.post(f"{url}{API_PREFIX}/search?k=1", files={"image": f}, timeout=60)
        assert r.json()["results"][0]["path"] == "img_0001.png"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "Traceback" not in proc.stdout.read()


def test_serve_command_line_api_only(tmp_path, capsys):
    from mocoretrieval.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--api-only"])
    assert args.api_only is True and args.host is None
    assert build_parser().parse_args(["serve"]).api_only is False
    assert main(["serve", "--api-only", "--share", "--index", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --share") and "Traceback" not in err
