"""One self-contained HTML page for a verification report (``certlib verify
--report report.html``, ``Report.to_html``).

Nothing is fetched: the styles are inline and the figure is an inline SVG drawn
here (no JavaScript library, no fonts, no images from the network).  Sections:
the claim in plain words, the numbers, certified accuracy against radius, the
per-stage proven bounds (with the loosest and the slowest stages), the
empirical bounds when an attack ran, and the samples closest to the decision.
"""

from __future__ import annotations

import datetime as _dt
import html
import math

import numpy as np

from certlib import __version__

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2em auto;max-width:62em;
color:#1d2330;background:#fff;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #dde}
.claim{background:#eef7ee;border-left:5px solid #2e8b57;padding:.8em 1em;font-size:1.05em}
.unsound{background:#fdecea;border-left:5px solid #c0392b}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.25em .7em;border-bottom:1px solid #eee;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.big{font-size:2em;font-weight:700}.cards{display:flex;gap:1.2em;flex-wrap:wrap}
.card{border:1px solid #dde;border-radius:8px;padding:.6em 1em;min-width:10em}
.card .label{color:#667;font-size:.85em}.bar{background:#4a78c2;height:.7em;display:inline-block}
.muted{color:#667;font-size:.9em}svg text{font-family:inherit;font-size:12px;fill:#333}
"""


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: float, digits: int = 6) -> str:
    v = float(v)
    return "inf" if math.isinf(v) else f"{v:.{digits}g}"


def curve_svg(radius: np.ndarray, correct: np.ndarray, eps: float, width: int = 560, height: int = 300) -> str:
    """Certified accuracy (%) against l2 radius as an inline SVG line chart."""
    from certlib.report import certified_curve

    finite = radius[np.isfinite(radius)]
    top = max(float(np.max(finite, initial=0.0)) * 1.05, 2 * eps, 1e-6)
    grid = np.linspace(0.0, top, 121)
    acc = 100 * certified_curve(radius, correct, grid)
    L, R, T, B = 52, 16, 14, 40
    pw, ph = width - L - R, height - T - B

    def X(r):
        return L + pw * r / top

    def Y(a):
        return T + ph * (1 - a / 100)

    pts = " ".join(f"{X(r):.1f},{Y(a):.1f}" for r, a in zip(grid, acc))
    ticks = []
    for a in (0, 25, 50, 75, 100):
        ticks.append(f'<line x1="{L}" x2="{L + pw}" y1="{Y(a):.1f}" y2="{Y(a):.1f}" stroke="#e3e6ee"/>'
                     f'<text x="{L - 6}" y="{Y(a) + 4:.1f}" text-anchor="end">{a}%</text>')
    for k in range(6):
        r = top * k / 5
        ticks.append(f'<text x="{X(r):.1f}" y="{T + ph + 16}" text-anchor="middle">{_fmt(r, 3)}</text>')
    vra_at = 100 * float(certified_curve(radius, correct, np.array([eps]))[0])
    return (f'<svg id="curve" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="certified accuracy against l2 radius">'
            + "".join(ticks)
            + f'<line x1="{X(eps):.1f}" x2="{X(eps):.1f}" y1="{T}" y2="{T + ph}" stroke="#c0392b" '
              f'stroke-dasharray="5,4"/><text x="{X(eps) + 4:.1f}" y="{T + 12}" fill="#c0392b">eps</text>'
            + f'<polyline fill="none" stroke="#2456a6" stroke-width="2.5" points="{pts}"/>'
            + f'<circle cx="{X(eps):.1f}" cy="{Y(vra_at):.1f}" r="4" fill="#c0392b"/>'
            + f'<line x1="{L}" x2="{L}" y1="{T}" y2="{T + ph}" stroke="#333"/>'
            + f'<line x1="{L}" x2="{L + pw}" y1="{T + ph}" y2="{T + ph}" stroke="#333"/>'
            + f'<text x="{L + pw / 2:.0f}" y="{height - 4}" text-anchor="middle">l2 radius</text></svg>')


def _table(headers, rows, num_cols=()) -> str:
    head = "".join(f'<th class="{"num" if i in num_cols else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i in num_cols else ""}">{c}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _stages(layers) -> str:
    if not layers:
        return "<p>No stage needed a bound (every stage is 1-Lipschitz by rule).</p>"
    logs = [math.log10(max(lb.bound, 1e-300)) for lb in layers]
    hi = max(max(logs), 0.0) or 1.0
    rows = [[_e(lb.name), _e(lb.op), _fmt(lb.bound, 9),
             f'<span class="bar" style="width:{max(2, 120 * max(v, 0) / hi):.0f}px"></span>',
             _e(lb.method), f"{lb.seconds:.3f}"] for lb, v in zip(layers, logs)]
    out = _table(["stage", "op", "proven bound", "", "method", "seconds"], rows, (2, 5))
    loose = sorted(layers, key=lambda lb: -lb.bound)[:5]
    slow = sorted(layers, key=lambda lb: -lb.seconds)[:5]
    out += '<div class="cards">'
    out += ('<div class="card" id="loosest"><div class="label">loosest stages (largest bound)</div>'
            + "<br>".join(f"{_e(lb.name)}: {_fmt(lb.bound)}" for lb in loose) + "</div>")
    out += ('<div class="card" id="slowest"><div class="label">slowest stages</div>'
            + "<br>".join(f"{_e(lb.name)}: {lb.seconds:.3f} s" for lb in slow) + "</div></div>")
    return out


def closest_samples(rep, labels: np.ndarray, k: int = 10) -> list[dict]:
    """The k samples whose certificate at eps is closest to flipping either way:
    smallest |min_j (margin_j - eps * K_yj)| (margins already net of rounding)."""
    r, K = rep.result, rep.analysis.K
    if r.n == 0:
        return []
    Ky = K[np.maximum(r.pred, 0)]
    with np.errstate(invalid="ignore"):
        gap = np.where(np.isfinite(r.margins), r.margins - rep.eps * Ky, np.inf)
    j = np.argmin(gap, axis=1)
    g = gap[np.arange(r.n), j]
    order = np.argsort(np.where(np.isfinite(g), np.abs(g), np.inf), kind="stable")[:k]
    return [{"idx": int(i), "label": int(labels[i]), "pred": int(r.pred[i]), "certified": bool(r.certified[i]),
             "radius": float(r.radius[i]), "runner_up": int(j[i]), "margin": float(r.margins[i, j[i]]),
             "needed": float(rep.eps * Ky[i, j[i]])} for i in order]


def html_report(rep, labels: np.ndarray, attack: dict | None = None, title: str | None = None) -> str:
    """The page as a string.  ``rep`` is a sound :class:`certlib.verify.VerifyReport`."""
    r, a = rep.result, rep.analysis
    if r is None:
        raise ValueError("the HTML report needs sound certification (not estimate-only)")
    labels = np.asarray(labels)
    n_cert = int((r.certified & r.correct).sum())
    name = rep.model.rsplit("/", 1)[-1] if rep.model else "model"
    title = title or f"certlib report: {name}"
    sem = getattr(rep, "semantics", None)
    if a.sound:
        claim = (f'<p class="claim" id="claim">For <b>{n_cert}</b> of the <b>{r.n}</b> samples of <b>{_e(rep.data)}</b> '
                 f'(verified robust accuracy <b>{100 * r.vra:.2f}%</b>), certlib <b>proved</b> that every input within '
                 f'l2 distance <b>{_fmt(rep.eps, 9)}</b> of the sample receives the same, correct prediction from '
                 + (f'the model <b>executed in {_e(sem.name)}</b> ({_e(sem.describe())}; the bound on the execution '
                    f'error over the whole ball is subtracted from every margin, proofs/float_semantics.md)'
                    if sem is not None and not sem.exact else 'the model\'s function in exact real arithmetic')
                 + f'. The proof uses only proven upper bounds on each '
                 f'stage\'s Lipschitz constant (body bound {_fmt(a.body.value, 9)}, method {_e(a.method)}); the '
                 f'logits were computed in float64 with a rigorous rounding bound subtracted from every margin.</p>')
    else:
        claim = ('<p class="claim unsound" id="claim"><b>NOT SOUND</b>: these numbers come from power-iteration '
                 'estimates and certify nothing.</p>')
    cards = [("verified robust accuracy", f"{100 * r.vra:.2f}%", "vra"),
             ("clean accuracy", f"{100 * r.clean_accuracy:.2f}%", "clean"),
             ("eps (l2)", _fmt(rep.eps, 9), "eps"),
             ("body Lipschitz bound", _fmt(a.body.value, 9), "lipschitz")]
    cards_html = '<div class="cards">' + "".join(
        f'<div class="card" id="card-{i}"><div class="label">{_e(lbl)}</div><div class="big">{v}</div></div>'
        for lbl, v, i in cards) + "</div>"
    facts = _table(["", ""], [["model", f"{_e(rep.model)} <span class='muted'>sha256 {_e(rep.sha256[:16])}</span>"],
                              ["data", f"{_e(rep.data)} <span class='muted'>sha256 {_e(rep.data_sha256[:16])}</span>"],
                              ["samples", str(r.n)], ["certified (any label)", str(int(r.certified.sum()))],
                              ["seconds", _e(", ".join(f"{k} {v:.2f}" for k, v in rep.seconds.items()))]])
    parts = [f"<h1>{_e(title)}</h1>", f'<p class="muted">certlib {__version__}, '
             f'{_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}</p>', claim, cards_html, facts,
             "<h2>Certified accuracy against radius</h2>", curve_svg(r.radius, r.correct, rep.eps),
             '<p class="muted">Share of samples correctly classified and certified at each l2 radius (at 0: clean '
             'accuracy); the dashed line is eps.</p>',
             "<h2>Per-stage proven bounds</h2>", _stages(a.layers)]
    if attack:
        viol = attack.get("violations", [])
        ratio = attack.get("lower_over_upper")
        parts += ["<h2>Empirical check (attack)</h2>", _table(["", ""], [
            ["PGD-l2 on certified samples", f"{attack.get('certified', 0)} attacked, "
             f"<b id='violations'>{len(viol)}</b> violation(s)" + (" (a sound certificate has none)" if not viol
                                                                      else " <b>FALSE CERTIFICATE</b>")],
            ["empirical Lipschitz lower bound", _fmt(attack.get("empirical_lipschitz_lower", float("nan")))],
            ["proven Lipschitz upper bound", _fmt(attack.get("certified_lipschitz_upper", float("nan")))],
            ["lower / upper", "-" if ratio is None else f"{ratio:.4f}"]])]
    rows = [[str(s["idx"]), str(s["label"]), str(s["pred"]), "yes" if s["certified"] else "no",
             _fmt(s["radius"]), str(s["runner_up"]), _fmt(s["margin"]), _fmt(s["needed"])]
            for s in closest_samples(rep, labels)]
    parts += ["<h2>Samples closest to the decision</h2>",
              '<p class="muted">margin: proven lower bound of f<sub>pred</sub> - f<sub>runner-up</sub>; needed: '
              'eps times the pair\'s Lipschitz bound. Certified iff margin &gt; needed for every class.</p>',
              _table(["sample", "label", "pred", "certified", "radius", "runner-up", "margin", "needed"], rows,
                     (0, 1, 2, 4, 5, 6, 7))]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n"
            '<script>document.documentElement.dataset.rendered = '
            'document.querySelectorAll("svg polyline").length ? "yes" : "no";</script>'
            "</body></html>\n")
