"""Every SVG chart of the site, drawn at build time as inline markup (no script, no style attribute, so
the CSP needs neither): the feature page's histogram, the overview's training curves, bars, the minimap,
the probe sweeps' line and bar charts, and the superposition toy's final codes.

One small kit underneath: `svg_open` (the root element), `text`, `line`, `polyline`, a `Frame` (the plot
area and its axes) and `nice_max` (a round top for the value axis). Numbers are written with one decimal
(integers as they are), so the markup stays small.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from markupsafe import Markup, escape

# Series colours (Tableau 10): the probe charts' feature lines.
PALETTE = ("#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
           "#bab0ac")
SVG_NS = "http://www.w3.org/2000/svg"


# --- the kit -----------------------------------------------------------------------------------------
def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.1f}"


def _attrs(attrs: dict) -> str:
    """Keyword arguments as SVG attributes: `stroke_width=2` → ` stroke-width="2"`, None left out."""
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{escape(_num(v) if isinstance(v, (int, float)) else v)}"'
                   for k, v in attrs.items() if v is not None)


def svg_open(cls: str, width: int, height: int, label: str, sized: bool = True, title: bool = False,
             standalone: bool = False) -> str:
    """The root element: `sized` gives it width/height (else it scales with its box), `title` repeats the
    label as a tooltip, `standalone` adds the namespace (for markup that is also written as an .svg file)."""
    ns = f'xmlns="{SVG_NS}" ' if standalone else ""
    size = f' width="{width}" height="{height}"' if sized else ""
    head = (f'<svg {ns}class="{escape(cls)}" viewBox="0 0 {width} {height}"{size} role="img" '
            f'aria-label="{escape(label)}">')
    return head + (f"<title>{escape(label)}</title>" if title else "")


def text(x: float, y: float, content: str, anchor: str = "start", cls: str | None = None, **attrs) -> str:
    klass = f' class="{escape(cls)}"' if cls else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{klass}{_attrs(attrs)}>'
            f'{escape(content)}</text>')


def line(x1: float, y1: float, x2: float, y2: float, **attrs) -> str:
    return f'<line x1="{_num(x1)}" y1="{_num(y1)}" x2="{_num(x2)}" y2="{_num(y2)}"{_attrs(attrs)}/>'


def polyline(points: Iterable[tuple[float, float]], **attrs) -> str:
    return f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}"{_attrs(attrs)}/>'


@dataclass(frozen=True)
class Frame:
    """A plot area inside a chart (pixels from the chart's top left), mapping values to pixels."""
    left: int
    top: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def bottom(self) -> int:
        return self.top + self.height

    def x(self, v: float, lo: float = 0.0, hi: float = 1.0) -> float:
        """Pixel column of `v` on an axis from `lo` (left edge) to `hi` (right edge)."""
        return self.left + self.width * (v - lo) / (hi - lo)

    def y(self, v: float, lo: float = 0.0, hi: float = 1.0) -> float:
        """Pixel row of `v` on an axis from `lo` (bottom edge) to `hi` (top edge)."""
        return self.top + self.height * (1 - (v - lo) / (hi - lo))

    def x_axis(self, **attrs) -> str:
        return line(self.left, self.bottom, self.right, self.bottom, **attrs)

    def y_axis(self, **attrs) -> str:
        return line(self.left, self.top, self.left, self.bottom, **attrs)


def nice_max(v: float) -> float:
    """The smallest round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × a power of ten) ≥ v: the value axis's top."""
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


# --- the site's charts (Jinja filters) -----------------------------------------------------------------
def histogram_svg(counts: Iterable[int] | None, max_value: float | None = None, title: str = "activation histogram",
                  width: int = 320, height: int = 120) -> Markup:
    """Bars of `features.histogram` (20 equal bins over (0, max_value]) as inline SVG."""
    counts = [int(c) for c in (counts or [])]
    if not counts or max(counts) == 0:
        return Markup('<p class="muted">no activations</p>')
    pad_l, pad_b, pad_t = 34, 18, 6
    frame = Frame(pad_l, pad_t, width - pad_l - 4, height - pad_b - pad_t)
    top = max(counts)
    bw = frame.width / len(counts)
    parts = [svg_open("plot histogram", width, height, title, title=True)]
    for i, c in enumerate(counts):
        h = frame.height * c / top
        parts.append(f'<rect x="{pad_l + i * bw + 0.5:.1f}" y="{frame.bottom - h:.1f}" '
                     f'width="{max(bw - 1, 0.5):.1f}" height="{h:.1f}"><title>{c:,}</title></rect>')
    parts.append(frame.x_axis(class_="axis-line"))
    parts.append(text(pad_l - 4, pad_t + 8, f"{top:,}", "end", "axis"))
    parts.append(text(pad_l - 4, frame.bottom, "0", "end", "axis"))
    parts.append(text(pad_l, height - 4, "0", cls="axis"))
    if max_value is not None:
        parts.append(text(width - 4, height - 4, f"{max_value:.3g}", "end", "axis"))
    parts.append("</svg>")
    return Markup("".join(parts))


def line_svg(points: Iterable[tuple[float, float]], title: str = "", width: int = 320, height: int = 150,
             log_y: bool = False) -> Markup:
    """A line plot (e.g. a training curve: step → metric) as inline SVG."""
    pts = [(float(x), float(y)) for x, y in points if x is not None and y is not None and math.isfinite(float(y))]
    if log_y:
        pts = [(x, math.log10(y)) for x, y in pts if y > 0]
    if len(pts) < 2:
        return Markup('<p class="muted">not enough points to plot</p>')
    pad_l, pad_b, pad_t, pad_r = 44, 18, 20, 6
    frame = Frame(pad_l, pad_t, width - pad_l - pad_r, height - pad_b - pad_t)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    if x1 == x0:
        x1 = x0 + 1

    def label(y): return f"{10 ** y:.3g}" if log_y else f"{y:.3g}"
    parts = [svg_open("plot line", width, height, title, title=True),
             text(pad_l, 13, title, cls="plot-title"),
             polyline(((frame.x(x, x0, x1), frame.y(y, y0, y1)) for x, y in pts),
                      class_="series"),
             frame.x_axis(class_="axis-line"), frame.y_axis(class_="axis-line"),
             text(pad_l - 4, pad_t + 8, label(y1), "end", "axis"), text(pad_l - 4, frame.bottom, label(y0), "end", "axis"),
             text(pad_l, height - 4, f"{x0:,.0f}", cls="axis"), text(width - pad_r, height - 4, f"{x1:,.0f}", "end", "axis"),
             "</svg>"]
    return Markup("".join(parts))


def bar_svg(value: float | None, max_value: float | None, cls: str = "bar") -> Markup:
    """A horizontal bar (value / max_value) as inline SVG: no style attribute, so the CSP needs no 'unsafe-inline'."""
    frac = 0.0 if not value or not max_value else max(0.0, min(1.0, float(value) / float(max_value)))
    return Markup(f'<svg class="{escape(cls)}" viewBox="0 0 100 6" preserveAspectRatio="none" aria-hidden="true">'
                  f'<rect class="bar-bg" width="100" height="6"/><rect width="{100 * frac:.1f}" height="6"/></svg>')


def minimap_svg(x: int | None, y: int | None, side: int | None, size: int = 96, picture: str | None = None
                ) -> Markup:
    """Where a feature sits on the map grid: a square with one dot; with `picture` (the URL of the whole map
    in one picture, the map's overview tile) the map is drawn behind the dot."""
    if x is None or y is None or not side:
        return Markup("")
    cx, cy = (x + 0.5) * size / side, (y + 0.5) * size / side
    image = (f'<image class="minimap-map" href="{escape(picture)}" width="{size}" height="{size}" '
             'preserveAspectRatio="none"/>' if picture else "")
    return Markup(svg_open("minimap", size, size, f"map cell {x}, {y}")
                  + f'<rect class="minimap-bg" width="{size}" height="{size}"/>' + image
                  + f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{max(2.5, size / side / 2):.1f}"/></svg>')


# --- probe sweeps ---------------------------------------------------------------------------------------
# The probe charts come in two layouts of the same markup: "wide" (640 user units, for boxes ≥ 600 px) and
# "narrow" (320 units, for phones); probes.css shows the one that fits its box, so the text (12 units)
# stays at 11 px or more on screen. PROBE_LAYOUTS: name → (width, line-chart height, left margin, right margin).
PROBE_LAYOUTS = {"wide": (640, 270, 62, 18), "narrow": (320, 250, 58, 12)}
PROBE_FONT = 12         # tick and step labels, in the chart's own units
PROBE_TITLE_FONT = 13   # axis titles
CHAR_EM = 0.62          # a generous average glyph width (em) of the system sans-serif, to keep labels apart


def feature_colours(feature_ids: Iterable[int]) -> dict[int, str]:
    """One colour per feature for a whole page: the palette in order of first appearance (wrapping after
    ten), so a feature has the same colour in every chart and legend."""
    colours: dict[int, str] = {}
    for f in feature_ids:
        colours.setdefault(int(f), PALETTE[len(colours) % len(PALETTE)])
    return colours


def text_width(content: str, font_size: float) -> float:
    """An estimate (a little generous) of a label's width in the chart's units."""
    return len(content) * font_size * CHAR_EM


def fit_text(content: str, max_width: float, font_size: float) -> str:
    """`content`, cut with an ellipsis to fit `max_width` (its full text goes into a <title>)."""
    if text_width(content, font_size) <= max_width:
        return content
    n = max(1, int(max_width / (font_size * CHAR_EM)) - 1)
    return content[:n].rstrip() + "…"


def _label(x: float, y: float, full: str, shown: str, anchor: str, cls: str, **attrs) -> str:
    """A text element; when cut, the full label is its tooltip."""
    if shown == full:
        return text(x, y, shown, anchor, cls, **attrs)
    klass = f' class="{escape(cls)}"'
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{klass}{_attrs(attrs)}><title>{escape(full)}</title>'
            f'{escape(shown)}</text>')


def x_label_plan(labels: list[str], xs: list[float], width: float, font_size: float = PROBE_FONT,
                 gap: float = 8.0) -> list[tuple[int, float, str]]:
    """Which step labels to write, where and how cut, so that none overlaps another or leaves the chart:
    every k-th label (the smallest k that fits, the last step always shown), each centred on its step but
    kept inside the chart, each cut to at most half the chart's width. Returns (step, x, text)."""
    n = len(labels)
    if n == 0:
        return []
    shown = [fit_text(l, width / 2 - gap, font_size) for l in labels]
    widths = [text_width(t, font_size) for t in shown]
    centre = [min(max(xs[i], widths[i] / 2 + 2), width - widths[i] / 2 - 2) for i in range(n)]

    def fits(idx: list[int]) -> bool:
        return all(centre[j] - centre[i] >= (widths[i] + widths[j]) / 2 + gap for i, j in zip(idx, idx[1:]))

    for every in range(1, n + 1):
        idx = list(range(0, n, every))
        if idx[-1] != n - 1:
            idx.append(n - 1)
            if not fits(idx):
                idx.pop(-2)  # the last step stays; its crowded neighbour goes
        if len(idx) == 1 or fits(idx):
            return [(i, centre[i], shown[i]) for i in idx]
    return [(n - 1, centre[n - 1], shown[n - 1])]


def probe_line_svg(sweep_name: str, labels: list[str], series: list[dict], layout: str = "wide"
                   ) -> tuple[Markup, list[float]]:
    """One line per feature along a sweep's steps, plus a step marker that probes.js moves. `series`:
    [{feature_id, colour, values (one per step)}]. Axes: activation (titled) up, the sweep's steps along
    (labels thinned and cut so they never collide, titled with the sweep's name). Returns the SVG and the
    x position of every step (also on the root as data-xs)."""
    width, height, ml, mr = PROBE_LAYOUTS[layout]
    mt, mb = 12, 48
    frame = Frame(ml, mt, width - ml - mr, height - mt - mb)
    n = len(labels)
    y_max = nice_max(max([max(s["values"]) for s in series if s["values"]] + [0.0]))
    xs = [frame.x(i / (n - 1) if n > 1 else 0.5) for i in range(n)]
    label = f"feature activations along the {sweep_name} sweep"
    out = [svg_open("probe-chart", width, height, label, sized=False, standalone=True)
           .replace("<svg ", f'<svg data-xs="{escape(str([round(x, 1) for x in xs]))}" ', 1)]
    for k in range(5):
        v = y_max * k / 4
        yy = frame.y(v, 0, y_max)
        out.append(line(ml, yy, frame.right, yy, class_="grid", stroke="#e4e4e4"))
        out.append(text(ml - 6, yy + 4, f"{v:.3g}", "end", "y-tick", font_size=PROBE_FONT, fill="#555"))
    cy = (frame.top + frame.bottom) / 2
    out.append(f'<text x="15" y="{cy:.1f}" text-anchor="middle" class="y-title" transform="rotate(-90 15 {cy:.1f})"'
               f' font-size="{PROBE_TITLE_FONT}" fill="#333">activation</text>')
    for i, x, shown in x_label_plan(labels, xs, width):
        out.append(_label(x, frame.bottom + 17, labels[i], shown, "middle", "x-label", font_size=PROBE_FONT,
                          fill="#555"))
    out.append(frame.x_axis(stroke="#888"))
    out.append(frame.y_axis(stroke="#888"))
    for s in series:
        out.append(polyline(((xs[i], frame.y(v, 0, y_max)) for i, v in enumerate(s["values"])), class_="probe-line",
                            data_feature=s["feature_id"], fill="none", stroke=s["colour"], stroke_width=2))
        for i, v in enumerate(s["values"]):
            out.append(f'<circle data-feature="{s["feature_id"]}" cx="{xs[i]:.1f}" cy="{frame.y(v, 0, y_max):.1f}" '
                       f'r="3" fill="{s["colour"]}"><title>feature {s["feature_id"]} at {escape(labels[i])}: '
                       f'{v:.3f}</title></circle>')
    out.append(line(xs[0] if xs else ml, mt, xs[0] if xs else ml, frame.bottom, class_="probe-marker", stroke="#222",
                    stroke_width=1.5, stroke_dasharray="4 3"))
    title = fit_text(sweep_name, frame.width, PROBE_TITLE_FONT)
    out.append(_label((ml + frame.right) / 2, height - 7, sweep_name, title, "middle", "x-title",
                      font_size=PROBE_TITLE_FONT, fill="#333"))
    out.append("</svg>")
    return Markup("".join(out)), xs


def probe_bars_svg(sweep_name: str, labels: list[str], series: list[dict], layout: str = "wide") -> Markup:
    """Grouped horizontal bars: one group per readout item (its label on the left, cut to fit), one bar per
    feature with its value, and a titled activation axis below."""
    width = PROBE_LAYOUTS[layout][0]
    bar_h, group_gap, mr = 16, 14, 44
    ml = 110 if layout == "wide" else 84
    n_f = max(1, len(series))
    group_h = n_f * bar_h + group_gap
    plot_h = len(labels) * group_h
    height = plot_h + 5 + 44
    v_max = nice_max(max([max(s["values"]) for s in series if s["values"]] + [0.0]))
    frame = Frame(ml, 5, width - ml - mr, plot_h)
    out = [svg_open("probe-bars", width, height,
                    f"feature activations for the {sweep_name} readout", sized=False, standalone=True)]
    for i, label in enumerate(labels):
        top = 5 + i * group_h
        out.append(_label(ml - 8, top + n_f * bar_h / 2 + 4, label, fit_text(label, ml - 12, PROBE_FONT), "end",
                          "item-label", font_size=PROBE_FONT, fill="#222"))
        for j, s in enumerate(series):
            v = s["values"][i]
            w = frame.width * v / v_max
            yy = top + j * bar_h
            out.append(f'<rect class="probe-bar" data-feature="{s["feature_id"]}" x="{ml}" y="{yy}" width="{w:.1f}" '
                       f'height="{bar_h - 3}" fill="{s["colour"]}"><title>feature {s["feature_id"]}: {v:.3f}</title>'
                       '</rect>')
            out.append(text(ml + w + 4, yy + bar_h - 5, f"{v:.3f}", cls="bar-value", font_size=PROBE_FONT,
                            fill="#333"))
    out.append(line(ml, frame.bottom, frame.right, frame.bottom, stroke="#888"))
    for k in range(3):
        v = v_max * k / 2
        out.append(text(frame.x(v, 0, v_max), frame.bottom + 15, f"{v:.3g}", ("start", "middle", "end")[k],
                        "x-tick", font_size=PROBE_FONT, fill="#555"))
    out.append(text((ml + frame.right) / 2, height - 7, "activation", "middle", "x-title", font_size=PROBE_TITLE_FONT,
                    fill="#333"))
    out.append("</svg>")
    return Markup("".join(out))


# --- the superposition toy ------------------------------------------------------------------------------
TOY_MARGIN_FRACTION = 0.025  # the plot area's margin inside the square picture (12 px of 480), shared with toy.js


def toy_bounds(codes_fn2: np.ndarray, arrows: list[dict], pad: float = 0.04) -> dict:
    """One square view {x0, x1, y0, y1} for every frame of the toy: it holds every code of every frame
    (`codes_fn2`: frames × codes × 2), the origin, the class arrows and their digit labels (at 1.12× the
    arrow), padded by `pad` of its side, x and y at the same scale so the classes' angles stay true."""
    pts = np.concatenate([np.asarray(codes_fn2, np.float64).reshape(-1, 2), np.zeros((1, 2)),
                          np.asarray([[a["x"] * 1.12, a["y"] * 1.12] for a in arrows], np.float64).reshape(-1, 2)])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    half = max(float((hi - lo).max()) / 2 * (1 + 2 * pad), 1e-6)
    cx, cy = (lo + hi) / 2
    return {"x0": float(cx - half), "x1": float(cx + half), "y0": float(cy - half), "y1": float(cy + half)}


def toy_final_svg(frames: dict, bounds: dict | None = None, side: int = 480) -> Markup:
    """The toy's last frame (`toy/frames.json`: frames, labels, arrows, colours): the digits' 2-D codes as
    dots, and one arrow per class from the origin to its mean code, in `bounds` (`toy_bounds` of every frame,
    so this picture matches the animation's last frame; by default the last frame's own)."""
    codes = np.asarray(frames["frames"][-1]["codes"], dtype=np.float64).reshape(-1, 2)
    arrows, colours = frames["arrows"], frames["colours"]
    b = bounds or toy_bounds(codes[None], arrows)
    margin = side * TOY_MARGIN_FRACTION
    inner = side - 2 * margin

    def px(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - b["x0"]) / (b["x1"] - b["x0"]) * inner,
                margin + (b["y1"] - y) / (b["y1"] - b["y0"]) * inner)

    ox, oy = px(0.0, 0.0)
    parts = [svg_open("toy-final-plot", side, side, "final 2-D codes of the digits with one arrow per class",
                      standalone=True),
             '<defs>' + "".join(
                 f'<marker id="toy-head-{c}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
                 f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>'
                 for c, colour in enumerate(colours)) + '</defs>',
             f'<rect width="{side}" height="{side}" fill="#fff"/>',
             line(margin, oy, side - margin, oy, stroke="#ddd"), line(ox, margin, ox, side - margin, stroke="#ddd")]
    for (x, y), label in zip(codes, frames["labels"]):
        cx, cy = px(x, y)
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.2" fill="{colours[label]}" fill-opacity="0.6"/>')
    for a in arrows:
        ex, ey = px(a["x"], a["y"])
        colour = colours[a["label"]]
        parts.append(line(ox, oy, ex, ey, stroke=colour, stroke_width=2.5, marker_end=f'url(#toy-head-{a["label"]})'))
        tx, ty = px(a["x"] * 1.12, a["y"] * 1.12)
        parts.append(text(tx, ty, str(a["label"]), "middle", font_size=15, font_weight="bold",
                          dominant_baseline="middle", fill=colour, stroke="#fff", stroke_width=3, paint_order="stroke"))
    parts.append("</svg>")
    return Markup("\n".join(parts))
