"""The HTML skeleton every report shares: escaping, the page frame with its
Content-Security-Policy, tables, figure cards, and the few lines of script that sort tables.

Everything that comes from data (class names, file names, config values, error messages)
goes through `esc`; nothing else builds markup from data. The page makes no network
request: images are data: URIs, styles and the script are inline, and the CSP forbids any
other load (a second fence should an escape ever be missed: an injected inline script has
no matching hash and does not run). The page works with scripts disabled; sorting is the
only thing the script adds.
"""

from __future__ import annotations

import os

import base64
import hashlib
import html
import math
import time

from cnnx import __version__

# Sorts a table.sortable by the clicked column: numerically when both cells carry a number
# in data-v (or as text), else as text; a second click reverses. Cells without a value sort last.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.tabIndex = 0;
    th.classList.add("sorter");
    function key(row) {
      var cell = row.cells[col];
      return cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent;
    }
    function sort() {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === "" || y === "") return (x === "") - (y === "");
        var nx = Number(x), ny = Number(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    }
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
  });
});
"""
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(SORT_SCRIPT.encode()).digest()).decode()
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'")

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg2: #f6f8fa; --accent: #0969da; --bad: #cf222e; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 12px 16px 48px; }
h1 { font-size: 1.5em; margin: .4em 0 .1em; overflow-wrap: anywhere; }
h2 { font-size: 1.2em; margin: 1.6em 0 .5em; padding-bottom: .2em; border-bottom: 1px solid var(--line); }
h3 { font-size: 1em; margin: 1.2em 0 .4em; overflow-wrap: anywhere; }
p, li { overflow-wrap: anywhere; }
.muted { color: var(--muted); font-size: .9em; }
nav a { margin-right: .9em; color: var(--accent); text-decoration: none; white-space: nowrap; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 8px; margin-bottom: 10px; }
.card { background: var(--bg2); border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; }
.card b { display: block; font-size: 1.3em; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border: 1px solid var(--line); padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: var(--bg2); }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable td:not(.n) { overflow-wrap: anywhere; min-width: 6em; max-width: 24em; }  /* a 200-letter class name wraps */
th.sorter { cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
table.kv td { overflow-wrap: anywhere; }
table.confusion td { text-align: right; min-width: 2.6em; font-variant-numeric: tabular-nums; }
table.confusion td.diag { outline: 2px solid #1a7f37; outline-offset: -2px; }
table.confusion th { font-weight: 600; white-space: nowrap; max-width: 10em; overflow: hidden; text-overflow: ellipsis; }
table.confusion thead th { writing-mode: vertical-rl; transform: rotate(180deg); max-height: 9em; vertical-align: bottom; }
table.confusion thead th.corner { writing-mode: horizontal-tb; transform: none; vertical-align: bottom; font-weight: 400; color: var(--muted); white-space: normal; max-width: 7em; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 12px; }
svg.chart { width: 100%; height: auto; background: #fff; border: 1px solid var(--line); border-radius: 6px; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #444; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(112px, 1fr)); gap: 8px; }
figure.thumb { margin: 0; padding: 6px; border: 1px solid var(--line); border-radius: 6px; background: var(--bg2); font-size: .78em; line-height: 1.3; }
figure.thumb img, figure.thumb .ph { display: block; width: 96px; height: 96px; margin: 0 auto 4px; object-fit: contain; background: #fff; }
figure.thumb .ph { border: 1px dashed var(--muted); color: var(--muted); font-size: .85em; padding: 4px; overflow: hidden; overflow-wrap: anywhere; }
figure.thumb figcaption { overflow-wrap: anywhere; }
.bad { color: var(--bad); }
.bar { display: inline-block; height: .7em; background: var(--accent); vertical-align: middle; }
details > summary { cursor: pointer; color: var(--accent); margin: .4em 0; }
@media (max-width: 600px) {
  body { font-size: 14px; }
  main { padding: 8px 10px 32px; }
  .gallery { grid-template-columns: repeat(auto-fill, minmax(100px, 1fr)); }
}
"""


def printable(value) -> str:
    """str(value) that can be written as UTF-8: a file name that is not valid UTF-8 (held
    with surrogate escapes) shows its bytes decoded with replacement characters."""
    s = str(value)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        try:
            return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            return s.encode("utf-8", "backslashreplace").decode("utf-8")


def esc(value) -> str:
    """Text from data as HTML text or a quoted attribute value."""
    return html.escape(printable(value), quote=True)


def fmt_num(v, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    v = float(v)
    if math.isnan(v):
        return "nan"
    if 10 ** digits <= abs(v) < 1e15:  # whole units, not an exponent: 21,600 s, not 2.16e+04
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def pct(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def num_value(v) -> str:
    """data-v of a numeric cell: the number as text, '' for none (sorts last)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(float(v))


GENERATOR = '<meta name="generator" content="cnnx">'  # what tells a page cnnx wrote (report_replaceable)


def report_replaceable(path) -> str | None:
    """None where a report may be written to `path`: nothing is there yet, or a page cnnx wrote
    (a resumed job's page is written again); else why not, for one line. A report path is the
    user's to choose, and the write replaces the file (through a symlink: its target), so a
    model, an image or a results file named there by mistake would be lost."""
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block the read below
        return "is a folder" if os.path.isdir(path) else "exists and is not a regular file"
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return "is a folder"
    except OSError:
        return None  # unreadable: the write says why, in one line
    # Pages of an older cnnx lack the generator tag; their first lines end "written ... by cnnx <version>".
    if head.startswith(b"<!DOCTYPE html>") and (GENERATOR.encode() in head or b" by cnnx " in head):
        return None
    return "exists and is not a page cnnx wrote"


def page(title: str, sections: list[tuple[str, str, str]], *, subtitle: str = "") -> str:
    """The whole document. sections: (anchor id, heading, body HTML) in order; the heading
    is text (escaped here), the body is markup already built with `esc`."""
    nav = " ".join(f'<a href="#{anchor}">{esc(heading)}</a>' for anchor, heading, _ in sections)
    body = "".join(f'<section id="{anchor}"><h2>{esc(heading)}</h2>{html_}</section>'
                   for anchor, heading, html_ in sections)
    written = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (
        f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{GENERATOR}"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><main>"
        f"<h1>{esc(title)}</h1><p class=\"muted\">{esc(subtitle)}{' · ' if subtitle else ''}"
        f"written {written} by cnnx {esc(__version__)}</p><nav>{nav}</nav>\n{body}\n"
        f"</main><script>{SORT_SCRIPT}</script></body></html>\n"
    )


def kv_table(rows) -> str:
    """Two-column table of (key, value) pairs; values that are not plain numbers or strings
    are shown as compact JSON."""
    import json

    out = []
    for key, value in rows:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            text = fmt_num(value, 6)
        elif isinstance(value, str):
            text = value
        else:
            text = json.dumps(value, default=str, ensure_ascii=False)
        out.append(f"<tr><td>{esc(key)}</td><td>{esc(text)}</td></tr>")
    return f'<div class="scroll"><table class="kv"><tbody>{"".join(out)}</tbody></table></div>'


def sortable_table(head: list[tuple[str, bool]], rows: list[list[tuple[str, str | None]]], *,
                   table_id: str = "") -> str:
    """head: (label, numeric); rows: cells as (html, data-v or None). The rows are shown in
    the given order without script; with script, a click on a heading sorts by it."""
    ths = "".join(f'<th class="n">{esc(label)}</th>' if numeric else f"<th>{esc(label)}</th>"
                  for label, numeric in head)
    body = []
    for row in rows:
        tds = []
        for (cell, value), (_label, numeric) in zip(row, head):
            attrs = (' class="n"' if numeric else "") + (f' data-v="{esc(value)}"' if value is not None else "")
            tds.append(f"<td{attrs}>{cell}</td>")
        body.append(f"<tr>{''.join(tds)}</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return (f'<div class="scroll"><table class="sortable"{ident}><thead><tr>{ths}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def thumb_card(uri: str | None, caption_html: str, *, alt: str, missing: str = "", tip: str = "") -> str:
    """One gallery figure: the image (or a placeholder saying why there is none) and its caption."""
    title = f' title="{esc(tip)}"' if tip else ""
    if uri is None:
        img = f'<div class="ph" role="img" aria-label="{esc(alt)}">no preview: {esc(missing)}</div>'
    else:
        img = f'<img src="{uri}" alt="{esc(alt)}">'
    return f'<figure class="thumb"{title}>{img}<figcaption>{caption_html}</figcaption></figure>'
