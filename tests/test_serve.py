"""`nsfw-guard serve` as a real process on a free local port, driven by a real HTTP client
(httpx): scores equal NSFWDetector's, per-request level and threshold, censoring, every kind of
bad input answered with its 4xx (the server still answering after), 64 concurrent requests
batched, the API key enforced, metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from nsfw_guard import NSFWDetector, read_verdict

from .conftest import PHOTO_PATHS, tiny_frames_on_a_huge_canvas
from .processes import descendants, wait_gone

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCORES = ("neutral", "low", "medium", "high")
REQUEST_TIMEOUT = 2.0  # the module's server's --request-timeout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    checkpoint: Path, *options: str, python: tuple[str, ...] = ("-m", "nsfw_guard")
) -> tuple[subprocess.Popen, str]:
    """``nsfw-guard serve`` on a free port (run as ``python *python serve ...``); returns once
    /healthz answers 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    command = [sys.executable, *python, "serve", "--model", str(checkpoint)]
    command += ["--port", str(port), "--device", "cpu", "--dtype", "float32", *options]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server ended: {process.stdout.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError("the server did not start in 180 s")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM: the server and the processes it started end cleanly, exit 0, no traceback."""
    children = descendants(process.pid)
    process.terminate()
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    assert process.returncode == 0 and b"Traceback" not in output, output.decode()[-3000:]
    assert wait_gone(children, 30), "a server process outlived it"


# ``nsfw-guard serve`` with LitServe's worker monitor polling every 10 ms instead of every 2 s.
_FAST_MONITOR = """
import sys
import litserve

init = litserve.LitServer.__init__

def fast_monitor_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.monitor_internal = 0.01

litserve.LitServer.__init__ = fast_monitor_init
from nsfw_guard.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def server(sharp_checkpoint) -> Iterator[str]:
    """The server most tests share. Its worker monitor polls every 10 ms: LitServe's monitor
    polls its manager, and a stop that shut the manager down under it logged a traceback (CI
    saw it once with the 2 s poll; a 10 ms poll hits it on every stop), so the clean SIGTERM
    stop at the end proves the stop is right however the monitor is timed."""
    options = ["--api-key", KEY, "--max-batch-size", "32", "--batch-timeout-ms", "100"]
    options += ["--max-bytes", "3000000", "--max-images", "8", "--allowed-hosts", "proxied.example"]
    options += ["--request-timeout", str(REQUEST_TIMEOUT)]
    process, url = start_server(sharp_checkpoint, *options, python=("-c", _FAST_MONITOR))
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def expected(sharp_checkpoint) -> dict[str, list[float]]:
    detector = NSFWDetector.from_pretrained(sharp_checkpoint, device="cpu", dtype=torch.float32)
    scores = {}
    for path in PHOTO_PATHS:
        with Image.open(path) as image:
            scores[path.name] = detector.scores([image])[0].tolist()
    return scores


def post(url: str, path: str, **kwargs) -> httpx.Response:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    return httpx.post(url + path, headers=headers, timeout=60, **kwargs)


def scores_of(result: dict) -> list[float]:
    return [result["scores"][name] for name in SCORES]


def test_moderate_scores_equal_the_detector_in_request_order(server, expected):
    photos = PHOTO_PATHS[:4]
    files = [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    response = post(server, "/v1/moderate", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] and len(body["results"]) == len(photos)
    for photo, result in zip(photos, body["results"], strict=True):
        assert scores_of(result) == pytest.approx(expected[photo.name], abs=1e-4)
        assert result["error"] is None
        assert result["flagged"] == (result["scores"]["medium"] >= 0.5)

    # The same images as JSON base64 (one as a data URL), and one as a raw body.
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in photos]
    encoded[1] = "data:image/jpeg;base64," + encoded[1]
    as_json = post(server, "/v1/moderate", json={"images": encoded})
    assert as_json.status_code == 200
    for got, want in zip(as_json.json()["results"], body["results"], strict=True):
        assert scores_of(got) == pytest.approx(scores_of(want), abs=1e-5)
    raw = post(
        server,
        "/v1/moderate",
        content=photos[0].read_bytes(),
        headers={"content-type": "image/jpeg"},
    )
    [alone] = raw.json()["results"]  # a batch of one: the same within float tolerance
    assert scores_of(alone) == pytest.approx(scores_of(body["results"][0]), abs=1e-5)
    assert alone["level"] == body["results"][0]["level"]


def test_level_and_threshold_per_request(server):
    photo = PHOTO_PATHS[0].read_bytes()
    everything = post(
        server,
        "/v1/moderate",
        json={"images": [base64.b64encode(photo).decode()], "level": "high", "threshold": 0.0},
    ).json()["results"][0]
    nothing = post(
        server,
        "/v1/moderate?level=low&threshold=1",
        content=photo,
        headers={"content-type": "image/jpeg"},
    ).json()["results"][0]
    assert everything["flagged"] and everything["level"] == "high"
    assert not nothing["flagged"] and nothing["level"] == "neutral"


def test_censor_returns_the_censored_image_or_the_original(server, sharp_checkpoint):
    photo = PHOTO_PATHS[0]
    data = photo.read_bytes()
    files = {"image": (photo.name, data, "image/jpeg")}
    flagged = post(server, "/v1/censor", files=files, data={"threshold": "0", "action": "blank"})
    assert flagged.status_code == 200, flagged.text
    assert flagged.headers["content-type"] == "image/jpeg"
    assert flagged.headers["x-nsfw-flagged"] == "true"
    assert flagged.headers["x-nsfw-action"] == "blank"
    with Image.open(io.BytesIO(flagged.content)) as image, Image.open(photo) as original:
        assert image.size == original.size and image.format == "JPEG"
        assert max(image.convert("L").getextrema()) <= 8  # blanked black
    # The verdict in the image's metadata too, with the model and the action.
    verdict = read_verdict(flagged.content)
    assert (verdict["flagged"], verdict["action"], verdict["threshold"]) == (True, "blank", 0.0)
    assert verdict["model"] == os.path.realpath(sharp_checkpoint)
    assert verdict["level"] == flagged.headers["x-nsfw-level"]
    clean = post(server, "/v1/censor?threshold=1", files=files)
    assert clean.headers["x-nsfw-flagged"] == "false"
    assert clean.content == data  # byte for byte
    assert re.fullmatch(
        r"neutral=[\d.]+,low=[\d.]+,medium=[\d.]+,high=[\d.]+", clean.headers["x-nsfw-scores"]
    )


def test_censor_regions_uses_the_request_threshold_and_falls_back_to_whole(server):
    photo = PHOTO_PATHS[0]
    files = {"image": (photo.name, photo.read_bytes(), "image/jpeg")}
    # At threshold 0 every re-check is still flagged: the regions action censors whole.
    regions = post(server, "/v1/censor", files=files, data={"threshold": "0", "action": "regions"})
    blurred = post(server, "/v1/censor", files=files, data={"threshold": "0", "action": "blur"})
    assert regions.status_code == 200, regions.text
    assert regions.headers["x-nsfw-action"] == "regions"
    with (
        Image.open(io.BytesIO(regions.content)) as got,
        Image.open(io.BytesIO(blurred.content)) as whole,
    ):
        assert np.array_equal(np.asarray(got), np.asarray(whole))  # the same pixels
    assert read_verdict(regions.content)["action"] == "regions"


def _animation(frames: list[Image.Image]) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40)
    return buffer.getvalue()


def test_every_frame_of_an_animation_is_checked_and_censored(server, detector):
    """A 40-frame GIF whose frame 25 alone is flagged (past the first chunk, and between the
    frames an even sample of 16 takes): moderated as its worst frame, censored whole."""
    photos = [Image.open(path).convert("RGB").resize((96, 64)) for path in PHOTO_PATHS]
    medium = detector.scores(photos)[:, 2]
    clean, bad = photos[int(medium.argmin())], photos[int(medium.argmax())]
    frames = [(bad if i == 25 else clean).copy() for i in range(40)]
    for i, frame in enumerate(frames):  # a dot that moves: no two frames alike (GIF merges them)
        frame.paste((255, 0, 0), (2 * i, 0, 2 * i + 2, 2))
    gif = _animation(frames)
    with Image.open(io.BytesIO(gif)) as animation:
        frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(animation)]
    scores = detector.scores(frames)
    others = torch.cat([scores[:25], scores[26:]])
    threshold = float(others[:, 2].max() + scores[25, 2]) / 2  # frame 25 alone reaches it
    params = {"level": "medium", "threshold": threshold}
    body = {"content": gif, "headers": {"content-type": "image/gif"}, "params": params}
    [result] = post(server, "/v1/moderate", **body).json()["results"]
    assert (result["frames"], result["frames_checked"], result["flagged"]) == (40, 40, True)
    assert result["scores"]["medium"] == pytest.approx(float(scores[25, 2]), abs=2e-3)
    censored = post(
        server,
        "/v1/censor",
        **body,
    )
    assert censored.status_code == 200 and censored.headers["x-nsfw-flagged"] == "true"
    assert censored.headers["content-type"] == "image/gif" and censored.content != gif
    with Image.open(io.BytesIO(censored.content)) as animation:
        assert animation.n_frames == 40


def bad_requests() -> list[tuple[str, dict, int, str]]:
    photo = PHOTO_PATHS[0].read_bytes()
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")  # 100 MP in a few kB
    jpeg = {"content-type": "image/jpeg"}
    form = {"content-type": "multipart/form-data; boundary=x"}
    file_part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    one_file = {"image": ("a.jpg", photo, "image/jpeg")}
    return [
        ("/v1/moderate", {"content": b"not an image", "headers": jpeg}, 422, "not an image"),
        ("/v1/moderate", {"content": photo[: len(photo) // 3], "headers": jpeg}, 422, "decoded"),
        ("/v1/moderate", {"content": b"", "headers": jpeg}, 400, "images[0] is empty"),
        ("/v1/moderate", {"json": {"images": [""]}}, 400, "images[0] is empty"),
        ("/v1/moderate", {"content": bomb.getvalue(), "headers": jpeg}, 413, "pixels"),
        ("/v1/moderate", {"content": b"x" * 3_000_001, "headers": jpeg}, 413, "bytes"),
        ("/v1/moderate", {"json": {"images": ["AAAA"] * 9}}, 413, "at most 8"),
        (
            "/v1/moderate",
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "content type text/plain",
        ),
        ("/v1/moderate", {"json": {"images": ["not base64!"]}}, 400, "not valid base64"),
        (
            "/v1/moderate",
            {"content": b"{oops", "headers": {"content-type": "application/json"}},
            400,
            "not valid JSON",
        ),
        ("/v1/moderate", {"json": {"images": "AAAA"}}, 400, "must be a list"),
        ("/v1/moderate", {"json": {"images": [], "url": "http://x"}}, 400, "unknown field(s): url"),
        ("/v1/moderate", {"json": {"images": []}}, 400, "no images"),
        ("/v1/moderate?level=extreme", {"content": photo, "headers": jpeg}, 400, "level"),
        ("/v1/moderate?threshold=2", {"content": photo, "headers": jpeg}, 400, "threshold"),
        ("/v1/moderate?threshold=nan", {"content": photo, "headers": jpeg}, 400, "threshold"),
        (  # a JSON integer too large for a float
            "/v1/moderate",
            {"json": {"images": [base64.b64encode(photo).decode()], "threshold": 10**400}},
            400,
            "threshold",
        ),
        (  # each frame under Pillow's limit, all of them far over it
            "/v1/moderate",
            {"content": tiny_frames_on_a_huge_canvas(6000, 4000), "headers": jpeg},
            413,
            "4000 frames of 6000x6000",
        ),
        ("/v1/censor?action=melt", {"content": photo, "headers": jpeg}, 400, "action"),
        # The map route: the same gate and worker, each failure its own 4xx.
        ("/v1/map", {"content": b"not an image", "headers": jpeg}, 422, "not an image"),
        ("/v1/map", {"content": photo[: len(photo) // 3], "headers": jpeg}, 422, "decoded"),
        ("/v1/map", {"content": b"", "headers": jpeg}, 400, "images[0] is empty"),
        ("/v1/map?level=neutral", {"content": photo, "headers": jpeg}, 400, "level"),
        ("/v1/map", {"json": {"images": ["AAAA"] * 2}}, 400, "/v1/map takes one image, got 2"),
        ("/v1/map?map=cam", {"content": photo, "headers": jpeg}, 400, "unknown field(s): map"),
        (  # a huge field is not echoed back whole
            "/v1/moderate",
            {"files": one_file, "data": {"level": "x" * 1_000_000}},
            400,
            "level 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (1000002 characters): expected",
        ),
        (
            "/v1/censor",
            {"json": {"images": [base64.b64encode(photo).decode()] * 2}},
            400,
            "one image",
        ),
        ("/v1/moderate", {"files": {"image": ("x.jpg", b"", "image/jpeg")}}, 400, "empty"),
        (
            "/v1/moderate",
            {"content": b"--x\r\nbroken", "headers": form},
            400,
            "ends before its closing boundary (--x--)",
        ),
        # Multipart bodies: each a 4xx of its own, not a 500 or a dropped connection.
        ("/v1/moderate", {"files": [("image", one_file["image"])] * 10}, 413, "more than 8 images"),
        (
            "/v1/moderate",
            {"files": one_file, "data": {"level": ["high"] * 51}},
            400,
            "more than 50 form fields",
        ),
        (
            "/v1/moderate",
            {"content": file_part + photo, "headers": {"content-type": "multipart/form-data"}},
            400,
            "without a boundary",
        ),
        (
            "/v1/moderate",
            {"content": file_part + photo, "headers": form},
            400,
            "ends before its closing boundary (--x--)",
        ),
        (
            "/v1/moderate",
            {
                "content": b"--x\r\nContent-Disposition: form-data\r\n\r\nx\r\n--x--\r\n",
                "headers": form,
            },
            400,
            "without a name",
        ),
        ("/v1/moderate", {"content": b"not multipart", "headers": form}, 400, "cannot be read"),
        # Unknown form fields and query parameters, as unknown JSON fields.
        (
            "/v1/censor",
            {"files": one_file, "data": {"levl": "high"}},
            400,
            "unknown field(s): levl; accepted: level, threshold, action",
        ),
        (
            "/v1/moderate?levl=high",
            {"content": photo, "headers": jpeg},
            400,
            "unknown field(s): levl",
        ),
        (
            "/v1/moderate?levl=high",
            {"json": {"images": [base64.b64encode(photo).decode()]}},
            400,
            "unknown field(s): levl",
        ),
    ]


def test_every_bad_input_gets_its_4xx_and_the_server_goes_on(server):
    for path, kwargs, status, message in bad_requests():
        response = post(server, path, **kwargs)
        assert response.status_code == status, (path, status, response.text[:300])
        error = response.json()["error"]
        assert error["status"] == status and message in error["message"], error
    assert httpx.get(server + "/v1/moderate", headers=AUTH).status_code == 405
    assert httpx.get(server + "/healthz").status_code == 200
    photo = PHOTO_PATHS[1].read_bytes()
    ok = post(server, "/v1/moderate", content=photo, headers={"content-type": "image/jpeg"})
    assert ok.status_code == 200


def test_the_map_route_gives_the_overlay_of_the_servers_model_and_none_of_the_pixels(
    server, detector
):
    """/v1/map's PNG is the region map the model in the server makes of the file (compared
    with the same computation in this process; tests/test_regions.py shows it marks the
    flagged shape), one colour with the map as alpha, the image's shape; key and method
    enforced as on every route."""
    from nsfw_guard.overlay import OVERLAY_COLOR, region_overlay_map

    photo = PHOTO_PATHS[0]
    data = photo.read_bytes()
    files = {"image": (photo.name, data, "image/jpeg")}
    response = post(server, "/v1/map", files=files, data={"level": "high"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-nsfw-map"] == "occlusion" and response.headers["x-nsfw-level"]
    expected = region_overlay_map(detector.scorer, data, "high")
    with Image.open(io.BytesIO(response.content)) as overlay, Image.open(photo) as original:
        assert overlay.mode == "RGBA" and max(overlay.size) == 512
        ratio = original.width / original.height
        assert overlay.width / overlay.height == pytest.approx(ratio, rel=0.01)
        pixels = torch.from_numpy(np.asarray(overlay).copy())
    assert (pixels[..., :3] == torch.tensor(OVERLAY_COLOR, dtype=torch.uint8)).all()
    alpha = (expected.values * 255).round()
    assert (pixels[..., 3].float() - alpha).abs().max() <= 1
    assert response.headers["x-nsfw-map-frame"] == "0" == str(expected.frame)
    assert httpx.post(server + "/v1/map", content=data).status_code == 401
    assert httpx.get(server + "/v1/map", headers=AUTH).status_code == 405


def test_one_image_routes_take_json_with_one_image(server):
    """/v1/censor and /v1/map take ``{"image": base64}`` as well as ``{"images": [base64]}``."""
    encoded = base64.b64encode(PHOTO_PATHS[0].read_bytes()).decode()
    for path in ("/v1/censor", "/v1/map"):
        response = post(server, path, json={"image": encoded})
        assert response.status_code == 200, (path, response.text[:300])
        assert response.headers["content-type"].startswith("image/")


def test_litserves_own_errors_come_in_the_services_error_shape():
    """A request that waited past LitServe's timeout gets its 504 as every other error comes,
    ``{"error": {"status", "message"}}``; the worker's own errors and answers pass as they are."""
    from starlette.responses import JSONResponse, Response
    from starlette.testclient import TestClient

    from nsfw_guard.serve import RequestGate, ServeSettings

    answers = [
        JSONResponse({"detail": "Request timed out"}, 504),
        JSONResponse({"error": {"status": 422, "message": "odd"}}, 422),
        Response(b"\x89PNG", media_type="image/png"),
    ]

    async def litserve(scope, receive, send):  # answers as LitServe does, one after the other
        await answers.pop(0)(scope, receive, send)

    client = TestClient(RequestGate(litserve, ServeSettings()))
    photo = {"content": PHOTO_PATHS[0].read_bytes(), "headers": {"content-type": "image/jpeg"}}
    timed_out = client.post("/v1/moderate", **photo)
    assert timed_out.status_code == 504
    assert timed_out.json() == {
        "error": {"status": 504, "message": "Request timed out: the server is busy; try again"}
    }
    worker_error = client.post("/v1/censor", **photo)
    assert worker_error.json() == {"error": {"status": 422, "message": "odd"}}
    assert client.post("/v1/map", **photo).content == b"\x89PNG"


def test_a_bad_image_in_a_batch_fails_only_its_own_request(server):
    """A file cut short is found only when the worker decodes it: the requests batched with
    it are answered as usual."""
    photo = PHOTO_PATHS[0].read_bytes()
    jpeg = {"content-type": "image/jpeg"}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=60) as client:
            bodies = [photo, photo[: len(photo) // 2], photo, photo]
            calls = [client.post("/v1/moderate", content=b, headers=jpeg) for b in bodies]
            return await asyncio.gather(*calls)

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200, 422, 200, 200]


def test_an_image_that_cannot_be_censored_in_its_format_fails_no_request_batched_with_it(
    server, expected
):
    """Pillow reads XBM but writes only 1-bit images in it: the censored image comes back as
    PNG, and the 31 requests batched with it get their own answers."""
    photos = PHOTO_PATHS
    xbm = io.BytesIO()
    Image.new("1", (64, 48), 1).save(xbm, format="XBM")
    poisoned = 16
    before = httpx.get(server + "/metrics", headers=AUTH).text
    calls = []
    for i in range(32):
        photo = photos[i % len(photos)].read_bytes()
        if i == poisoned:  # flagged at threshold 0: censored, as PNG
            route, body = "/v1/censor?threshold=0", xbm.getvalue()
        elif i % 2:  # flagged nowhere: the image as it came
            route, body = "/v1/censor?threshold=1", photo
        else:
            route, body = "/v1/moderate", photo
        calls.append((route, body, "application/octet-stream"))
    responses = post_concurrently(server, calls)
    assert [r.status_code for r in responses] == [200] * 32, [r.text[:200] for r in responses]
    censored = responses[poisoned]
    assert censored.headers["content-type"] == "image/png"
    assert censored.headers["x-nsfw-flagged"] == "true"
    with Image.open(io.BytesIO(censored.content)) as image:
        assert image.format == "PNG" and image.size == (64, 48)
    assert read_verdict(censored.content)["action"] == "blur"  # the PNG carries the verdict
    for i, response in enumerate(responses):
        photo = photos[i % len(photos)]
        if i == poisoned:
            continue
        if i % 2:
            assert response.content == photo.read_bytes()
        else:
            scores = scores_of(response.json()["results"][0])
            assert scores == pytest.approx(expected[photo.name], abs=1e-4)
    after = httpx.get(server + "/metrics", headers=AUTH).text
    batches = metric(after, "nsfw_guard_batch_requests_count") - metric(
        before, "nsfw_guard_batch_requests_count"
    )
    assert batches < 32  # some batch held several


def test_a_request_that_fails_its_check_fails_alone(sharp_checkpoint, monkeypatch):
    """Should the batched check fail, each request is checked alone: only the one that fails
    alone gets a 422, with what went wrong."""
    from nsfw_guard.serve import ModerationAPI, ServeSettings

    worker = ModerationAPI(ServeSettings(model=str(sharp_checkpoint), dtype="float32"))
    worker.setup("cpu")
    verdicts = worker._verdicts

    def fail_on_narrow_images(images, levels, thresholds):
        if any(image.width == 7 for image in images):
            raise RuntimeError("the check broke on a 7 px wide image")
        return verdicts(images, levels, thresholds)

    monkeypatch.setattr(worker, "_verdicts", fail_on_narrow_images)
    narrow = io.BytesIO()
    Image.new("RGB", (7, 30)).save(narrow, format="PNG")
    photo = PHOTO_PATHS[0].read_bytes()
    jobs = []
    for data in (photo, narrow.getvalue(), photo):
        request = {"kind": "moderate", "level": "medium", "threshold": 0.5, "action": "blur"}
        jobs.append(worker.decode_request({**request, "images": [base64.b64encode(data).decode()]}))
    responses = [worker.encode_response(job) for job in worker.unbatch(worker.predict(jobs))]
    assert [response.status_code for response in responses] == [200, 503, 200]
    error = json.loads(responses[1].body)["error"]
    assert error["message"] == (
        "the images could not be checked: RuntimeError: the check broke on a 7 px wide image"
    )


def test_an_animation_damaged_past_its_first_frames_fails_alone(sharp_checkpoint):
    """Its first chunk of frames decodes; a later frame does not: a 422 for that request,
    found while the batch is checked, and the requests batched with it answered."""
    from nsfw_guard.serve import ModerationAPI, ServeSettings

    worker = ModerationAPI(ServeSettings(model=str(sharp_checkpoint), dtype="float32"))
    worker.setup("cpu")
    frames = [Image.new("RGB", (64, 48), (i * 6, 0, 255 - i * 6)) for i in range(40)]
    gif = _animation(frames)
    cut = gif[: len(gif) * 3 // 4]  # frames 0-29 or so whole, the rest cut
    jobs = []
    for data in (PHOTO_PATHS[0].read_bytes(), cut, gif):
        request = {"kind": "moderate", "level": "medium", "threshold": 0.5, "action": "blur"}
        jobs.append(worker.decode_request({**request, "images": [base64.b64encode(data).decode()]}))
    responses = [worker.encode_response(job) for job in worker.unbatch(worker.predict(jobs))]
    assert [response.status_code for response in responses] == [200, 422, 200]
    message = json.loads(responses[1].body)["error"]["message"]
    assert message.startswith("images[0] could not be decoded: ")
    assert json.loads(responses[2].body)["results"][0]["frames_checked"] == 40


def test_a_stalled_body_gets_408_and_holds_up_no_other_request(server):
    """A client that sends part of its body and stalls is answered 408 after --request-timeout;
    requests meanwhile and after are answered as usual."""
    photo = PHOTO_PATHS[0].read_bytes()
    port = int(server.rsplit(":", 1)[1])
    head = (
        f"POST /v1/moderate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: image/jpeg\r\nContent-Length: {len(photo)}\r\n\r\n"
    )
    jpeg = {"content-type": "image/jpeg"}
    with socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.settimeout(REQUEST_TIMEOUT + 30)
        started = time.monotonic()
        stalled.sendall(head.encode() + photo[:1000])  # and nothing more
        assert post(server, "/v1/moderate", content=photo, headers=jpeg).status_code == 200
        answer = b""
        while chunk := stalled.recv(65536):  # the server closes the connection
            answer += chunk
        waited = time.monotonic() - started
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", answer[:300]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["status"] == 408
    assert f"did not arrive within {REQUEST_TIMEOUT:g} s (1000 bytes came)" in error["message"]
    assert REQUEST_TIMEOUT <= waited < REQUEST_TIMEOUT + 5, waited
    assert post(server, "/v1/moderate", content=photo, headers=jpeg).status_code == 200


def post_concurrently(server: str, requests: list[tuple[str, bytes, str]]) -> list[httpx.Response]:
    """Each ``(route, body, content type)`` posted at once, on a connection of its own."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(requests))
        async with httpx.AsyncClient(
            base_url=server, headers=AUTH, timeout=120, limits=limits
        ) as client:
            calls = [
                client.post(route, content=body, headers={"content-type": media_type})
                for route, body, media_type in requests
            ]
            return await asyncio.gather(*calls)

    return asyncio.run(run())


def metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def test_64_concurrent_requests_are_answered_and_batched(server, expected):
    photos = PHOTO_PATHS
    before = httpx.get(server + "/metrics", headers=AUTH).text
    calls = [
        ("/v1/moderate", photos[i % len(photos)].read_bytes(), "image/jpeg") for i in range(64)
    ]
    responses = post_concurrently(server, calls)
    assert all(r.status_code == 200 for r in responses)
    for i, response in enumerate(responses):
        scores = scores_of(response.json()["results"][0])
        assert scores == pytest.approx(expected[photos[i % len(photos)].name], abs=1e-4)
    after = httpx.get(server + "/metrics", headers=AUTH).text
    batches = metric(after, "nsfw_guard_batch_requests_count") - metric(
        before, "nsfw_guard_batch_requests_count"
    )
    requests = metric(after, "nsfw_guard_batch_requests_sum") - metric(
        before, "nsfw_guard_batch_requests_sum"
    )
    assert requests == 64 and batches < 64, (requests, batches)  # some batch held several
    assert 'nsfw_guard_requests_total{route="/v1/moderate",status="200"}' in after
    assert "nsfw_guard_request_seconds_bucket" in after
    assert 'nsfw_guard_errors_total{route="/v1/moderate",status="422"}' in after


def test_the_api_key_is_required_everywhere_but_healthz_and_the_page(server):
    photo = PHOTO_PATHS[0].read_bytes()
    jpeg = {"content-type": "image/jpeg"}
    wrong = ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY})
    for headers in (*wrong, {"Authorization": b"Bearer \xe9"}):  # any bytes: a 401, no 500
        response = httpx.post(server + "/v1/moderate", content=photo, headers={**jpeg, **headers})
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
        assert httpx.get(server + "/metrics", headers=headers).status_code == 401
        assert (
            httpx.post(
                server + "/v1/censor", content=photo, headers={**jpeg, **headers}
            ).status_code
            == 401
        )
    assert httpx.get(server + "/healthz").status_code == 200
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "nsfw-guard" in page.text
    assert httpx.post(server + "/internal/check", headers=AUTH, json={}).status_code == 404


def test_on_127_0_0_1_it_answers_to_loopback_names_only(server):
    """A web page that reaches the server through a DNS name of its own (DNS rebinding) gets
    nothing, not even the page; localhost, and the names --allowed-hosts adds, are fine."""
    photo = PHOTO_PATHS[0].read_bytes()
    rebound = {**AUTH, "content-type": "image/jpeg", "Host": "rebound.example:8000"}
    responses = [
        httpx.get(server + "/", headers=rebound),
        httpx.get(server + "/metrics", headers=rebound),
        httpx.post(server + "/v1/moderate", content=photo, headers=rebound),
    ]
    for response in responses:
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert "answers to 127.0.0.1, ::1, localhost, proxied.example only" in message
    for name in ("localhost", "proxied.example"):  # and a name --allowed-hosts gives
        named = {**rebound, "Host": name}
        assert httpx.post(server + "/v1/moderate", content=photo, headers=named).status_code == 200


# The pages, in a real headless browser ------------------------------------------------------------

SCREENSHOTS = os.environ.get("NSFW_GUARD_SCREENSHOTS")  # a folder: keep the pages' screenshots


@pytest.fixture(scope="module")
def browser():
    import shutil

    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("the page tests need Chromium: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


def screenshot(page, name: str, tmp_path: Path) -> None:
    folder = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name))
    assert (folder / name).stat().st_size > 1000


def test_the_page_checks_a_dropped_image_and_shows_the_original_on_click(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    page.goto(server + "/")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.fill("#threshold", "0")  # everything flagged: the preview is censored
    page.set_input_files("#files", [str(PHOTO_PATHS[0]), str(PHOTO_PATHS[2])])
    page.wait_for_selector(".card .level >> nth=1", timeout=60_000)
    cards = page.locator(".card")
    assert cards.count() == 2
    for i in range(2):
        card = cards.nth(i)
        assert "flagged" in card.locator(".level").inner_text()
        assert card.locator(".bar").count() == 4
        assert card.locator("img.preview").get_attribute("alt").startswith("censored preview")
    screenshot(page, "moderate.png", tmp_path)
    card = cards.nth(0)
    censored = card.locator("img.preview").get_attribute("src")
    card.locator("button.original").click()
    assert card.locator("img.preview").get_attribute("src") != censored
    assert card.locator("img.preview").get_attribute("alt").startswith("original of")
    page.close()


def test_the_page_toggles_the_map_over_the_censored_preview_on_click(server, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    page.goto(server + "/")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.fill("#threshold", "0")  # flagged: the preview is censored
    page.set_input_files("#files", [str(PHOTO_PATHS[0])])
    card = page.locator(".card")
    preview = card.locator("img.preview")
    preview.wait_for(timeout=60_000)
    censored = preview.get_attribute("src")
    assert card.locator("img.overlay").count() == 0  # nothing until asked for
    card.locator("button.original").click()  # the original is shown...
    assert preview.get_attribute("alt").startswith("original of")
    preview.click()  # ...and the map puts the censored preview back under it
    overlay = card.locator("img.overlay")
    overlay.wait_for(state="visible", timeout=60_000)
    page.wait_for_function("document.querySelector('img.overlay').naturalWidth > 0")
    assert preview.get_attribute("src") == censored
    assert preview.get_attribute("alt").startswith("censored preview")
    assert overlay.bounding_box() == preview.bounding_box()  # drawn over it, box for box
    assert card.locator("button.map").inner_text() == "Hide map"
    # What the overlay shows: the PNG /v1/map gave, one colour, none of the image's pixels.
    drawn = page.evaluate(
        """async () => {
            const blob = await (await fetch(document.querySelector('img.overlay').src)).blob();
            return [...new Uint8Array(await blob.arrayBuffer())];
        }"""
    )
    with Image.open(io.BytesIO(bytes(drawn))) as image:
        assert image.mode == "RGBA"
        assert (np.asarray(image)[..., :3] == (255, 24, 0)).all()
    preview.click()  # a second click hides it
    overlay.wait_for(state="hidden")
    assert card.locator("button.map").inner_text() == "Show map"
    card.locator("button.map").click()  # the button too, with no second request
    overlay.wait_for(state="visible")
    assert card.locator("img.overlay").count() == 1
    page.close()


def start_review(results: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """``nsfw-guard review`` on a free port; returns once it answers, with the address it
    printed (holding the key)."""
    port = free_port()
    command = [sys.executable, "-m", "nsfw_guard", "review", str(results), "--port", str(port)]
    process = subprocess.Popen(
        [*command, *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    printed = process.stdout.readline().decode()  # "... open http://...:PORT/?key=KEY"
    address = printed.split(" open ")[-1].strip()
    assert address.startswith(url + "?key="), printed
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 401:  # up, and wants its key
                return process, address
        except httpx.HTTPError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
        time.sleep(0.2)


def test_the_review_page_toggles_the_region_map_with_a_model(browser, tmp_path):
    """``review --model``: ``m`` (or the card's map button) draws the record's map over its
    blurred thumbnail, box for box, hot on the bright square that flags it; again hides it."""
    from .test_review import bright_square_records

    _, results, model = bright_square_records(tmp_path)
    process, address = start_review(results, "--model", str(model), "--device", "cpu")
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(address)
        page.wait_for_selector(".card.flagged")  # blurred
        assert page.locator("#maps").inner_text() == ""
        page.keyboard.press("m")
        overlay = page.locator(".card .overlay")
        overlay.wait_for(state="visible")
        page.wait_for_function("document.querySelector('.overlay').naturalWidth > 0")
        assert overlay.bounding_box() == page.locator(".card .thumb").bounding_box()
        alpha = page.evaluate(
            """() => {
                const image = document.querySelector('.overlay');
                const canvas = document.createElement('canvas');
                canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
                const context = canvas.getContext('2d');
                context.drawImage(image, 0, 0);
                const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
                const at = (row, column) => data[(row * canvas.width + column) * 4 + 3];
                return [at(24, 24), at(56, 56)];
            }"""
        )
        assert alpha[0] > 128 and alpha[1] < 13, alpha  # on the square, and far from it
        page.keyboard.press("m")
        overlay.wait_for(state="hidden")
        page.locator(".card button.map").click()
        overlay.wait_for(state="visible")
        page.close()
    finally:
        process.kill()
        process.wait(timeout=30)


def test_the_review_page_saves_keyboard_decisions_that_survive_a_reload(
    level_checkpoints, browser, tmp_path, capsys
):
    from nsfw_guard.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in PHOTO_PATHS:
        (photos / photo.name).write_bytes(photo.read_bytes())
    results = tmp_path / "results.jsonl"
    options = ["--device", "cpu", "--workers", "0", "--quiet", "--output", str(results)]
    main(["scan", str(photos), "--model", str(level_checkpoints["medium"]), *options])
    capsys.readouterr()
    process, address = start_review(results)
    url = address.split("?key=")[0]
    try:
        key = {"Authorization": "Bearer " + address.split("?key=")[1]}
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(address)
        assert page.url == url  # the key is in a cookie now, out of the address bar
        page.wait_for_selector(".card >> nth=6")
        assert page.locator(".card").count() == len(PHOTO_PATHS)
        assert page.locator(".card.flagged").count() == len(PHOTO_PATHS)  # blurred
        page.wait_for_function(
            "[...document.querySelectorAll('.thumb')].every(i => i.complete && i.naturalWidth)"
        )
        first = page.locator(".card").nth(0).get_attribute("title")
        page.keyboard.press("r")  # reject the first, move to the second
        page.keyboard.press("a")  # approve the second
        page.wait_for_selector(".card.approve")
        assert "2 decided" in page.locator("#summary").inner_text()
        decisions = [
            json.loads(line)
            for line in (tmp_path / "results.decisions.jsonl").read_text().splitlines()
        ]
        assert [d["decision"] for d in decisions] == ["reject", "approve"]
        assert decisions[0]["path"] == first and decisions[0]["member"] is None
        screenshot(page, "review.png", tmp_path)

        page.reload()
        page.wait_for_selector(".card.reject")
        assert page.locator(".card").nth(0).locator(".decision").inner_text().lower() == "reject"
        assert page.locator(".card").nth(1).locator(".decision").inner_text().lower() == "approve"
        assert "2 decided" in page.locator("#summary").inner_text()
        page.select_option("#level", "undecided")
        page.wait_for_function("document.querySelectorAll('.card').length === 5")
        assert httpx.get(url + "decisions.csv").status_code == 401
        exported = httpx.get(url + "decisions.csv", headers=key).text.splitlines()
        assert exported[0] == "path,member,decision,time,level,flagged,realpath"
        assert len(exported) == 3 and exported[1].startswith(first + ",,reject,")
        assert httpx.get(url + "thumbnail/99", headers=key).status_code == 404
        # Started without --model: no maps, and the page says so.
        assert "no region maps" in page.locator("#maps").inner_text()
        page.keyboard.press("m")
        assert page.locator(".overlay").count() == page.locator("button.map").count() == 0
        assert httpx.get(url + "map/0", headers=key).status_code == 404
        page.close()
        process.terminate()  # SIGTERM: a clean stop
        output = process.communicate(timeout=30)[0].decode()
        assert process.returncode == 0 and "review stopped; every decision is saved" in output
        assert "Traceback" not in output and "batch in flight" not in output, output
    finally:
        process.kill()
        process.wait(timeout=30)


def test_the_worker_takes_one_request_at_a_time_without_batching(sharp_checkpoint, expected):
    """With --max-batch-size 1 LitServe hands the worker single requests, not lists."""
    from nsfw_guard.serve import ModerationAPI, ServeSettings

    worker = ModerationAPI(ServeSettings(model=str(sharp_checkpoint), dtype="float32"))
    worker.setup("cpu")
    photo = PHOTO_PATHS[0]
    request = {
        "kind": "moderate",
        "level": "medium",
        "threshold": 0.5,
        "action": "blur",
        "images": [base64.b64encode(photo.read_bytes()).decode()],
    }
    response = worker.encode_response(worker.predict(worker.decode_request(request)))
    result = json.loads(response.body)["results"][0]
    assert scores_of(result) == pytest.approx(expected[photo.name], abs=1e-4)


@pytest.mark.processes
def test_serve_stops_with_one_clear_line_when_its_model_worker_dies(sharp_checkpoint):
    """A model worker killed (the OOM killer, a driver crash): the server goes down, exit 4 with
    what happened, no traceback, no process left."""
    from nsfw_guard.cli import EXIT_ERROR

    process, _ = start_server(sharp_checkpoint, python=("-c", _FAST_MONITOR))  # finds it sooner
    children = descendants(process.pid)
    # LitServe spawns its model worker; the manager and the HTTP server are forked.
    worker = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(worker) == 1, children
    os.kill(worker[0], signal.SIGKILL)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == EXIT_ERROR and b"Traceback" not in output, output.decode()[-3000:]
    assert b"its model worker process ended (it crashed or was killed)" in output
    assert wait_gone(children, 30), "a server process outlived it"


def test_serve_says_what_is_wrong_before_starting(capsys):
    from nsfw_guard.cli import EXIT_USAGE, main

    assert main(["serve", "--model", "./no/such/folder"]) == EXIT_USAGE
    assert "no model folder at './no/such/folder'" in capsys.readouterr().err
    for args, message in [
        (["--port", "80"], "--port 80: expected 1024 to 65535"),
        (["--threshold", "1.5"], "--threshold 1.5: expected a number in [0, 1]"),
        (["--max-batch-size", "0"], "--max-batch-size 0: expected 1 or more"),
        (["--request-timeout", "0"], "--request-timeout 0.0: expected a number of seconds above 0"),
        (["--request-timeout", "nan"], "--request-timeout nan: expected a number of seconds"),
        (["--host", "example.com"], "invalid choice: 'example.com'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", *args])
        assert exit_info.value.code == EXIT_USAGE and message in capsys.readouterr().err
