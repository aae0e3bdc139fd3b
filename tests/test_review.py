"""The review server's API in process (Starlette's TestClient, real files): 10,000 records come a
page at a time, filtered and sorted by the server; decisions are appended and read back; only
the images the records name are served, and not once they changed; without its key, from
another host name or from another site, nothing is shown or decided."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from nsfw_guard.access import LOOPBACK_HOSTS
from nsfw_guard.records import RECORD_FIELDS, RecordFile
from nsfw_guard.review import Decisions, create_app, decisions_path

from .conftest import PHOTO_PATHS


def record(path: str, level: str, score: float, **values) -> dict:
    info = os.stat(path) if os.path.exists(path) else None
    return {
        **dict.fromkeys(RECORD_FIELDS),
        "path": path,
        "realpath": os.path.realpath(path),
        "level": level,
        "neutral": 1 - score,
        "low": score,
        "medium": score / 2,
        "high": score / 4,
        "flagged": score >= 0.5,
        "bytes": info.st_size if info else 1,
        "mtime": info.st_mtime if info else 1.0,
        **values,
    }


@pytest.fixture
def many(tmp_path):
    results = tmp_path / "results.jsonl"
    rows = [record(f"/data/{i:05d}.jpg", "low", (i % 100) / 100) for i in range(10_000)]
    rows[123] = {
        **rows[123],
        "level": None,
        "error": "OSError: gone",
        **dict.fromkeys(("neutral", "low", "medium", "high")),
    }
    with RecordFile(results) as file:
        file.write(rows)
    return results


def test_ten_thousand_records_come_a_page_at_a_time(many):
    client = TestClient(create_app(many))
    body = client.get("/api/records", params={"limit": 100}).json()
    assert body["total"] == body["all"] == 10_000 and len(body["records"]) == 100
    assert body["records"][0]["error"] == "OSError: gone"  # worst first: errors, then scores
    scores = [r["scores"]["low"] for r in body["records"][1:]]
    assert scores == sorted(scores, reverse=True) and scores[0] == 0.99
    flagged = client.get("/api/records", params={"level": "flagged", "offset": 50}).json()
    assert flagged["total"] == 5_000 and len(flagged["records"]) == 100
    assert all(r["flagged"] for r in flagged["records"])
    by_path = client.get("/api/records", params={"sort": "path", "limit": 3}).json()
    assert [r["path"] for r in by_path["records"]] == [
        "/data/00000.jpg",
        "/data/00001.jpg",
        "/data/00002.jpg",
    ]
    assert client.get("/api/records", params={"limit": "x"}).status_code == 400
    assert client.get("/api/records", params={"sort": "size"}).status_code == 400


def test_decisions_are_appended_read_back_and_exported(many):
    records = many.read_bytes()
    client = TestClient(create_app(many))
    assert client.post("/api/decisions", json={"index": 5, "decision": "reject"}).status_code == 200
    assert (
        client.post("/api/decisions", json={"index": 5, "decision": "approve"}).status_code == 200
    )
    assert (
        client.post("/api/decisions", json={"index": 10**6, "decision": "approve"}).status_code
        == 400
    )
    assert client.post("/api/decisions", json={"index": 1, "decision": "maybe"}).status_code == 400
    json_type = {"Content-Type": "application/json"}
    assert client.post("/api/decisions", content=b"{", headers=json_type).status_code == 400
    lines = decisions_path(many).read_text().splitlines()
    assert [json.loads(line)["decision"] for line in lines] == ["reject", "approve"]
    assert many.read_bytes() == records  # the records file is never touched

    again = TestClient(create_app(many))  # a restart: the decisions are read back
    body = again.get("/api/records", params={"sort": "path", "limit": 10}).json()
    assert body["decided"] == 1 and body["records"][5]["decision"] == "approve"
    undecided = again.get("/api/records", params={"level": "undecided"}).json()
    assert undecided["total"] == 9_999
    exported = again.get("/decisions.csv").text.splitlines()
    assert exported == [
        "path,member,decision,time,level,flagged",
        f"/data/00005.jpg,,approve,{json.loads(lines[1])['time']},low,False",
    ]


def test_a_decisions_file_that_is_not_ours_is_refused(many):
    decisions_path(many).write_text("my notes\n")
    with pytest.raises(ValueError, match="line 1: not a decision; is this file nsfw-guard's"):
        create_app(many)
    assert decisions_path(many).read_text() == "my notes\n"  # untouched
    elsewhere = many.with_name("elsewhere.jsonl")
    decisions_path(many).rename(elsewhere)
    decisions_path(many).symlink_to(elsewhere)
    with pytest.raises(ValueError, match="is a link; nsfw-guard does not write through it"):
        create_app(many)
    assert elsewhere.read_text() == "my notes\n"


@pytest.fixture
def one_photo(tmp_path):
    """A record file of one photo, flagged."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(PHOTO_PATHS[0].read_bytes())
    results = tmp_path / "results.jsonl"
    with RecordFile(results) as file:
        file.write([record(str(photo), "low", 0.9)])
    return results


def test_thumbnails_only_of_recorded_images_and_not_once_changed(one_photo, tmp_path):
    results, photo = one_photo, tmp_path / "photo.jpg"
    client = TestClient(create_app(results))
    thumbnail = client.get("/thumbnail/0")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert client.get("/thumbnail/1").status_code == 404
    assert client.get("/thumbnail/0/../../etc/passwd").status_code == 404
    photo.write_bytes(PHOTO_PATHS[1].read_bytes())  # replaced since the scan
    fresh = TestClient(create_app(results))
    changed = fresh.get("/thumbnail/0")
    assert changed.status_code == 404 and "changed since it was scanned" in changed.text


def _bright_square(path) -> None:
    """A dark 64 x 64 PNG with a bright square filling cell (1, 1) of a 4 x 4 grid."""
    pixels = np.full((64, 64, 3), 26, dtype=np.uint8)
    pixels[16:32, 16:32] = 240
    Image.fromarray(pixels).save(path)


def bright_square_records(tmp_path) -> tuple[Path, Path, Path]:
    """``square.png`` (:func:`_bright_square`), a record file flagging it "high", and a
    brightness checkpoint that flags it: ``(square, results, model folder)``."""
    from .conftest import make_brightness_checkpoint

    square = tmp_path / "square.png"
    _bright_square(square)
    results = tmp_path / "results.jsonl"
    with RecordFile(results) as file:
        file.write([record(str(square), "high", 0.9)])
    return square, results, make_brightness_checkpoint(tmp_path / "bright", -1.2)


def test_region_maps_only_with_a_model_only_of_recorded_images(tmp_path):
    """/map/N: the record's map (hot on the bright square that flags it, for the brightness
    checkpoint), 404 without a model, for a record that is not there or a file changed since
    the scan, 400 for a bad level; the records say whether there are maps."""
    import torch

    from nsfw_guard import NSFWDetector

    square, results, folder = bright_square_records(tmp_path)
    without = TestClient(create_app(results))
    assert without.get("/api/records").json()["maps"] is False
    refused = without.get("/map/0")
    assert refused.status_code == 404 and "--model" in refused.json()["error"]["message"]

    scorer = NSFWDetector.from_pretrained(folder, device="cpu", dtype=torch.float32).scorer
    client = TestClient(create_app(results, scorer=scorer))
    assert client.get("/api/records").json()["maps"] is True
    response = client.get("/map/0")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-nsfw-map-level"] == "high"  # the record's own level
    with Image.open(io.BytesIO(response.content)) as overlay:
        assert overlay.size == (64, 64)
        alpha = np.asarray(overlay)[..., 3]
    # The square fills cell (1, 1) of the 4 x 4 grid: hiding it, or any 2 x 2 block holding
    # it, clears the flag; its neighbours share those blocks (half as hot); the rest, nothing.
    assert alpha[16:32, 16:32].min() > 200
    outside = np.ones((64, 64), dtype=bool)
    outside[16:32, 16:32] = False
    assert alpha[outside].max() < 150
    neighbours = np.zeros((64, 64), dtype=bool)
    neighbours[:48, :48] = True
    assert alpha[~neighbours].max() < 13
    assert client.get("/map/0?level=low").headers["x-nsfw-map-level"] == "low"
    assert client.get("/map/1").status_code == 404
    assert client.get("/map/-1").status_code == 404
    bad_level = client.get("/map/0?level=neutral")
    assert bad_level.status_code == 400 and "level" in bad_level.json()["error"]["message"]
    square.write_bytes(PHOTO_PATHS[0].read_bytes())  # replaced since the scan
    changed = client.get("/map/0")
    assert changed.status_code == 404 and "changed since it was scanned" in changed.text


def test_region_maps_take_the_map_and_cells_given(tmp_path, capsys):
    """review --region-cells / --region-map: the maps' grid and kind, checked up front."""
    import torch

    from nsfw_guard import NSFWDetector
    from nsfw_guard.cli import EXIT_USAGE, main

    _, results, folder = bright_square_records(tmp_path)
    scorer = NSFWDetector.from_pretrained(folder, device="cpu", dtype=torch.float32).scorer
    client = TestClient(create_app(results, scorer=scorer, region_params={"cells": 2}))
    with Image.open(io.BytesIO(client.get("/map/0").content)) as overlay:
        alpha = np.asarray(overlay)[..., 3]
    # 2 x 2 cells of 32 px: the square lies in the top-left one, the only one hot. (Hiding
    # the one block, the whole image, leaves its mean colour, which this model still flags.)
    assert alpha[:32, :32].min() > 100 and alpha[32:].max() < 13 and alpha[:, 32:].max() < 13
    with pytest.raises(ValueError, match="region_cells=0"):
        create_app(results, scorer=scorer, region_params={"cells": 0})
    with pytest.raises(SystemExit) as stopped:
        main(["review", str(results), "--region-cells", "2"])  # no --model: no maps
    assert stopped.value.code == EXIT_USAGE
    assert "are for the maps of --model" in capsys.readouterr().err


def test_decisions_file_keeps_every_line(tmp_path):
    decisions = Decisions(tmp_path / "r.decisions.jsonl")
    for i in range(20):
        decisions.add(f"{i}.jpg", None, "approve" if i % 2 else "reject")
    assert len((tmp_path / "r.decisions.jsonl").read_text().splitlines()) == 20
    assert len(Decisions(tmp_path / "r.decisions.jsonl").latest()) == 20


def test_without_its_key_nothing_is_shown_or_decided(one_photo):
    results = one_photo
    app = create_app(results, key="k3y", hosts=LOOPBACK_HOSTS)
    decision = {"index": 0, "decision": "approve"}

    stranger = TestClient(app, base_url="http://127.0.0.1:8001")
    for path in ("/api/records", "/thumbnail/0", "/decisions.csv"):
        response = stranger.get(path)
        assert response.status_code == 401 and "nsfw-guard review printed" in response.text
    assert stranger.get("/").status_code == 401 and "?key=" in stranger.get("/").text
    assert stranger.get("/?key=wrong").status_code == 401
    assert stranger.get("/?key=wr%C3%B6ng").status_code == 401  # any text: no 500
    assert (
        stranger.get("/api/records", headers={"Authorization": b"Bearer \xe9"}).status_code == 401
    )
    assert stranger.post("/api/decisions", json=decision).status_code == 401
    assert not decisions_path(results).exists()

    bearer = {"Authorization": "Bearer k3y"}
    assert stranger.get("/api/records", headers=bearer).json()["total"] == 1

    # Opening the printed address sets the cookie and takes the key out of the address.
    reviewer = TestClient(app, base_url="http://127.0.0.1:8001")
    opened = reviewer.get("/?key=k3y")
    assert opened.status_code == 200 and str(opened.url) == "http://127.0.0.1:8001/"
    assert reviewer.get("/thumbnail/0").headers["content-type"] == "image/jpeg"
    assert reviewer.post("/api/decisions", json=decision).status_code == 200

    # Another site's page: a form post (no JSON), or a request from its origin, is refused.
    form = reviewer.post(
        "/api/decisions", content=json.dumps(decision), headers={"Content-Type": "text/plain"}
    )
    assert form.status_code == 415
    other = {"Origin": "http://evil.example"}
    assert reviewer.post("/api/decisions", json=decision, headers=other).status_code == 403
    own = {"Origin": "http://127.0.0.1:8001"}
    assert reviewer.post("/api/decisions", json=decision, headers=own).status_code == 200
    assert len(decisions_path(results).read_text().splitlines()) == 2

    # A name of another host that resolves to 127.0.0.1 (DNS rebinding) is refused, key or not.
    rebound = TestClient(app, base_url="http://evil.example:8001")
    refused = rebound.get("/api/records", headers=bearer)
    assert refused.status_code == 400 and "answers to 127.0.0.1, ::1, localhost only" in (
        refused.text
    )
    for name in ("localhost:8001", "[::1]:8001"):
        assert stranger.get("/api/records", headers={**bearer, "Host": name}).status_code == 200


# A kill mid-append, spreadsheets, odd indices, animations --------------------------------------


def _decision_line(name: str, decision: str = "reject") -> bytes:
    entry = {"path": name, "member": None, "decision": decision, "time": 1712345678.25}
    return (json.dumps(entry) + "\n").encode()


def test_a_last_line_cut_anywhere_keeps_every_whole_decision(tmp_path):
    """Cut at every byte of the last line: the whole lines are kept, the cut line is kept when
    only its line break is missing, else moved to a file of its own (never lost), and the
    decisions go on from there."""
    whole = _decision_line("/data/a.jpg") + _decision_line("/data/b.jpg", "approve")
    last = _decision_line("/data/c.jpg")
    for cut in range(1, len(last)):
        folder = tmp_path / str(cut)
        folder.mkdir()
        path = folder / "r.decisions.jsonl"
        path.write_bytes(whole + last[:cut])
        kept_whole = cut == len(last) - 1  # only the line break is missing
        if kept_whole:
            decisions = Decisions(path)
        else:
            with pytest.warns(
                UserWarning, match=r"last line was cut short.*2 whole line\(s\) kept"
            ):
                decisions = Decisions(path)
        names = {key[0] for key in decisions.latest()}
        assert names == (
            {"/data/a.jpg", "/data/b.jpg"} | ({"/data/c.jpg"} if kept_whole else set())
        )
        aside = folder / "r.decisions.jsonl.cut-line-1"
        if kept_whole:
            assert path.read_bytes() == whole + last and not aside.exists()
        else:
            assert path.read_bytes() == whole and aside.read_bytes() == last[:cut]
        decisions.add("/data/d.jpg", None, "approve")
        assert len(Decisions(path).latest()) == 3 + kept_whole


def test_cut_lines_set_aside_twice_are_both_kept(tmp_path):
    path = tmp_path / "r.decisions.jsonl"
    path.write_bytes(_decision_line("/a.jpg") + b'{"path": "/b.jpg", "dec')
    with pytest.warns(UserWarning):
        Decisions(path).add("/c.jpg", None, "approve")
    path.write_bytes(path.read_bytes() + b'{"path": "/d')
    with pytest.warns(UserWarning, match="cut-line-2"):
        assert len(Decisions(path).latest()) == 2
    assert (tmp_path / "r.decisions.jsonl.cut-line-1").read_bytes() == b'{"path": "/b.jpg", "dec'
    assert (tmp_path / "r.decisions.jsonl.cut-line-2").read_bytes() == b'{"path": "/d'


FORMULAS = ("=HYPERLINK(1)", "+1+1", "-2+3", "@SUM(A1)", "\tx=1", "\rx=1")


def test_exported_cells_never_start_a_formula(tmp_path):
    results = tmp_path / "results.jsonl"
    with RecordFile(results) as file:
        file.write([record(name, "low", 0.9) for name in FORMULAS])
    client = TestClient(create_app(results))
    for index in range(len(FORMULAS)):
        decided = client.post("/api/decisions", json={"index": index, "decision": "reject"})
        assert decided.status_code == 200
    rows = list(csv.reader(io.StringIO(client.get("/decisions.csv").text, newline="")))
    assert sorted(row[0] for row in rows[1:]) == sorted("'" + name for name in FORMULAS)
    for row in rows[1:]:
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row)


def test_a_decision_names_its_record_by_a_whole_number_only(many):
    client = TestClient(create_app(many))
    before = decisions_path(many).exists()
    for index in (1.9, 1.0, True, False, "1", None, [1], {"i": 1}, -1, 10_000, 10**30):
        response = client.post("/api/decisions", json={"index": index, "decision": "approve"})
        assert response.status_code == 400, index
    for decision in ("APPROVE", None, ["approve"], 1):
        response = client.post("/api/decisions", json={"index": 1, "decision": decision})
        assert response.status_code == 400, decision
    assert decisions_path(many).exists() == before is False
    assert client.post("/api/decisions", json={"index": 1, "decision": "approve"}).is_success


def test_an_animations_thumbnail_shows_every_frame(tmp_path):
    """A flagged frame anywhere in an animation is in its thumbnail, long enough to be seen."""
    frames = []
    for i in range(40):  # a bar that moves, so that no two frames are alike; frame 25 white
        frame = Image.new("RGB", (96, 64), (255, 255, 255) if i == 25 else (20, 0, 0))
        frame.paste((0, 0, 255), (2 * i, 0, 2 * i + 8, 64))
        frames.append(frame)
    path = tmp_path / "late.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=20)
    results = tmp_path / "results.jsonl"
    with RecordFile(results) as file:
        file.write([record(str(path), "high", 0.9, frames=40, frames_checked=40, sampled=False)])
    thumbnail = TestClient(create_app(results)).get("/thumbnail/0")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(thumbnail.content)) as shown:
        assert shown.n_frames == 40
        for index in range(40):
            shown.seek(index)
            pixels = np.asarray(shown.convert("RGB"), dtype=float)
            assert np.abs(pixels - np.asarray(frames[index])).mean() < 12, index
            assert shown.info["duration"] == 200
