"""The combinations page: every rendered pair (A + B, the slerp sequence, each without the other's part)."""
from __future__ import annotations

from ..core import SiteWriter
from ..data import SiteData


def write_combinations(writer: SiteWriter, data: SiteData) -> None:
    pairs: dict[tuple[int, int], dict] = {}

    def pair(a: int, b: int) -> dict:
        if (a, b) not in pairs:
            pairs[(a, b)] = {"a": data.tile(a), "b": data.tile(b), "sum": None, "slerp": {}, "orth_a": None,
                             "orth_b": None}
        return pairs[(a, b)]

    best_cos: dict[tuple, float] = {}

    def better(key: tuple, r: dict) -> bool:
        cos = r["cosine"] if r["cosine"] is not None else -2.0
        if key in best_cos and best_cos[key] >= cos:
            return False
        best_cos[key] = cos
        return True

    for r in data.pair_renders:
        a, b = r["feature_a"], r["feature_b"]
        if a is None or b is None:
            continue
        if r["kind"] == "sum" and better(("sum", a, b), r):
            pair(a, b)["sum"] = data.render_picture(r)
        elif r["kind"] == "slerp" and r["t"] is not None and better(("slerp", a, b, round(r["t"], 4)), r):
            pair(a, b)["slerp"][round(r["t"], 4)] = data.render_picture(r)
    for r in data.pair_renders:  # orth renders attach to a pair made by a sum or a slerp, in either order
        if r["kind"] != "orth" or r["feature_a"] is None or r["feature_b"] is None:
            continue
        a, b = r["feature_a"], r["feature_b"]
        if (a, b) in pairs and better(("orth", a, b), r):
            pairs[(a, b)]["orth_a"] = data.render_picture(r)
        elif (b, a) in pairs and better(("orth", a, b), r):
            pairs[(b, a)]["orth_b"] = data.render_picture(r)
        elif (a, b) not in pairs and (b, a) not in pairs and better(("orth", a, b), r):
            pair(a, b)["orth_a"] = data.render_picture(r)
    out = []
    for (a, b), p in sorted(pairs.items()):
        steps = []
        for t in sorted(p["slerp"]):
            steps.append({"t": t, "pic": p["slerp"][t],
                          "caption": f"{round(100 * (1 - t))}% #{a} + {round(100 * t)}% #{b}"})
        out.append({**p, "key": f"{a}-{b}", "steps": steps,
                    "start": min(range(len(steps)), key=lambda i: abs(steps[i]["t"] - 0.5)) if steps else 0})
    writer.render("combinations.html", "combinations.html", {"pairs": out})
