"""The status page at ``GET /``: the figures of ``/v1/stats`` as one self-contained HTML document.

For people, on air-gapped sites too: no font, script, stylesheet or image is fetched from
anywhere (the Content-Security-Policy in ``HEADERS`` lets the browser load nothing but this
document and its one inline stylesheet, whose hash it names), the charts are inline SVG, dark or
light follows the browser's ``prefers-color-scheme``, and the layout reflows to a phone's width.
No JavaScript: ``/?refresh=N`` adds a meta refresh every N seconds.

Every figure is rendered from the stats document given, and carries its place in that document
(``data-figure="history.windows.hour.hit_rate"``) and its raw value (``data-value``), so the
page is one view of the model that ``/v1/stats`` and ``/metrics`` show, and a test can hold it so.
"""

from __future__ import annotations

import base64
import hashlib
import time
from html import escape
from urllib.parse import parse_qsl

REFRESH_MIN, REFRESH_MAX = 5, 3600

_CSS = """
:root{color-scheme:light dark;--bg:#f7f7f5;--fg:#1d1f21;--muted:#5f6368;--card:#fff;--line:#d9d9d4;
--hit:#1e8e3e;--miss:#d93025;--saved:#1a73e8;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
@media (prefers-color-scheme:dark){:root{--bg:#16181b;--fg:#e8eaed;--muted:#9aa0a6;--card:#202327;--line:#3c4043;
--hit:#81c995;--miss:#f28b82;--saved:#8ab4f8}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);line-height:1.4}
main{max-width:72rem;margin:0 auto;padding:1rem}
header{display:flex;flex-wrap:wrap;gap:.25rem 1rem;align-items:baseline;justify-content:space-between}
h1{font-size:1.4rem;margin:.2rem 0}h2{font-size:1.05rem;margin:0 0 .5rem}
.muted,header p{color:var(--muted);margin:0;font-size:.9rem}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(15rem,1fr));gap:.75rem;margin:.75rem 0}
section{background:var(--card);border:1px solid var(--line);border-radius:.5rem;padding:.75rem 1rem;overflow-x:auto}
.big{font-size:1.8rem;font-weight:600;margin:.1rem 0}
dl{display:grid;grid-template-columns:auto auto;gap:.15rem 1rem;margin:0}dt{color:var(--muted)}dd{margin:0;text-align:right}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{padding:.25rem .4rem;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{white-space:normal;vertical-align:bottom}
th:first-child,td:first-child{text-align:left;white-space:normal;overflow-wrap:break-word}
svg{width:100%;height:auto;display:block}svg text{fill:var(--muted);font-size:11px}
.hit{fill:var(--hit)}.miss{fill:var(--miss)}.saved{fill:var(--saved)}.axis{stroke:var(--line)}
.rate{fill:none;stroke:var(--fg);stroke-width:1.5}
.key{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin:0 .25em 0 .75em}
.key.hit{background:var(--hit)}.key.miss{background:var(--miss)}.key.saved{background:var(--saved)}
a{color:var(--saved)}
""".strip()

_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()

# The page may load nothing but itself and its one stylesheet (by hash): no request leaves the
# server's origin, whatever the figures hold (CSP Level 3, w3.org/TR/CSP3).
HEADERS = [
    ("Content-Security-Policy",
     f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; img-src data:; base-uri 'none'; form-action 'none'; "
     "frame-ancestors 'none'"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]


# --- formatting -------------------------------------------------------------------------------


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "no limit"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    minutes = s / 60
    if minutes < 60:
        return f"{minutes:.1f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def fmt_rate(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.1f} %"


def _figure(path: str, value: object, text: str, tag: str = "span", cls: str = "") -> str:
    """One figure of the stats document: its place, its raw value and its text."""
    raw = "" if value is None else str(value)
    klass = f' class="{cls}"' if cls else ""
    return f'<{tag}{klass} data-figure="{escape(path)}" data-value="{escape(raw)}">{escape(text)}</{tag}>'


# --- charts ----------------------------------------------------------------------------------

_W, _H, _PAD = 600, 160, 22


def _bars_chart(title: str, slots: list[tuple[str, list[tuple[str, int]]]], rate: list[float | None] | None,
                unit: str) -> str:
    """Stacked bars (one per slot, parts by class) with an optional hit-rate line, as inline SVG."""
    n = max(1, len(slots))
    top = max([sum(v for _, v in parts) for _, parts in slots] + [1])
    slot_w = (_W - _PAD) / n
    bar_w = max(1.0, slot_w * 0.8)
    inner_h = _H - 2 * _PAD
    out = [f'<svg viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>',
           f'<line class="axis" x1="{_PAD}" y1="{_H - _PAD}" x2="{_W}" y2="{_H - _PAD}"/>',
           f'<text x="0" y="{_PAD - 8}">{escape(str(top))} {escape(unit)}</text>']
    for i, (label, parts) in enumerate(slots):
        x = _PAD + i * slot_w + (slot_w - bar_w) / 2
        y = _H - _PAD
        for cls, value in parts:
            if value <= 0:
                continue
            h = inner_h * value / top
            y -= h
            out.append(f'<rect class="{cls}" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}">'
                       f'<title>{escape(label)}: {value} {escape(cls)}</title></rect>')
    step = max(1, n // 6)
    for i in range(0, n, step):
        out.append(f'<text x="{_PAD + i * slot_w:.1f}" y="{_H - 6}">{escape(slots[i][0])}</text>')
    if rate is not None:
        points = [f"{_PAD + (i + 0.5) * slot_w:.1f},{_H - _PAD - inner_h * r:.1f}" for i, r in enumerate(rate) if r is not None]
        if len(points) > 1:
            out.append(f'<polyline class="rate" points="{" ".join(points)}"/>')
        out.append(f'<text x="{_W - 70}" y="{_PAD - 8}">line: hit rate</text>')
    out.append("</svg>")
    return "".join(out)


def _lookups_chart(rows: list[dict], now: float, step: int, count: int, label: str, title: str) -> str:
    """Hits and misses per bucket of ``step`` seconds over the last ``count`` buckets, with the hit rate."""
    by_start = {row["t"]: row for row in rows}
    start = int(now // step) * step - (count - 1) * step
    slots, rates = [], []
    for t in range(start, start + count * step, step):
        row = by_start.get(t, {"hits": 0, "misses": 0})
        slots.append((time.strftime(label, time.gmtime(t)), [("hit", row["hits"]), ("miss", row["misses"])]))
        total = row["hits"] + row["misses"]
        rates.append(row["hits"] / total if total else None)
    return _bars_chart(title, slots, rates, "lookups")


def _saved_chart(history: dict, now: float) -> str:
    """Build time saved per day over the last 30 days (in minutes, or seconds while they are few)."""
    by_day = {row["day"]: row["saved_seconds"] for row in history["days"]}
    today = int(now // 86400) * 86400
    days = [time.strftime("%Y-%m-%d", time.gmtime(t)) for t in range(today - 29 * 86400, today + 86400, 86400)]
    unit, div = ("min", 60) if max([by_day.get(d, 0) for d in days] + [0]) >= 600 else ("s", 1)
    slots = [(day[5:], [("saved", round(by_day.get(day, 0) / div))]) for day in days]
    return _bars_chart(f"Build time saved per day, last 30 days ({unit})", slots, None, unit)


# --- the page --------------------------------------------------------------------------------


def _card(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{body}</section>"


def _rows(rows: list[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def task_label(row: dict) -> str:
    """``package:task``, and the URL namespace it was stored under, if any."""
    label = f"{row['package']}:{row['task']}"
    return f"{label} (/{row['namespace']})" if row.get("namespace") else label


def _task_table(rows: list[dict], path: str, empty: str) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    head = "<tr><th>package:task</th><th>hits</th><th>misses</th><th>hit rate</th><th>saved</th></tr>"
    body = []
    for i, row in enumerate(rows):
        p = f"{path}.{i}"
        body.append(
            f"<tr>{_figure(p + '.task', task_label(row), task_label(row), 'td')}"
            f"{_figure(p + '.hits', row['hits'], str(row['hits']), 'td')}"
            f"{_figure(p + '.misses', row['misses'], str(row['misses']), 'td')}"
            f"{_figure(p + '.hit_rate', row['hit_rate'], fmt_rate(row['hit_rate']), 'td')}"
            f"{_figure(p + '.saved_seconds', row['saved_seconds'], fmt_seconds(row['saved_seconds']), 'td')}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def render(stats: dict, refresh: int | None = None, now: float | None = None) -> str:
    """The whole page for one ``/v1/stats`` document."""
    now = time.time() if now is None else now
    history = stats["history"]
    windows = history["windows"]
    hour, day, month = windows["hour"], windows["day"], windows["month"]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stats["started"]))
    meta_refresh = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""

    saved = _card("Build time saved", (
        f'<p class="big">{_figure("history.windows.day.saved_seconds", day["saved_seconds"], fmt_seconds(day["saved_seconds"]))}'
        '</p><p class="muted">in the last 24 hours</p>'
        + _rows([
            ("last hour", _figure("history.windows.hour.saved_seconds", hour["saved_seconds"], fmt_seconds(hour["saved_seconds"]))),
            ("last 30 days", _figure("history.windows.month.saved_seconds", month["saved_seconds"],
                                     fmt_seconds(month["saved_seconds"]))),
            ("since start", _figure("saved_seconds", stats["saved_seconds"], fmt_seconds(stats["saved_seconds"]))),
            ("all time", _figure("history.all_time.saved_seconds", history["all_time"]["saved_seconds"],
                                 fmt_seconds(history["all_time"]["saved_seconds"]))),
        ])))
    rates = _card("Hit rate", (
        f'<p class="big">{_figure("history.windows.day.hit_rate", day["hit_rate"], fmt_rate(day["hit_rate"]))}</p>'
        '<p class="muted">in the last 24 hours</p>'
        + _rows([
            ("last hour", _figure("history.windows.hour.hit_rate", hour["hit_rate"], fmt_rate(hour["hit_rate"]))),
            ("since start", _figure("hit_rate", stats["hit_rate"], fmt_rate(stats["hit_rate"]))),
            ("hits since start", _figure("hits", stats["hits"], str(stats["hits"]))),
            ("misses since start", _figure("misses", stats["misses"], str(stats["misses"]))),
        ])))
    traffic = _card("Traffic since start", _rows([
        ("requests", _figure("requests", stats["requests"], str(stats["requests"]))),
        ("uploads stored", _figure("uploads", stats["uploads"], str(stats["uploads"]))),
        ("bytes in", _figure("bytes_in", stats["bytes_in"], fmt_bytes(stats["bytes_in"]))),
        ("bytes out", _figure("bytes_out", stats["bytes_out"], fmt_bytes(stats["bytes_out"]))),
        ("bytes in, last 24 h", _figure("history.windows.day.bytes_in", day["bytes_in"], fmt_bytes(day["bytes_in"]))),
        ("bytes out, last 24 h", _figure("history.windows.day.bytes_out", day["bytes_out"], fmt_bytes(day["bytes_out"]))),
    ]))
    limit = stats["max_storage"]
    share = [("share of the limit", f"{stats['stored_bytes'] / limit * 100:.1f} %")] if limit else []
    storage = _card("Storage", _rows([
        ("entries", _figure("artifacts", stats["artifacts"], str(stats["artifacts"]))),
        ("used", _figure("stored_bytes", stats["stored_bytes"], fmt_bytes(stats["stored_bytes"]))),
        ("limit (--max-storage)", _figure("max_storage", limit, fmt_bytes(limit))),
        *share,
        ("evictions", _figure("evictions", stats["evictions"], str(stats["evictions"]))),
    ]))

    protocols = sorted(set(stats["by_protocol"]) | set(hour["by_protocol"]) | set(day["by_protocol"]))
    proto_rows = []
    for name in protocols:
        cells = [f"<td>{escape(name)}</td>"]
        for path, source in ((f"history.windows.hour.by_protocol.{name}", hour["by_protocol"]),
                             (f"history.windows.day.by_protocol.{name}", day["by_protocol"])):
            rate = source.get(name, {}).get("hit_rate")
            cells.append(_figure(path + ".hit_rate", rate, fmt_rate(rate), "td") if name in source else "<td>–</td>")
        since = stats["by_protocol"].get(name, {})
        hits, misses = since.get("hits", 0), since.get("misses", 0)
        cells.append(_figure(f"by_protocol.{name}.hits", hits, str(hits), "td"))
        cells.append(_figure(f"by_protocol.{name}.misses", misses, str(misses), "td"))
        proto_rows.append("<tr>" + "".join(cells) + "</tr>")
    per_protocol = _card("Hit rate by protocol", (
        "<table><tr><th>protocol</th><th>last hour</th><th>last 24 h</th><th>hits since start</th>"
        "<th>misses since start</th></tr>" + "".join(proto_rows) + "</table>") if proto_rows
        else '<p class="muted">No lookups yet.</p>')

    rejected = stats["uploads_rejected"]
    reasons = ("<table><tr><th>reason</th><th>since start</th></tr>" + "".join(
        f"<tr><td>{escape(reason)}</td>{_figure('uploads_rejected.' + reason, n, str(n), 'td')}</tr>"
        for reason, n in rejected.items()) + "</table>") if rejected else '<p class="muted">None since start.</p>'
    refusals = _card("Uploads refused", reasons + _rows(
        [("last 24 hours", _figure("history.windows.day.rejected", day["rejected"], str(day["rejected"])))]))

    legend = '<p class="muted"><span class="key hit"></span>hits<span class="key miss"></span>misses</p>'
    charts = (_card("Lookups, last hour", _lookups_chart(
                  history["minutes"], now, 60, 60, "%H:%M", "Hits and misses per minute, last hour (UTC)") + legend)
              + _card("Lookups, last 24 hours", _lookups_chart(
                  history["hours"], now, 3600, 24, "%H:00", "Hits and misses per hour, last 24 hours (UTC)") + legend)
              + _card("Time saved, last 30 days", _saved_chart(history, now)
                      + '<p class="muted"><span class="key saved"></span>build time saved</p>'))
    tasks = (_card("Tasks that save the most", _task_table(history["top_saving"], "history.top_saving",
                                                           "No polykit artifact has been downloaded yet."))
             + _card("Tasks that miss the most", _task_table(history["top_missing"], "history.top_missing",
                                                             "No polykit artifact has been uploaded yet.")))
    uptime = _figure("uptime_seconds", stats["uptime_seconds"], fmt_seconds(stats["uptime_seconds"]))
    version = _figure("version", stats["version"], stats["version"])
    refresh_link = ('<a href="/">stop refreshing</a>' if refresh else '<a href="/?refresh=30">refresh every 30 s</a>')
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{meta_refresh}<title>polykit cache status</title>"
        '<link rel="icon" href="data:,">'
        f"<style>{_CSS}</style></head><body><main>"
        f"<header><h1>polykit cache</h1><p>version {version} · up {uptime} since {escape(started)} · "
        f"{refresh_link}</p></header>"
        f'<div class="grid">{saved}{rates}{traffic}{storage}</div>'
        f'<div class="grid">{charts}</div>'
        f'<div class="grid">{per_protocol}{refusals}</div>'
        f'<div class="grid">{tasks}</div>'
        '<p class="muted">Hits save the build time recorded in each polykit artifact (its duration_ms). '
        'Per task, misses are the artifacts uploaded for it. The same figures: '
        '<a href="/v1/stats">/v1/stats</a> (JSON) and <a href="/metrics">/metrics</a> (Prometheus).</p>'
        "</main></body></html>\n"
    )


def parse_refresh(query: str) -> int | None:
    """``refresh=N`` from the query string, clamped to 5-3600 seconds; None without it or when unreadable."""
    try:
        value = dict(parse_qsl(query, max_num_fields=4)).get("refresh")
    except ValueError:
        return None
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 6:
        return None
    return max(REFRESH_MIN, min(REFRESH_MAX, int(value)))
