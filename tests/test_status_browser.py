"""The status page in a real browser: a real server, hits and misses, headless Chromium.

The rendered DOM must show the figures of /v1/stats, the page must be valid HTML, and no request
may leave the server's origin. The screenshot is saved in the test's temporary folder; with
POLYKIT_SCREENSHOT=PATH it is also copied to PATH (how the README's picture is made).
"""

from __future__ import annotations

import base64
import json
import os
import shutil

import html5lib
import pytest

from browser import browser, figures
from support import key_for, pack_tree, request, thread_server


def resolve(stats: dict, path: str) -> object:
    """The value at a figure's path in the stats document (``top_saving.0.task`` is package:task)."""
    node: object = stats
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part == "task" and i == len(parts) - 1 and isinstance(node, dict) and "package" in node:
            return f"{node['package']}:{node['task']}" + (f" (/{node['namespace']})" if node["namespace"] else "")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def populate(port: int, tmp_path, headers: dict | None = None) -> None:
    """Uploads of three tasks' artifacts, downloads of two (hits, saving their durations), and misses;
    the same task in a namespace too."""
    headers = headers or {}
    tasks = [("web", "build", 5120), ("api", "build", 42_000), ("docs", "lint", 800)]
    for package, task, duration in tasks:
        key = key_for(f"{package}:{task}")
        body = pack_tree(tmp_path, {f"{package}.out": package.encode()}, key,
                         meta={"package": package, "task": task, "duration_ms": duration})
        assert request(port, "PUT", f"/v1/artifacts/{key}", body, headers)[0] == 201
    for package, times in (("api", 3), ("web", 2)):
        for _ in range(times):
            assert request(port, "GET", f"/v1/artifacts/{key_for(package + ':build')}", None, headers)[0] == 200
    for n in range(4):
        assert request(port, "GET", f"/v1/artifacts/{key_for(f'missing {n}')}", None, headers)[0] == 404
    assert request(port, "PUT", f"/v1/artifacts/{key_for('bad')}", b"not zstd", headers)[0] == 422


def test_the_status_page_renders_the_figures_of_v1_stats_in_a_real_browser(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("read-write writer-token-1\nread reader-token-22\n")
    with thread_server(tmp_path / "store", token_file=tokens, max_storage=1 << 30) as (port, _), \
            browser(tmp_path / "chromium") as chromium:
        populate(port, tmp_path, {"Authorization": "Bearer writer-token-1"})
        origin = f"http://127.0.0.1:{port}"
        # The page asks for basic authentication; the browser answers with the token as password.
        page = chromium.visit(origin + "/", credentials=("viewer", "reader-token-22"))
        auth = {"Authorization": "Basic " + base64.b64encode(b"viewer:reader-token-22").decode()}
        stats = json.loads(request(port, "GET", "/v1/stats", None, auth)[2])
        phone = chromium.visit(origin + "/", width=390, height=800, credentials=("viewer", "reader-token-22"))

    assert page.requests == [origin + "/"] and phone.requests == [origin + "/"], "a request left the page's origin"
    found = figures(page.html)
    paths = {path for path, _, _ in found}
    for expected in ("saved_seconds", "history.windows.day.saved_seconds", "history.windows.hour.hit_rate",
                     "hit_rate", "bytes_in", "bytes_out", "stored_bytes", "max_storage", "evictions",
                     "uploads_rejected.bad_zstd", "history.top_saving.0.task", "history.top_missing.0.hit_rate",
                     "history.windows.day.by_protocol.polykit.hit_rate", "version"):
        assert expected in paths, f"the page does not show {expected}"
    for path, value, text in found:
        if path == "uptime_seconds":
            continue  # moves between the two requests
        expected = resolve(stats, path)
        if path == "requests":
            expected -= 1  # the page was answered before the stats request that counts it
        assert value == ("" if expected is None else str(expected)), f"{path}: page {value!r}, /v1/stats {expected!r}"
        assert text.strip(), f"{path} has no text"
    assert stats["saved_seconds"] == 3 * 42.0 + 2 * 5.12
    assert stats["hits"] == 5 and stats["misses"] == 4
    assert [(row["package"], row["task"]) for row in stats["history"]["top_saving"]] == [("api", "build"), ("web", "build")]

    shot = tmp_path / "status-page.png"
    shot.write_bytes(page.png)
    (tmp_path / "status-page-phone.png").write_bytes(phone.png)
    assert page.png.startswith(b"\x89PNG") and phone.png.startswith(b"\x89PNG")
    if os.environ.get("POLYKIT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["POLYKIT_SCREENSHOT"])


def test_a_page_that_loads_from_elsewhere_is_caught(tmp_path):
    """The origin check above can fail: a page with an outside image is seen requesting it."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html lang="en"><title>x</title><img src="http://example.invalid/pixel.png" alt=""></html>')
    with browser(tmp_path / "chromium") as chromium:
        visit = chromium.visit(page.as_uri())
    assert "http://example.invalid/pixel.png" in visit.requests


def test_the_status_page_is_valid_html_and_its_style_is_the_one_its_policy_allows(tmp_path):
    with thread_server(tmp_path / "store") as (port, _):
        populate(port, tmp_path)
        status, headers, body = request(port, "GET", "/")
        assert request(port, "GET", "/?refresh=1")[2].count(b'http-equiv="refresh" content="5"') == 1
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    parser = html5lib.HTMLParser(strict=True)  # raises at the first parse error of the HTML standard
    document = parser.parse(body)
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    style = document.find(".//h:style", ns).text
    digest = base64.b64encode(__import__("hashlib").sha256(style.encode()).digest()).decode()
    policy = headers["content-security-policy"]
    assert f"style-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
    for tag, attr in (("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src")):
        for element in document.iter(f"{{{ns['h']}}}{tag}"):
            value = element.get(attr, "")
            assert value.startswith("data:") or not value, f"<{tag} {attr}={value!r}> loads from elsewhere"
    assert b"<script" not in body


@pytest.mark.parametrize("path", ["/", "/?refresh=30"])
def test_head_of_the_status_page_has_no_body(tmp_path, path):
    with thread_server(tmp_path / "store") as (port, _):
        status, headers, body = request(port, "HEAD", path)
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000
