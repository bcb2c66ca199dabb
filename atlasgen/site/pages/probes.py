"""The probes page (`probes.html`): one chart per probe sweep (lines along a size/count sweep, bars for a
readout) with the sweep's pictures (`OUT/probes/` → `site/probes/`); probes.js drives the sliders.

Colours are assigned once for the whole page (`feature_colours` over every sweep's features in page order),
so a feature has one colour in every chart and legend. Each chart is written in two layouts (wide and
narrow, see `charts.PROBE_LAYOUTS`); probes.css shows the one that fits its box."""
from __future__ import annotations

import json
from pathlib import Path

from ..assets import SiteFiles
from ..charts import PROBE_LAYOUTS, feature_colours, probe_bars_svg, probe_line_svg
from ..core import SiteWriter
from ..data import SiteData, probe_chart_features


def probes_context(store, files: SiteFiles, ids_by_sweep: dict[str, list[int]] | None = None) -> dict | None:
    """Put the probe pictures into the site; the page's context, or None when the probe stage has not run.
    `ids_by_sweep`: `probe_chart_features(store)` where the caller has it already (SiteData does)."""
    row = store.stage_row("probe")
    if row is None or row["status"] != "done":
        return None
    named = {s["name"]: s for s in row["config"].get("sweeps", [])}
    steps_by_sweep = store.probe_steps()
    sweeps = []
    ids_by_sweep = probe_chart_features(store) if ids_by_sweep is None else ids_by_sweep
    order = list(ids_by_sweep)
    # One palette assignment for the whole page: a feature keeps its colour from chart to chart.
    colour_of = feature_colours(f for name in order for f in ids_by_sweep[name])
    for name in order:
        spec = named.get(name, {})
        steps = steps_by_sweep[name]
        feature_ids = ids_by_sweep[name]
        values = store.probe_values(name)
        labels_by_feature = store.feature_labels(feature_ids)
        series = [{"feature_id": f, "label": labels_by_feature.get(f) or "", "colour": colour_of[f],
                   "href": f"features/{f}.html", "values": [values.get((f, s[0]), 0.0) for s in steps]}
                  for f in feature_ids]
        srcs = []
        for step, _, _, image_path in steps:
            src_path = store.paths.out_dir / image_path
            rel = (Path("probes") / name / Path(image_path).name).as_posix()
            if src_path.exists():
                files.put(src_path, rel)
            srcs.append(rel)
        step_labels = [s[2] or "" for s in steps]
        kind = spec.get("kind", "size")
        entry = {"name": name, "kind": kind, "title": spec.get("title") or name.replace("-", " ").replace("_", " "),
                 "features": series, "steps": [{"label": l, "src": src} for l, src in zip(step_labels, srcs)],
                 "srcs_json": json.dumps(srcs), "labels_json": json.dumps(step_labels),
                 "values_json": json.dumps([[round(s["values"][i], 4) for s in series] for i in range(len(steps))])}
        if kind == "readout":
            entry["charts"] = {layout: probe_bars_svg(entry["title"], step_labels, series, layout)
                               for layout in PROBE_LAYOUTS}
        else:
            entry["charts"] = {layout: probe_line_svg(entry["title"], step_labels, series, layout)[0]
                               for layout in PROBE_LAYOUTS}
        sweeps.append(entry)
    # A finished probe stage without sweeps still gets its page, which says how to add some.
    return {"page_title": "Probes", "sweeps": sweeps}


def write_probes(writer: SiteWriter, data: SiteData) -> None:
    context = probes_context(data.store, data.files, data.probe_charts)
    if context is not None:
        writer.render("probes.html", "probes.html", context)
