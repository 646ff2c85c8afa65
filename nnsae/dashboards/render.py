"""HTML of the dashboard: self-contained pages (inline CSS, inline SVG, one inline script on the index), no network.

The stylesheet and the index's script are package data (`static/dashboard.css`, `static/index.js`), inlined into
each page so a site opens from disk with nothing else.

Every piece of data is HTML-escaped (`html.escape`) or, in the index's JSON blob, JSON-encoded with `<`, `>` and
`&` as `\\u003c`-style escapes, so text such as `</script><script>alert(1)</script>` in a dataset is shown, never
run. Pages also carry a Content-Security-Policy that forbids every network load and allows only the index's own
script (by its sha256), as a second line of defence.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from importlib import resources
from typing import Any, Sequence

from nnsae.dashboards.data import Example, ExampleGroup, FeatureData
from nnsae.dashboards.tokens import Token, TokenRenderer, display
from nnsae.neuronpedia import neuronpedia_page_url


def _static(name: str) -> str:
    """A file of `nnsae/dashboards/static/` (package data)."""
    return resources.files("nnsae.dashboards").joinpath("static").joinpath(name).read_text(encoding="utf-8")


CSS = _static("dashboard.css")  # inlined into every page's <style>
INDEX_JS = _static("index.js")  # inlined into the index page; its sha256 is the page's script CSP


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(x: float, digits: int = 4) -> str:
    """Compact display of a number."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def exact(x: float) -> str:
    """A float with enough digits to round-trip float32 (for data-* attributes)."""
    return format(float(x), ".9g")


def json_for_script(data: Any) -> str:
    """JSON that is safe inside <script type="application/json">: no '<', '>' or '&' characters."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def csp(script: str | None = None) -> str:
    if script is None:
        script_src = "'none'"
    else:
        digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
        script_src = f"'sha256-{digest}'"
    return (f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src {script_src}; "
            "base-uri 'none'; form-action 'none'")


def page(title: str, body: str, script: str | None = None) -> str:
    script_tag = f"<script>{script}</script>" if script is not None else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{esc(csp(script))}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta name="referrer" content="no-referrer">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n{script_tag}</body></html>\n")


# ---- tokens ---------------------------------------------------------------------------------------------------------


def _bg(value: float, scale: float) -> str:
    if scale <= 0 or value == 0:
        return ""
    a = min(1.0, abs(value) / scale) * 0.85
    if a < 0.02:
        return ""
    color = "234,88,12" if value > 0 else "37,99,235"
    return f' style="background:rgba({color},{a:.3f})"'


_SPANS: dict[tuple, tuple[str, str, str]] = {}


def _span_parts(tok: Token) -> tuple[str, str, str]:
    """(class list, escaped display text, escaped tooltip prefix) of a token, cached: pages repeat tokens a lot."""
    key = (tok.id, tok.text, tok.special, tok.raw)
    hit = _SPANS.get(key)
    if hit is None:
        classes = ["t"]
        if tok.special:
            classes.append("sp")
        if tok.partial:
            classes.append("partial")
        shown = display(tok.text)
        if shown and not tok.special and not tok.text.strip():
            classes.append("ws")
        tip = (f"token {tok.text!r}" if not tok.partial else f"partial character (bytes {tok.raw.hex(' ')})") + \
            f" · id {tok.id}"
        if len(_SPANS) > 200_000:
            _SPANS.clear()
        hit = _SPANS[key] = (" ".join(classes), esc(shown), esc(tip))
    return hit


def token_span(tok: Token, value: float | None, scale: float, qualifying: bool = False) -> str:
    """One token as a <span>: text escaped, activation in `data-v` and the tooltip, background by activation."""
    classes, shown, tip = _span_parts(tok)
    if qualifying:
        classes += " q"
    if value is None:
        return f'<span class="{classes}" data-id="{tok.id}" title="{tip}">{shown}</span>'
    return (f'<span class="{classes}" data-v="{value:.9g}" data-id="{tok.id}"{_bg(value, scale)} '
            f'title="{tip} · activation {num(value, 5)}">{shown}</span>')


def example_html(ex: Example, renderer: TokenRenderer, scale: float) -> str:
    tokens = renderer.render(ex.token_ids)
    spans = "".join(token_span(t, v, scale, i == ex.qualifying_token_index)
                    for i, (t, v) in enumerate(zip(tokens, ex.values)))
    where = f"chunk {ex.chunk_index}, position {ex.chunk_position}"
    if ex.doc_id is not None and ex.doc_id >= 0:
        where += f"; document {ex.doc_id}, token {ex.doc_position}"
    return (f'<div class="ctx" data-value="{exact(ex.value)}" data-chunk="{ex.chunk_index}" '
            f'data-position="{ex.chunk_position}" title="{esc(where)}"><span class="v">{num(ex.value)}</span>'
            f'<span class="toks">{spans}</span></div>')


def group_html(group: ExampleGroup, renderer: TokenRenderer, scale: float) -> str:
    rows = "\n".join(example_html(ex, renderer, scale) for ex in group.examples)
    if group.kind == "top":
        return f'<div class="group top">{rows or "<p class=note>The feature never fired.</p>"}</div>'
    head = (f"{esc(group.title)} · activations {num(group.bin_min)} – {num(group.bin_max)} · "
            f"{100 * group.bin_contains:.1f}% of firings ({group.n_in_bin:,})")
    return (f'<div class="group quantile" data-bin-min="{exact(group.bin_min)}" data-bin-max="{exact(group.bin_max)}"'
            f' data-bin-contains="{exact(group.bin_contains)}" data-n="{group.n_in_bin}">'
            f'<div class="qhead">{head}</div>{rows}</div>')


# ---- SVG histograms -------------------------------------------------------------------------------------------------


def _svg_bars(counts: Sequence[int], edges: Sequence[float], classes: Sequence[str], labels: Sequence[str],
              axis: list[tuple[float, str]], width: int = 560, height: int = 140, ident: str = "") -> str:
    n = len(counts)
    top = max(counts) if counts else 0
    pad_l, pad_b, pad_t = 34, 18, 6
    plot_w, plot_h = width - pad_l - 6, height - pad_b - pad_t
    bw = plot_w / max(n, 1)
    parts = [f'<svg id="{ident}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">']
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" '
                 f'stroke="#9ca3af"/>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{num(top)}</text>'
                 f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" text-anchor="end">0</text>')
    for i, c in enumerate(counts):
        h = 0.0 if top == 0 else plot_h * c / top
        x = pad_l + i * bw
        parts.append(f'<rect class="{classes[i]}" x="{x:.2f}" y="{pad_t + plot_h - h:.2f}" '
                     f'width="{max(bw - 1, 0.5):.2f}" height="{h:.2f}" data-count="{c}" '
                     f'data-lo="{exact(edges[i])}" data-hi="{exact(edges[i + 1])}">'
                     f"<title>{esc(labels[i])}</title></rect>")
    for frac, label in axis:
        x = pad_l + frac * plot_w
        anchor = "start" if frac <= 0.02 else "end" if frac >= 0.98 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{height - 4}" text-anchor="{anchor}">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def trimmed_histogram(fd: FeatureData) -> tuple[list[int], list[float], int, int]:
    """(counts, edges) of the bins between the first and last non-empty one, plus the under/overflow counts."""
    inner = fd.hist_counts[1:-1]
    nonzero = [i for i, c in enumerate(inner) if c]
    under, over = fd.hist_counts[0], fd.hist_counts[-1]
    if not nonzero:
        return [], [], under, over
    a, b = nonzero[0], nonzero[-1]
    return inner[a:b + 1], fd.hist_edges[a:b + 2], under, over


def activation_histogram(fd: FeatureData) -> str:
    counts, edges, under, over = trimmed_histogram(fd)
    if not counts:
        return '<p class="note">No positive activations.</p>'
    labels = [f"{num(edges[i])} ≤ activation < {num(edges[i + 1])}: {c:,} tokens" for i, c in enumerate(counts)]
    lo, hi = math.log10(edges[0]), math.log10(edges[-1])
    axis = []
    for d in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1):
        axis.append(((d - lo) / (hi - lo) if hi > lo else 0.0, num(10.0 ** d)))
    if len(axis) < 2:
        axis = [(0.0, num(edges[0])), (1.0, num(edges[-1]))]
    svg = _svg_bars(counts, edges, ["bar"] * len(counts), labels, axis, ident="act-hist")
    extra = []
    if under:
        extra.append(f"{under:,} below {num(edges[0])}")
    if over:
        extra.append(f"{over:,} at or above {num(edges[-1])}")
    note = (f'<p class="note">Log-spaced bins (activation on a log axis); counts of tokens with a positive activation'
            f'{"; " + ", ".join(extra) if extra else ""}.</p>')
    return svg + note


def logit_histogram(fd: FeatureData) -> str:
    ld = fd.logits
    if ld is None or not ld.hist_counts:
        return ""
    edges = ld.hist_edges
    labels = [f"{num(edges[i])} to {num(edges[i + 1])}: {c:,} tokens" for i, c in enumerate(ld.hist_counts)]
    classes = ["bar neg" if (edges[i] + edges[i + 1]) / 2 < 0 else "bar" for i in range(len(ld.hist_counts))]
    span = edges[-1] - edges[0]
    axis = [(0.0, num(edges[0], 3)), (1.0, num(edges[-1], 3))]
    if span > 0 and edges[0] < 0 < edges[-1]:
        axis.insert(1, ((0 - edges[0]) / span, "0"))
    return _svg_bars(ld.hist_counts, edges, classes, labels, axis, height=110, ident="logit-hist")


# ---- pages ----------------------------------------------------------------------------------------------------------


def _logit_table(kind: str, ids: list[int], values: list[float], renderer: TokenRenderer) -> str:
    rows = "".join(f'<tr data-token-id="{i}" data-value="{exact(v)}"><td><span class="tok">'
                   f"{esc(display(renderer.label(i)))}</span></td><td class=\"num\">{v:+.4f}</td></tr>"
                   for i, v in zip(ids, values))
    title = "Promoted tokens (positive)" if kind == "pos" else "Suppressed tokens (negative)"
    return (f'<div><h3>{title}</h3><table class="logits {kind}" id="logits-{kind}"><tbody>{rows}</tbody></table>'
            f"</div>")


def feature_page(fd: FeatureData, renderer: TokenRenderer, info: dict[str, Any],
                 prev_next: tuple[int | None, int | None], logit_method: str | None, logit_note: str | None,
                 neuronpedia: str | None) -> str:
    """The HTML of one feature page (no script)."""
    scale = fd.max_act if fd.max_act > 0 else max((abs(v) for g in fd.groups for e in g.examples for v in e.values),
                                                  default=1.0)
    prev_i, next_i = prev_next
    nav = ['<a href="../index.html" id="home">↑ all features</a>']
    if prev_i is not None:
        nav.append(f'<a href="{prev_i}.html" id="prev">← #{prev_i}</a>')
    if next_i is not None:
        nav.append(f'<a href="{next_i}.html" id="next">#{next_i} →</a>')
    nav.append(f'<a href="{fd.index}.json" id="json">JSON</a>')
    if neuronpedia:
        nav.append(f'<a href="{esc(neuronpedia)}" id="neuronpedia" rel="noopener noreferrer">Neuronpedia ↗</a>')
    parts = [f'<div class="nav">{"".join(nav)}</div>',
             f'<h1 id="title" data-feature="{fd.index}">Feature {fd.index}</h1>',
             f'<div class="sub">SAE <b>{esc(info["name"])}</b> · {esc(info.get("model") or "")} · hook '
             f'{esc(info.get("hook") or "")} · d_sae {info.get("d_sae")}</div>']

    pct = 100 * fd.density
    stats = [
        ("Density", f'<dd id="density" data-value="{exact(fd.density)}">{pct:.4g}% '
                    f"({fd.firing_count:,} of {fd.n_tokens:,} tokens)</dd>"),
        ("Max activation", f'<dd id="max-act" data-value="{exact(fd.max_act)}">{num(fd.max_act, 5)}</dd>'),
        ("Mean activation (when firing)", f'<dd id="mean-act" data-value="{exact(fd.mean_act)}">'
                                          f"{num(fd.mean_act, 5)}</dd>"),
    ]
    if fd.firings_in_shards is not None and fd.firings_in_shards != fd.firing_count:
        stats.append(("Firings in shards", f'<dd id="in-shards">{fd.firings_in_shards:,} of {fd.firing_count:,} '
                                           "(the extraction kept only the strongest features per token; quantile "
                                           "samples and token counts come from these)</dd>"))
    dl = "".join(f"<dt>{esc(k)}</dt>{v}" for k, v in stats)

    hist = activation_histogram(fd)
    left = (f'<div><h2>Activations</h2><dl class="stats">{dl}</dl>'
            f'<h3>Activation histogram · DENSITY = {pct:.4g}%</h3>{hist}</div>')

    if fd.logits is not None:
        ld = fd.logits
        right = (f'<div><h2>Logit effects</h2><div class="pair">'
                 f'{_logit_table("pos", ld.pos_ids, ld.pos_values, renderer)}'
                 f'{_logit_table("neg", ld.neg_ids, ld.neg_values, renderer)}</div>'
                 f"<h3>All tokens</h3>{logit_histogram(fd)}"
                 f'<p class="note" id="logit-method">{esc(logit_method or "")}</p></div>')
    else:
        right = (f'<div><h2>Logit effects</h2><p class="note" id="logit-method">Not computed: '
                 f'{esc(logit_note or "no model given")}.</p></div>')
    parts.append(f'<div class="cols">{left}{right}</div>')

    if fd.top_tokens:
        rows = "".join(f'<tr data-token-id="{t.token_id}"><td><span class="tok">'
                       f'{esc(display(renderer.label(t.token_id)))}</span></td><td class="num">{t.count:,}</td>'
                       '<td class="num">'
                       f'{100 * t.count / max(fd.firings_in_shards or fd.firing_count, 1):.1f}%</td>'
                       f'<td class="num">{num(t.mean_act)}</td><td class="num">{num(t.max_act)}</td></tr>'
                       for t in fd.top_tokens)
        parts.append('<h2>Tokens it fires on most</h2><table id="top-tokens"><thead><tr><th>token</th>'
                     '<th class="num">firings</th><th class="num">share</th><th class="num">mean act</th>'
                     f'<th class="num">max act</th></tr></thead><tbody>{rows}</tbody></table>')

    top = next((g for g in fd.groups if g.kind == "top"), None)
    if top is not None:
        parts.append(f'<h2 id="top-h">Top activations ({len(top.examples)})</h2><section id="top">'
                     f"{group_html(top, renderer, scale)}</section>")
    quantiles = [g for g in fd.groups if g.kind == "quantile"]
    if quantiles:
        parts.append('<h2>Samples across activation quantiles</h2><p class="note">The firing activations sorted and '
                     "split into equal-count quantiles; random samples from each, strongest first.</p>"
                     f'<section id="quantiles">{"".join(group_html(g, renderer, scale) for g in quantiles)}</section>')
    parts.append('<p class="note">Token colour: this feature\'s activation relative to its maximum; hover a token for '
                 "its text, id and activation. The outlined token is the one the example was selected for; ↵ is a "
                 "newline.</p>")
    return page(f"Feature {fd.index} · {info['name']}", "\n".join(parts))


def index_page(info: dict[str, Any], rows: list[dict[str, Any]], extraction: dict[str, Any],
               logit_method: str | None, root_link: bool = False) -> str:
    """The searchable, sortable, paginated feature list (rows rendered by the inline script from a JSON blob)."""
    up = '<a href="../index.html">↑ all SAEs</a>' if root_link else ""
    header = [f'<div class="nav">{up}<a href="features.json">features.json</a></div>',
              f'<h1>{esc(info["name"])}</h1>',
              f'<div class="sub">model {esc(info.get("model") or "?")} · hook {esc(info.get("hook") or "?")} · '
              f'{esc(info.get("architecture") or "")} d_in {info.get("d_in")}, d_sae {info.get("d_sae")} · '
              f'{len(rows):,} features shown · statistics over {extraction["n_tokens"]:,} tokens of '
              f'{esc(extraction.get("dataset") or "the dataset")}</div>']
    if info.get("neuronpedia_id"):
        header.append(f'<div class="sub">Neuronpedia: <a rel="noopener noreferrer" '
                      f'href="{esc(neuronpedia_page_url(info["neuronpedia_id"]))}">{esc(info["neuronpedia_id"])}</a>'
                      "</div>")
    controls = ('<div id="controls"><input id="q" type="search" placeholder="Search feature #, tokens, logits…" '
                'autocomplete="off"><button id="prev" type="button">← prev</button><button id="next" type="button">'
                'next →</button><span id="count" class="sub"></span></div>')
    table = ('<table id="features"><thead><tr><th data-sort="index">feature</th>'
             '<th data-sort="density" class="num">density</th><th data-sort="max" class="num">max act</th>'
             '<th data-sort="mean" class="num">mean act</th><th>top activating tokens</th>'
             '<th>top promoted tokens</th></tr></thead><tbody></tbody></table>')
    blob = {"features": [{k: r[k] for k in ("index", "frac_nonzero", "firing_count", "max_act", "mean_act",
                                             "max_act_tokens", "pos_str", "neg_str", "page")} for r in rows]}
    data = f'<script type="application/json" id="feature-data">{json_for_script(blob)}</script>'
    noscript = ('<noscript><p class="note">The feature list needs JavaScript; the pages are in '
                '<a href="features/">features/</a>.</p></noscript>')
    note = (f'<p class="note">Density: share of tokens on which the feature fires. Max/mean activation over those '
            f'tokens. Promoted tokens: {esc(logit_method or "logit effects not computed")}</p>')
    body = "\n".join(header + [controls, noscript, table, note, data])
    return page(f"{info['name']} · feature dashboard", body, INDEX_JS)


def root_page(sites: list[dict[str, Any]]) -> str:
    rows = "".join(f'<tr><td><a href="{esc(s["href"])}">{esc(s["name"])}</a></td><td>{esc(s.get("hook") or "")}</td>'
                   f'<td class="num">{s.get("d_sae")}</td><td class="num">{s.get("n_features")}</td></tr>'
                   for s in sites)
    body = ('<h1>Feature dashboards</h1><table id="saes"><thead><tr><th>SAE</th><th>hook</th><th class="num">d_sae'
            f'</th><th class="num">features shown</th></tr></thead><tbody>{rows}</tbody></table>')
    return page("Feature dashboards", body)


__all__ = ["CSS", "INDEX_JS", "csp", "esc", "feature_page", "index_page", "json_for_script", "page", "root_page",
           "trimmed_histogram"]
