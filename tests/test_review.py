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

from .conftest import PHOTO_PATHS, file_size_limit


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
        "path,member,decision,time,level,flagged,realpath",
        f"/data/00005.jpg,,approve,{json.loads(lines[1])['time']},low,False,/data/00005.jpg",
    ]


def _decided(client: TestClient) -> dict[int, str | None]:
    """Each record's decision as the page shows it, by its number."""
    records = client.get("/api/records", params={"limit": 500}).json()["records"]
    return {shown["index"]: shown["decision"] for shown in records}


def _exported(client: TestClient) -> list[tuple[str, str, str, str]]:
    rows = csv.DictReader(io.StringIO(client.get("/decisions.csv").text, newline=""))
    return [(row["path"], row["decision"], row["level"], row["realpath"]) for row in rows]


def test_a_decision_is_about_the_file_version_the_reviewer_saw(tmp_path):
    """Two scans from two folders (``scan .``) into one record file name two files img.png:
    approving one leaves the other undecided, on the page, after a restart and in the export.
    The file replaced and scanned again (as --resume does): its new content is undecided."""
    beach, party = tmp_path / "beach" / "img.png", tmp_path / "party" / "img.png"
    for photo, colour in ((beach, (0, 0, 255)), (party, (255, 0, 255))):
        photo.parent.mkdir()
        Image.new("RGB", (16, 16), colour).save(photo)
    results = tmp_path / "results.jsonl"
    rows = [
        {**record(str(beach), "neutral", 0.1), "path": "img.png"},
        {**record(str(party), "high", 0.9), "path": "img.png"},
    ]
    with RecordFile(results) as file:
        file.write(rows)
    client = TestClient(create_app(results))
    assert client.post("/api/decisions", json={"index": 0, "decision": "approve"}).is_success
    for review in (client, TestClient(create_app(results))):  # and after a restart
        assert _decided(review) == {0: "approve", 1: None}
        assert review.get("/api/records", params={"level": "undecided"}).json()["total"] == 1
        assert _exported(review) == [("img.png", "approve", "neutral", rows[0]["realpath"])]

    Image.new("RGB", (24, 24), (255, 0, 255)).save(beach)  # replaced, then scanned again
    with RecordFile(results) as file:
        file.write([{**record(str(beach), "high", 0.9), "path": "img.png"}, rows[1]])
    rescanned = TestClient(create_app(results))
    assert _decided(rescanned) == {0: None, 1: None}
    assert rescanned.get("/api/records", params={"level": "undecided"}).json()["total"] == 2
    assert _exported(rescanned) == []


def test_decisions_from_before_they_named_the_version(tmp_path):
    """A decisions file of path-only lines (written before decisions named the file's
    version): a line applies to the one record with its path, when that file is older than
    the decision; never to two records of one path, nor to a file changed after it."""
    results = tmp_path / "results.jsonl"
    rows = [
        record("/data/kept.jpg", "low", 0.2, mtime=100.0),
        record("/data/twice.jpg", "low", 0.2, realpath="/data/a/twice.jpg", mtime=100.0),
        record("/data/twice.jpg", "high", 0.9, realpath="/data/b/twice.jpg", mtime=100.0),
        record("/data/changed.jpg", "high", 0.9, mtime=300.0),
    ]
    with RecordFile(results) as file:
        file.write(rows)
    names = ("/data/kept.jpg", "/data/twice.jpg", "/data/changed.jpg", "/data/gone.jpg")
    lines = [{"path": name, "member": None, "decision": "approve", "time": 200.0} for name in names]
    decisions_path(results).write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.warns(UserWarning, match=r"2 decision\(s\) written before .* not applied"):
        client = TestClient(create_app(results))
    assert _decided(client) == {0: "approve", 1: None, 2: None, 3: None}
    assert _exported(client) == [("/data/kept.jpg", "approve", "low", "/data/kept.jpg")]
    assert client.post("/api/decisions", json={"index": 1, "decision": "reject"}).is_success
    assert client.post("/api/decisions", json={"index": 0, "decision": "reject"}).is_success
    with pytest.warns(UserWarning, match="not applied"):
        restarted = TestClient(create_app(results))
    assert _decided(restarted) == {0: "reject", 1: "reject", 2: None, 3: None}


def test_csv_and_json_lines_records_side_by_side_keep_their_own_decisions(tmp_path):
    """results.jsonl and results.csv in one folder: each its own decisions file. A CSV record
    file's decisions from before, at results.decisions.jsonl, are found there while no
    results.jsonl is beside it."""
    rows = [record("/data/a.jpg", "low", 0.9)]
    jsonl, table = tmp_path / "results.jsonl", tmp_path / "results.csv"
    for results in (jsonl, table):
        with RecordFile(results) as file:
            file.write(rows)
    decided = TestClient(create_app(jsonl)).post(
        "/api/decisions", json={"index": 0, "decision": "approve"}
    )
    assert decided.is_success and decisions_path(jsonl) == tmp_path / "results.decisions.jsonl"
    assert TestClient(create_app(table)).get("/api/records").json()["decided"] == 0
    assert decisions_path(table) == tmp_path / "results.csv.decisions.jsonl"

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    table.rename(earlier / "results.csv")
    decisions_path(jsonl).rename(earlier / "results.decisions.jsonl")
    assert decisions_path(earlier / "results.csv") == earlier / "results.decisions.jsonl"
    assert _decided(TestClient(create_app(earlier / "results.csv"))) == {0: "approve"}


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


def image(name: str) -> dict:
    """What a decision names of a record: its image's path, realpath, bytes, mtime, member."""
    return {"path": name, "realpath": name, "bytes": 1000, "mtime": 1712340000.5, "member": None}


def test_decisions_file_keeps_every_line(tmp_path):
    decisions = Decisions(tmp_path / "r.decisions.jsonl")
    for i in range(20):
        decisions.add(image(f"{i}.jpg"), "approve" if i % 2 else "reject")
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


def test_every_loopback_address_answers_only_to_loopback_names():
    """review --host 127.0.0.2 is as local as 127.0.0.1: DNS rebinding is refused there too."""
    from nsfw_guard.access import allowed_hosts, wrong_host

    for bind in ("127.0.0.1", "127.0.0.2", "127.8.9.10", "::1", "[::1]", "localhost"):
        hosts = allowed_hosts(bind)
        assert hosts is not None and wrong_host("evil.example:8001", hosts), bind
        address = bind.strip("[]")
        assert wrong_host(f"[{address}]:8001" if ":" in address else f"{bind}:8001", hosts) is None
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("192.168.1.5") is None


# A kill mid-append, spreadsheets, odd indices, animations --------------------------------------


def _decision_line(name: str, decision: str = "reject") -> bytes:
    entry = {**image(name), "decision": decision, "time": 1712345678.25}
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
        if kept_whole:  # the next append ends its line
            assert path.read_bytes() == whole + last[:-1] and not aside.exists()
        else:
            assert path.read_bytes() == whole and aside.read_bytes() == last[:cut]
        decisions.add(image("/data/d.jpg"), "approve")
        assert path.read_bytes().startswith(whole + (last if kept_whole else b""))
        assert len(Decisions(path).latest()) == 3 + kept_whole


def test_cut_lines_set_aside_twice_are_both_kept(tmp_path):
    path = tmp_path / "r.decisions.jsonl"
    path.write_bytes(_decision_line("/a.jpg") + b'{"path": "/b.jpg", "dec')
    with pytest.warns(UserWarning):
        Decisions(path).add(image("/c.jpg"), "approve")
    path.write_bytes(path.read_bytes() + b'{"path": "/d')
    with pytest.warns(UserWarning, match="cut-line-2"):
        assert len(Decisions(path).latest()) == 2
    assert (tmp_path / "r.decisions.jsonl.cut-line-1").read_bytes() == b'{"path": "/b.jpg", "dec'
    assert (tmp_path / "r.decisions.jsonl.cut-line-2").read_bytes() == b'{"path": "/d'


def test_a_decision_that_does_not_fit_is_an_error_and_leaves_no_cut_line(tmp_path):
    """No room for a decision (part of its line fits, or none): a 507, the file cut back to
    its whole lines, the record still undecided; with room again the next decision is a line
    of its own, and the review starts again with every decision."""
    results = tmp_path / "results.jsonl"
    with RecordFile(results) as file:
        file.write([record(f"/data/{i}.jpg", "high", 0.9) for i in range(3)])
    path = decisions_path(results)
    earlier = b"".join(_decision_line(f"/data/old{i:04d}.jpg") for i in range(400))
    path.write_bytes(earlier)
    client = TestClient(create_app(results))
    for room in (10, 0):  # a write cut short, then one that writes nothing (EFBIG)
        with file_size_limit(len(earlier) + room):
            refused = client.post("/api/decisions", json={"index": 0, "decision": "reject"})
        assert refused.status_code == 507, refused.text
        assert "the decision was not saved" in refused.json()["error"]["message"]
        assert path.read_bytes() == earlier
        assert _decided(client)[0] is None
    assert client.post("/api/decisions", json={"index": 1, "decision": "approve"}).is_success
    added = path.read_bytes()[len(earlier) :].splitlines()
    assert len(added) == 1 and json.loads(added[0])["path"] == "/data/1.jpg"
    assert _decided(TestClient(create_app(results))) == {0: None, 1: "approve", 2: None}


def test_a_cut_line_in_the_middle_keeps_every_whole_decision(tmp_path):
    """A decision cut short (an append on a full disk, before nsfw-guard checked them) glued
    to the next one, cut at every byte, in the middle of the file: the whole decisions are
    kept, the cut part skipped and left in the file, and the review goes on. Another program's
    line is still refused."""
    first, cut_short, glued, last = (_decision_line(f"/data/{name}.jpg") for name in "abcd")
    for cut in range(1, len(cut_short)):
        path = tmp_path / f"{cut}.decisions.jsonl"
        data = first + cut_short[:cut] + glued + last
        path.write_bytes(data)
        with pytest.warns(UserWarning, match=r"line\(s\) 2: decisions cut short"):
            decisions = Decisions(path)
        whole = cut == len(cut_short) - 1  # only its line break was lost
        kept = {"/data/a.jpg", "/data/c.jpg", "/data/d.jpg"} | ({"/data/b.jpg"} if whole else set())
        assert {key[0] for key in decisions.latest()} == kept
        assert path.read_bytes() == data  # nothing rewritten
        decisions.add(image("/data/e.jpg"), "approve")
        with pytest.warns(UserWarning, match="cut short"):
            assert len(Decisions(path).latest()) == len(kept) + 1
    not_ours = tmp_path / "not-ours.decisions.jsonl"
    not_ours.write_bytes(first + b'{"path": "a.jpg", "level": "high"}\n' + last)  # a record
    with pytest.raises(ValueError, match="line 2: not a decision"):
        Decisions(not_ours)


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
