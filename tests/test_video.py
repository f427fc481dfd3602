"""Videos (PyAV): keyframes indexed beside images, results with timestamps, the duplicate rule,
incremental updates and deletions, and skip-with-reason for broken videos or a missing PyAV.

The videos are written here with PyAV: 64x48, 10 fps, about 3 s, with the first codec of
:data:`CODECS` this PyAV can encode. Each scene is a still random texture, as
``factories.make_images`` draws them, so that the tiny random encoder tells scenes apart.

Each test that guards a mechanism says how the mechanism was broken to watch it fail."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from factories import make_images, make_tiny_encoder
from PIL import Image

from mocoretrieval import video
from mocoretrieval.index import ImageIndex

W, H, FPS = 64, 48, 10
CODECS = ("mpeg4", "libx264", "h264", "mjpeg")
# The tiny random encoder maps every picture into a narrow cone (cosines 0.98-1.0); different
# scenes stay below this, the same scene re-encoded above it.
THRESHOLD = 0.999
WORKERS = 0  # decode in the test process: no worker start-up cost


@functools.cache
def codec() -> str:
    """The first of :data:`CODECS` this PyAV wheel can encode."""
    for name in CODECS:
        try:
            av.codec.Codec(name, "w")
        except (av.FFmpegError, ValueError):
            continue
        return name
    raise RuntimeError(f"this PyAV encodes none of {CODECS}")


def scene(seed: int) -> np.ndarray:
    """A still picture (H, W, 3) uint8: a 4x4 grid of random colours."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.kron(base, np.ones((H // 4, W // 4, 1), dtype=np.uint8))


BLACK = np.zeros((H, W, 3), np.uint8)


def clip(scenes: list[int], black_s: float = 1.0, per_scene: int = 7) -> list[np.ndarray]:
    """Frames: ``black_s`` seconds of black, then each scene for ``per_scene`` frames."""
    return [BLACK] * round(black_s * FPS) + [scene(s) for s in scenes for _ in range(per_scene)]


def write_video(path: Path, frames: list[np.ndarray], bit_rate: int = 400_000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec(), rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.bit_rate = bit_rate
        for arr in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(stream.encode())
    return path


def scene_span(s: int, scenes: list[int], black_s: float = 1.0, per_scene: int = 7):
    """The seconds ``[start, end)`` scene ``s`` is shown in :func:`clip`'s video."""
    start = black_s + scenes.index(s) * per_scene / FPS
    return start, start + per_scene / FPS


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A folder of images and videos indexed once: ``a`` and its re-encoded copy, ``b`` sharing
    only the black opening with ``a``, ``c`` sharing one scene, ``slow`` (``a`` at half
    speed: same frames, twice the duration) and a still of one of ``a``'s scenes."""
    tmp = tmp_path_factory.mktemp("video")
    torch.manual_seed(0)
    make_tiny_encoder().save_pretrained(tmp / "encoder")
    root = tmp / "library"
    make_images(root, 4)
    write_video(root / "a.mp4", clip([1, 2, 3]))
    write_video(root / "copies" / "a_reencoded.mp4", clip([1, 2, 3]), bit_rate=60_000)
    write_video(root / "b.mp4", clip([4, 5, 6]))
    write_video(root / "c.mp4", clip([1, 7, 8]))
    write_video(root / "slow.mp4", clip([1, 2, 3], black_s=2.0, per_scene=14))
    Image.fromarray(scene(3)).save(root / "still_of_a.png")
    index = ImageIndex.build(root, model=tmp / "encoder", workers=WORKERS)
    yield index, root, tmp
    index.close()


def test_keyframes_are_stored_with_timestamps(library):
    """A folder of images and videos: every video is one file with N keyframes, each a vector,
    in time order, and ``files.vector_id`` is its first frame's.

    Broken on purpose once: with ``add_batch`` writing a files row per frame (no ``written``
    check), each video held its last frame's vector and this failed."""
    index, _, _ = library
    report = index.last_report
    videos = ["a.mp4", "b.mp4", "c.mp4", "copies/a_reencoded.mp4", "slow.mp4"]
    assert sorted(p for p in report.added if video.is_video_name(p)) == videos
    assert not report.skipped
    frames = index.store.frames()
    by_video: dict[str, list] = {}
    for row in frames:
        by_video.setdefault(row.path, []).append(row)
    assert sorted(by_video) == videos
    for path, rows in by_video.items():
        assert 2 <= len(rows) <= video.MAX_KEYFRAMES, (path, rows)
        times = [r.timestamp for r in rows]
        assert times == sorted(times) and len(set(times)) == len(times)
        assert index.store.file(path).vector_id == min(r.vector_id for r in rows)
    assert index.store.count() == 5 + len(frames)  # 5 images, a vector per keyframe
    assert len(index) == index.info()["count"] == 10  # files: a video counts once


def test_a_black_opening_gives_no_black_keyframe(library):
    """Every keyframe of ``a`` is after its 1 s black opening, and ``load_keyframes`` returns
    no uniform picture.

    Broken on purpose once: with the ``is_uniform`` check removed from ``load_keyframes``, the
    first keyframe was a black frame at 0.2 s and this failed."""
    index, root, _ = library
    assert all(r.timestamp >= 1.0 for r in index.store.frames(["a.mp4", "b.mp4"]))
    keyframes, duration = video.load_keyframes(root / "a.mp4")
    assert 2.9 <= duration <= 3.2
    assert not any(video.is_uniform(k.image) for k in keyframes)


def test_search_by_a_frame_finds_the_video_at_that_time(library, capsys):
    """A frame of ``a`` (scene 2), saved as a PNG, finds ``a`` and its copy, each once, with a
    timestamp inside the scene; the images have no timestamp. The CLI prints ``@ 1.8s``, and
    the HTTP API returns ``timestamp``.

    Broken on purpose once: with ``search_batch`` asking FAISS for ``k`` vectors instead of
    ``k * MAX_KEYFRAMES``, the frames of one video took several of the k hits, 5 files came
    back instead of 8 and this failed."""
    from fastapi.testclient import TestClient

    from app.api import API_PREFIX
    from app.server import build_server
    from mocoretrieval.cli import main

    index, root, tmp = library
    query = tmp / "query.png"
    Image.fromarray(scene(2)).save(query)
    hits = index.search(query, k=8)
    paths = [h.relpath for h in hits]
    assert len(paths) == len(set(paths)) == 8
    assert set(paths[:2]) == {"a.mp4", "copies/a_reencoded.mp4"}
    start, end = scene_span(2, [1, 2, 3])
    for hit in hits[:2]:
        assert start <= hit.timestamp < end, hit
    assert all(h.timestamp is None for h in hits if not video.is_video_name(h.relpath))

    assert main(["search", str(query), "--index", str(root), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert f"a.mp4 @ {hits[0].timestamp:.1f}s" in out
    assert main(["search", str(query), "--index", str(root), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["results"][0]["timestamp"] == pytest.approx(
        hits[0].timestamp
    )

    with TestClient(build_server(index)) as http:
        files = {"image": ("q.png", query.read_bytes(), "image/png")}
        r = http.post(f"{API_PREFIX}/search", params={"k": 8}, files=files)
    assert r.status_code == 200, r.text
    results = {item["path"]: item for item in r.json()["results"]}
    assert start <= results["a.mp4"]["timestamp"] < end
    assert results["img_0000.jpg"]["timestamp"] is None


def test_only_videos_whose_frames_and_duration_agree_are_duplicates(library):
    """``a`` and its re-encoded copy are duplicates; ``b`` (only the black opening in common),
    ``c`` (one scene in common), ``slow`` (the same frames, twice as long) and a still of one
    of ``a``'s scenes are not grouped with ``a``.

    Broken on purpose once each: with ``frames_agree`` accepting a pair when any one frame
    matches, ``c`` joined ``a``'s group; with ``durations_agree`` always true, ``slow`` did;
    with ``VideoPairs`` passing a video-and-image pair through, the still did."""
    index, _, _ = library
    groups = [g for g in index.duplicates(THRESHOLD) if "a.mp4" in g.relpaths]
    assert len(groups) == 1
    assert sorted(groups[0].relpaths) == ["a.mp4", "copies/a_reencoded.mp4"]
    assert groups[0].tier == "near"
    assert all(r.timestamp is None for r in groups[0])


def test_a_changed_video_is_embedded_again_and_a_deleted_one_forgets_its_frames(tmp_path):
    """An unchanged video is not embedded again; a changed one (size/mtime) is, its frames
    replaced, not added to; a deleted one leaves no frame or vector behind.

    Broken on purpose once: without the ``DELETE FROM frames`` in
    ``Store._delete_vectors_of``, the changed video's old frame rows stayed beside the new ones
    and this failed (frame rows no longer matched the stored vectors)."""
    root = tmp_path / "lib"
    make_images(root, 2)
    clip_path = write_video(root / "clip.mp4", clip([1, 2, 3]))
    torch.manual_seed(0)
    with ImageIndex.build(root, model=make_tiny_encoder(), workers=WORKERS) as index:
        n = len(index.store.frames())
        assert n >= 2 and index.store.count() == 2 + n
        assert not index.update(workers=WORKERS).added  # unchanged: no model work
        write_video(clip_path, clip([4, 5, 6], black_s=0.5))
        report = index.update(workers=WORKERS)
        assert report.updated == ["clip.mp4"]
        rows = index.store.frames()
        assert index.store.count() == 2 + len(rows) and all(r.timestamp >= 0.5 for r in rows)
        clip_path.unlink()
        assert index.update(workers=WORKERS).removed == ["clip.mp4"]
        assert index.store.frames() == [] and index.store.count() == 2
        assert [h.relpath for h in index.search(root / "img_0000.jpg", k=5)] == [
            "img_0000.jpg",
            "img_0001.png",
        ]


def test_a_truncated_video_is_skipped_with_a_reason(tmp_path):
    """Half of a video file, beside a good one: skipped with a reason, the run goes on, also
    through the decoding workers.

    Broken on purpose once: with ``load_keyframes`` letting PyAV's errors out (its two
    ``except`` clauses removed), the file was skipped as ``corrupt: ...`` (the generic
    ``data.failure_reason``) and this failed on the reason."""
    root = tmp_path / "lib"
    good = write_video(root / "good.mp4", clip([1, 2]))
    data = good.read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) // 2])
    (root / "empty.mov").write_bytes(b"")
    torch.manual_seed(0)
    with ImageIndex.build(root, model=make_tiny_encoder(), workers=1) as index:
        report = index.last_report
        assert report.added == ["good.mp4"]
        skipped = {p: reason for reason, paths in report.skipped.items() for p in paths}
        assert skipped == {
            "cut.mp4": "truncated or not a video",
            "empty.mov": "truncated or not a video",
        }
        assert index.store.skipped() == skipped


def test_without_pyav_a_video_is_skipped_with_the_install_hint(tmp_path, monkeypatch):
    """With ``import av`` failing, a video is skipped with ``pip install "mocoretrieval[video]"``
    and the images are indexed.

    Broken on purpose once: with ``_import_av`` letting the ImportError out, the video was
    skipped with the generic ``corrupt: ...`` reason and this failed."""
    root = tmp_path / "lib"
    make_images(root, 2)
    write_video(root / "clip.mp4", clip([1, 2]))
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    torch.manual_seed(0)
    with ImageIndex.build(root, model=make_tiny_encoder(), workers=WORKERS) as index:
        report = index.last_report
        assert sorted(report.added) == ["img_0000.jpg", "img_0001.png"]
        assert report.skipped == {video.INSTALL_HINT: ["clip.mp4"]}
        assert 'pip install "mocoretrieval[video]"' in video.INSTALL_HINT


def test_keyframe_rule_on_candidates():
    """The candidates are the midpoints of ``2 * MAX_KEYFRAMES`` equal spans."""
    assert video.candidate_times(8.0, 2) == [1.0, 3.0, 5.0, 7.0]
    assert video.is_uniform(Image.fromarray(BLACK))
    assert not video.is_uniform(Image.fromarray(scene(1)))


class _SidewaysFrame:
    """A decoded frame of a phone video shot upright: stored landscape, rotation -90 (PyAV's
    display-matrix angle, counterclockwise), as PyAV reports it; this PyAV writes no such
    metadata, hence the stand-in."""

    rotation = -90

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.height, self.width = arr.shape[:2]

    def to_image(self) -> Image.Image:
        return Image.fromarray(self.arr)


def test_rotation_metadata_turns_the_frame_upright():
    """A frame stored sideways with rotation -90 comes out turned 90 degrees clockwise: the
    stored left half (white) on top.

    Broken on purpose once: with the angle negated in ``_to_image``, the white half came out
    at the bottom and this failed."""
    arr = np.zeros((H, W, 3), np.uint8)
    arr[:, : W // 2] = 255
    img = np.asarray(video._to_image(_SidewaysFrame(arr), None).convert("L"))
    assert img.shape == (W, H)  # upright: portrait
    assert img[: W // 2].mean() > 250 and img[W // 2 :].mean() < 5


def test_a_shard_merge_copies_every_keyframe(tmp_path):
    """``index`` on torchrun: a rank's shard holds a video's keyframes, and the merge into the
    index's store copies all of them with their timestamps, the first as the file's vector.

    Broken on purpose once: without the ``video_frames`` lookup in ``shards.merge``, only the
    first keyframe was copied and this failed."""
    from mocoretrieval.shards import merge
    from mocoretrieval.store import FileStat, Store

    dim, st = 4, FileStat(10, 20)
    vectors = np.eye(dim, dtype=np.float32)
    shard_path = tmp_path / "shard.db"
    shard = Store(shard_path, dim)
    frames = [None, (1.0, 3.0), (1.8, 3.0), (2.6, 3.0)]
    shard.add_batch(["a.jpg", "v.mp4", "v.mp4", "v.mp4"], vectors, [st] * 4, frames=frames)
    shard.close()
    store = Store(tmp_path / "index.db", dim)
    held = {"a.jpg": shard_path, "v.mp4": shard_path}
    embedded, skipped = merge(store, held, ["v.mp4", "a.jpg"], {"a.jpg": st, "v.mp4": st})
    assert embedded == ["v.mp4", "a.jpg"] and not skipped
    rows = store.frames()
    assert [(r.path, r.timestamp, r.duration) for r in rows] == [
        ("v.mp4", 1.0, 3.0),
        ("v.mp4", 1.8, 3.0),
        ("v.mp4", 2.6, 3.0),
    ]
    got = store.vectors_by_id([r.vector_id for r in rows])
    assert np.array_equal(np.stack([got[r.vector_id] for r in rows]), vectors[1:])
    assert store.file("v.mp4").vector_id == rows[0].vector_id
    assert store.file_count() == 2 and store.count() == 4


def test_the_app_decodes_a_video_thumbnail_when_none_is_stored(library):
    """A video whose stored thumbnail is unusable (none, or the file edited since) is shown
    by its first keyframe, as a photo is by decoding it.

    Broken on purpose once: without the video branch in ``app.thumbnails._decode_thumbnail``,
    the video was "not an image" and this failed."""
    from app.thumbnails import thumbnail

    _, root, _ = library
    img = thumbnail(root / "a.mp4", side=40)
    assert max(img.size) == 40 and not video.is_uniform(img)  # not the black opening


def test_export_writes_a_row_per_keyframe(library, tmp_path):
    """``export-embeddings`` of an index with videos writes every vector, a video's path once
    per keyframe, in the order of the vectors.

    Broken on purpose once: with ``chunks_with_paths`` joining ``files`` only, the export
    refused the index ("holds N vectors but M with a file") and this failed."""
    from mocoretrieval.export_vectors import PATHS_FILE, export_embeddings

    index, _, _ = library
    report = export_embeddings(index.path, tmp_path / "out", chunk_rows=7)
    assert report.count == index.store.count()
    rows = (tmp_path / "out" / PATHS_FILE).read_text().splitlines()[1:]
    paths = [r.split(",", 1)[1] for r in rows]
    assert paths.count("a.mp4") == len(index.store.frames(["a.mp4"]))
    assert paths.count("img_0000.jpg") == 1


def test_adding_a_second_root_keeps_the_frames_of_the_first(tmp_path):
    """A one-folder index with a video gets a second root: its keys, the frames' too, get the
    first root's name in front, and a search still finds the video with its timestamp.

    Broken on purpose once: without ``UPDATE frames`` in ``RootTable.add``, the frames kept
    the old key ``clip.mp4`` (of no root now) and this failed."""
    first = tmp_path / "first"
    write_video(first / "clip.mp4", clip([1, 2, 3]))
    make_images(tmp_path / "second", 2)
    torch.manual_seed(0)
    with ImageIndex.build(first, model=make_tiny_encoder(), workers=WORKERS) as index:
        n = len(index.store.frames())
        index.add_root(tmp_path / "second")
        index.update(workers=WORKERS)
        assert {r.path for r in index.store.frames()} == {"first/clip.mp4"}
        assert len(index.store.frames()) == n
        query = tmp_path / "q.png"
        Image.fromarray(scene(3)).save(query)
        hit = index.search(query, k=1)[0]
        start, end = scene_span(3, [1, 2, 3])
        assert hit.relpath == "first/clip.mp4" and start <= hit.timestamp < end
