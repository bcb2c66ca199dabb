"""The render stage: pictures by inversion (see `inversion.py`) for features, image embeddings, pairs
(sums, slerps, orthogonalised) and the seed's ablation, each a row in `renders` plus a WebP file.

Renders are immutable artifacts keyed by `render_id` = hash(kind, target, seed, variant, settings), where
the settings are everything that changes a picture (steps, views, lr, tv, size, precision, the model, the
SAE run). A run plans its targets, skips those whose render already exists, and commits per batch, so an
interrupted run resumes where it stopped and `atlasgen render --features 1,2,3` adds just those. Renders made
with other settings (an older SAE, other steps, ...) are superseded: a run deletes them before it starts.

Target spaces: a feature target compares the SAE-normalised embedding (embedding − corpus mean, scaled) with
the feature's unit decoder row; an image target compares the raw embedding with the image's stored embedding.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import inversion
from ..config import RenderConfig
from ..errors import AtlasError, StageInputError
from ..inversion import InversionSettings
from ..model import load_embedding_model, resolve_device
from ..paths import atomic_path, parse_temp_name
from ..progress import bar, say
from ..sae import SparseAutoencoder, load_latest_sae
from ..store import Store, now
from ..threads import ThreadTuner, restore_torch_threads

# Bump when the engine changes what a render looks like, so old renders are superseded.
ENGINE_VERSION = 3
# "auto" on a CPU renders this many of the most frequent features.
CPU_AUTO_FEATURES = 64
ABLATION_VARIANTS = (("pixels", False), ("pixels", True), ("transformer", True))
WEBP_QUALITY = 90


def variant_name(param: str, augment: bool) -> str:
    return f"{param}+{'aug' if augment else 'noaug'}"


@dataclass
class Target:
    kind: str                      # feature | image | sum | slerp | orth | ablation
    seed: int
    variant: str                   # e.g. transformer+aug
    space: str                     # "sae": vs the SAE-normalised embedding; "embedding": vs the raw one
    direction_d: np.ndarray = field(repr=False)
    feature_a: int | None = None
    feature_b: int | None = None
    image_id: int | None = None
    t: float | None = None
    render_id: str = ""
    rng_seed: int = 0

    @property
    def key(self) -> dict:
        return {"kind": self.kind, "a": self.feature_a, "b": self.feature_b, "image": self.image_id,
                "t": None if self.t is None else round(self.t, 6), "seed": self.seed, "variant": self.variant}

    @property
    def param(self) -> str:
        return self.variant.split("+")[0]

    @property
    def augment(self) -> bool:
        return self.variant.endswith("+aug")


def _hash(obj, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def rng_seed(group: tuple, seed: int) -> int:
    """A target's random seed: from its group (a feature, an image, or a pair, so all renders of one pair
    start alike and a slerp sequence changes smoothly) and its seed number; never from a batch position."""
    return int(_hash([list(group), seed], 15), 16)


def settings_for(cfg: RenderConfig, model_ref: str, dtype: torch.dtype, sae_run: str) -> dict:
    return {"engine": ENGINE_VERSION, "n_views": cfg.n_views, "n_steps": cfg.n_steps, "lr": cfg.lr,
            "tv_weight": cfg.tv_weight, "size": cfg.size, "precision": str(dtype).replace("torch.", ""),
            "model": model_ref, "sae_run": sae_run}


# --- planning -------------------------------------------------------------------------------------------
def parse_features(spec: str, store: Store, n_features: int, device: torch.device) -> tuple[list[int], bool]:
    """Feature ids to render, and whether they were listed explicitly ("1,2,3")."""
    spec = str(spec).strip()
    if spec == "auto":
        spec = "all" if device.type == "cuda" else f"top:{CPU_AUTO_FEATURES}"
    if spec == "all":
        return list(range(n_features)), False
    if spec.startswith("top:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise AtlasError(f"render.features {spec!r}: N in top:N must be a number",
                             "e.g. features = \"top:64\"") from None
        rows = store.query("SELECT feature_id FROM features WHERE n_active > 0 "
                           "ORDER BY n_active DESC, feature_id LIMIT ?", [max(0, n)])
        return [int(r[0]) for r in rows], False
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise AtlasError(f"render.features {spec!r} is not all, auto, top:N or a list of feature ids",
                         "e.g. --features 1,2,3 or features = \"top:64\"") from None
    bad = [i for i in ids if not 0 <= i < n_features]
    if bad or not ids:
        raise AtlasError(f"feature id(s) {bad or spec} out of range: the SAE has features 0..{n_features - 1}",
                         f"pass ids between 0 and {n_features - 1}")
    return list(dict.fromkeys(ids)), True


def parse_pair(text: str, n_features: int) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in str(text).split(","))
    except ValueError:
        raise AtlasError(f"render.pairs entry {text!r} is not \"a,b\"", "e.g. pairs = [\"12,40\"]") from None
    if not (0 <= a < n_features and 0 <= b < n_features) or a == b:
        raise AtlasError(f"render.pairs entry {text!r}: need two different feature ids in 0..{n_features - 1}",
                         "fix the pair in [render] pairs")
    return a, b


def auto_pairs(store: Store, n: int) -> list[tuple[int, int]]:
    """The n strongest co-activating pairs and the n most similar (decoder cosine) pairs."""
    if n <= 0:
        return []
    co = store.query("SELECT feature_a, feature_b FROM coactivation WHERE feature_a < feature_b "
                     "ORDER BY n_images DESC, feature_a, feature_b LIMIT ?", [n])
    sim = store.query("SELECT least(feature_id, other_id) AS a, greatest(feature_id, other_id) AS b, max(cosine) AS c "
                      "FROM similar_features WHERE feature_id <> other_id GROUP BY a, b "
                      "ORDER BY c DESC, a, b LIMIT ?", [n + len(co)])
    pairs = [(int(a), int(b)) for a, b in co]
    for a, b, _ in sim:
        if (int(a), int(b)) not in pairs and len(pairs) < len(co) + n:
            pairs.append((int(a), int(b)))
    return pairs


def auto_images(store: Store, n: int) -> list[int]:
    """One image per label (in label order), topped up with the first images, n in all."""
    rows = store.query("SELECT min(i.image_id) FROM images i JOIN embeddings e USING (image_id) "
                       "GROUP BY i.label_id ORDER BY i.label_id NULLS LAST LIMIT ?", [n])
    ids = [int(r[0]) for r in rows]
    if len(ids) < n:
        more = store.query("SELECT image_id FROM embeddings ORDER BY image_id LIMIT ?", [n + len(ids)])
        ids += [int(r[0]) for r in more if int(r[0]) not in ids][:n - len(ids)]
    return ids


def plan(cfg: RenderConfig, store: Store, sae: SparseAutoencoder, device: torch.device) -> list[Target]:
    """Every render the config asks for, in rendering order (without ids yet)."""
    dirs_fd = sae.feature_directions().float().cpu().numpy()
    n_features = dirs_fd.shape[0]
    variant = variant_name(cfg.param, cfg.augment)
    features, explicit = parse_features(cfg.features, store, n_features, device)
    targets = [Target("feature", s, variant, "sae", dirs_fd[f], feature_a=f)
               for f in features for s in range(cfg.n_seeds)]
    for tg in targets:
        tg.rng_seed = rng_seed(("feature", tg.feature_a), tg.seed)
    if explicit:
        return targets

    emb_ids, emb_nd = store.embeddings()
    row_of = {int(i): k for k, i in enumerate(emb_ids)}

    def embedding(image_id: int, what: str) -> np.ndarray:
        if image_id not in row_of:
            raise AtlasError(f"render: {what} image id {image_id} has no embedding in the store",
                             "pick an id from `atlasgen query \"SELECT image_id FROM embeddings\"`")
        return emb_nd[row_of[image_id]]

    image_ids = list(cfg.image_ids) or auto_images(store, cfg.n_auto_images)
    for image_id in image_ids:
        for s in range(cfg.n_seeds):
            tg = Target("image", s, variant, "embedding", embedding(int(image_id), "render.image_ids"),
                        image_id=int(image_id))
            tg.rng_seed = rng_seed(("image", tg.image_id), s)
            targets.append(tg)

    pairs = [parse_pair(p, n_features) for p in cfg.pairs]
    pairs += [p for p in auto_pairs(store, cfg.n_auto_pairs) if p not in pairs and p[::-1] not in pairs]
    ts = [k / (cfg.slerp_steps - 1) for k in range(cfg.slerp_steps)] if cfg.slerp_steps >= 2 else []
    for a, b in pairs:
        da, db = torch.from_numpy(dirs_fd[a]), torch.from_numpy(dirs_fd[b])
        group = ("pair", min(a, b), max(a, b))
        for s in range(cfg.n_pair_seeds):
            made = [Target("sum", s, variant, "sae", inversion.pair_sum(da, db).numpy(), feature_a=a, feature_b=b)]
            made += [Target("slerp", s, variant, "sae", inversion.slerp(da, db, t).numpy(), feature_a=a, feature_b=b,
                            t=t) for t in ts]
            if abs(float(da @ db)) < 1 - 1e-6:
                made += [Target("orth", s, variant, "sae", inversion.orthogonalize(da, db).numpy(), feature_a=a,
                                feature_b=b),
                         Target("orth", s, variant, "sae", inversion.orthogonalize(db, da).numpy(), feature_a=b,
                                feature_b=a)]
            for tg in made:
                tg.rng_seed = rng_seed(group, s)
            targets += made

    if cfg.ablation and len(emb_ids):
        image_id = int(emb_ids[0]) if cfg.ablation_image_id < 0 else int(cfg.ablation_image_id)
        emb = embedding(image_id, "render.ablation_image_id")
        for param, augment in ABLATION_VARIANTS:
            tg = Target("ablation", 0, variant_name(param, augment), "embedding", emb, image_id=image_id)
            tg.rng_seed = rng_seed(("image", image_id), 0)
            targets.append(tg)
    return targets


# --- the stage --------------------------------------------------------------------------------------------
def load_render_model(cfg: RenderConfig, store: Store):
    embed_cfg = store.stage_config("embed")
    if embed_cfg is None:
        raise StageInputError("render needs the embed stage, which has not run in this output folder",
                              "run `atlasgen build` (or embed, train, encode) with the same --out first")
    model_ref = embed_cfg["model"]
    model = load_embedding_model(model_ref, cfg.device, cfg.precision, models_dir=store.paths.models_dir)
    return model, model_ref


def render_path(store: Store, kind: str, render_id: str) -> Path:
    return store.paths.renders_dir / kind / f"{render_id}.webp"


def write_webp(path: Path, array_hw3: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array_hw3).save(tmp, format="WEBP", quality=WEBP_QUALITY, method=4)


def run(cfg: RenderConfig, store: Store) -> dict:
    if cfg.param not in inversion.PARAMS:
        raise AtlasError(f"render.param {cfg.param!r} is not one of {', '.join(inversion.PARAMS)}",
                         "set [render] param = \"transformer\"")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise AtlasError(f"render.precision {cfg.precision!r} is not one of auto, fp32, bf16",
                         "set [render] precision = \"auto\"")
    if cfg.n_seeds < 0 or cfg.n_views < 1 or cfg.n_steps < 0 or cfg.batch_targets < 1:
        raise AtlasError("render: n_seeds ≥ 0, n_views ≥ 1, n_steps ≥ 0 and batch_targets ≥ 1 are needed",
                         "fix the [render] section of your config")
    run_info = store.latest_sae_run()
    if run_info is None:
        raise StageInputError("render needs a trained SAE", "run `atlasgen train` and `atlasgen encode` first")
    sae = load_latest_sae(store)
    device = resolve_device(cfg.device)
    model, model_ref = load_render_model(cfg, store)
    sae = sae.to(device)
    settings = settings_for(cfg, model_ref, model.dtype, run_info["run_id"])
    settings_hash = _hash(settings)
    targets = plan(cfg, store, sae, device)
    for tg in targets:
        tg.render_id = _hash([settings_hash, tg.key])
    assert len({tg.render_id for tg in targets}) == len(targets), "two planned renders share a render_id"

    n_superseded = _drop_superseded(store, settings_hash)
    done = _existing(store)
    todo = [tg for tg in targets if tg.render_id not in done]
    if len(todo) < len(targets):
        say(f"render: {len(targets) - len(todo)} of {len(targets)} renders already exist, {len(todo)} to do")

    centre_d = sae.input_mean.detach().float()
    batches = list(_batches(todo, cfg.batch_targets))
    # Thread count is tuned on whole optimisation steps (it changes speed, not results).
    tuner = ThreadTuner(cfg.n_threads, len(batches) * cfg.n_steps) if device.type == "cpu" else None
    with restore_torch_threads(), bar(total=len(todo), desc="render", unit="target") as progress:
        for batch in batches:
            tg0 = batch[0]
            inv_settings = InversionSettings(param=tg0.param, augment=tg0.augment, n_views=cfg.n_views,
                                             n_steps=cfg.n_steps, lr=cfg.lr, tv_weight=cfg.tv_weight, size=cfg.size,
                                             max_views_per_pass=cfg.max_views_per_pass)
            dirs_bd = torch.from_numpy(np.stack([tg.direction_d for tg in batch])).float()
            centres_bd = torch.stack([centre_d if tg.space == "sae" else torch.zeros_like(centre_d) for tg in batch])
            clock = [time.perf_counter()]
            shown = [0]

            def on_step(step: int, n_targets: int = len(batch)) -> None:
                if tuner is not None:
                    t = time.perf_counter()
                    tuner.after_batch(t - clock[0], n_targets)
                    tuner.before_batch()
                    clock[0] = t
                # Whole targets only, so the bar shows counts, not fractions; the rate and ETA stay smooth.
                reached = (step + 1) * n_targets // cfg.n_steps
                progress.update(reached - shown[0])
                shown[0] = reached

            if tuner is not None:
                tuner.before_batch()
            result = inversion.invert(model, dirs_bd, [tg.rng_seed for tg in batch], inv_settings,
                                      centres_bd=centres_bd, on_step=on_step)
            progress.update(len(batch) - shown[0])
            _save_batch(store, batch, result, sae, settings, settings_hash)

    summary = _summary(store, targets, len(todo), n_superseded, settings_hash)
    if tuner is not None and tuner.chosen:
        summary["n_threads"] = tuner.chosen
    return summary


def _batches(todo: list[Target], size: int):
    """Consecutive batches of one variant (a batch shares its parameterisation and augmentation)."""
    batch: list[Target] = []
    for tg in todo:
        if batch and (len(batch) == size or tg.variant != batch[0].variant):
            yield batch
            batch = []
        batch.append(tg)
    if batch:
        yield batch


def _save_batch(store: Store, batch: list[Target], result, sae: SparseAutoencoder, settings: dict,
                settings_hash: str) -> None:
    device = sae.W_dec.device
    with torch.no_grad():
        acts_bf = sae.encode_embeddings(result.embeddings_bd.to(device)).cpu()
    pixels_bhw3 = inversion.to_uint8(result.images_b3hw)
    rows: dict[str, list] = {k: [] for k in ("render_id", "kind", "feature_a", "feature_b", "image_id", "t", "seed",
                                               "variant", "path", "cosine", "self_activation", "self_rank",
                                               "params_json", "settings_hash", "created_at")}
    final_loss_b = result.loss_sb[-1] if len(result.loss_sb) else torch.full((len(batch),), float("nan"))
    for k, tg in enumerate(batch):
        path = render_path(store, tg.kind, tg.render_id)
        write_webp(path, pixels_bhw3[k])
        self_act = self_rank = None
        if tg.kind == "feature":
            acts_f = acts_bf[k]
            self_act = float(acts_f[tg.feature_a])
            self_rank = int((acts_f > acts_f[tg.feature_a]).sum())
        params = {**settings, "param": tg.param, "augment": tg.augment, "space": tg.space, "rng_seed": tg.rng_seed,
                  "final_loss": None if math.isnan(float(final_loss_b[k])) else round(float(final_loss_b[k]), 5)}
        for name, value in (("render_id", tg.render_id), ("kind", tg.kind), ("feature_a", tg.feature_a),
                            ("feature_b", tg.feature_b), ("image_id", tg.image_id), ("t", tg.t), ("seed", tg.seed),
                            ("variant", tg.variant),
                            ("path", path.relative_to(store.paths.out_dir).as_posix()),
                            ("cosine", float(result.cosine_b[k])), ("self_activation", self_act),
                            ("self_rank", self_rank), ("params_json", json.dumps(params)),
                            ("settings_hash", settings_hash), ("created_at", now())):
            rows[name].append(value)
    import pyarrow as pa
    types = {"feature_a": pa.int32(), "feature_b": pa.int32(), "image_id": pa.int32(), "t": pa.float64(),
             "seed": pa.int32(), "cosine": pa.float64(), "self_activation": pa.float64(), "self_rank": pa.int32(),
             "created_at": pa.timestamp("us")}
    with store.transaction():
        # A row left by a run that crashed between file and row write is replaced, not duplicated.
        store.con.execute("DELETE FROM renders WHERE render_id IN (SELECT unnest(?))", [rows["render_id"]])
        store.insert_frame("renders", {k: pa.array(v, type=types.get(k)) for k, v in rows.items()})


def _existing(store: Store) -> set[str]:
    """render_ids whose row and file both exist (a row without its file is redone)."""
    out = set()
    for render_id, path in store.query("SELECT render_id, path FROM renders"):
        if (store.paths.out_dir / path).exists():
            out.add(render_id)
    return out


def _drop_superseded(store: Store, settings_hash: str) -> int:
    """Delete renders made with other settings (rows and files): they no longer match the store."""
    rows = store.query("SELECT render_id, path FROM renders WHERE settings_hash IS DISTINCT FROM ?", [settings_hash])
    if not rows:
        return 0
    with store.transaction() as con:
        con.execute("DELETE FROM renders WHERE settings_hash IS DISTINCT FROM ?", [settings_hash])
    for _, path in rows:
        (store.paths.out_dir / path).unlink(missing_ok=True)
    say(f"render: removed {len(rows)} render(s) made with other settings")
    return len(rows)


def _summary(store: Store, targets: list[Target], n_rendered: int, n_superseded: int, settings_hash: str) -> dict:
    ids = [tg.render_id for tg in targets]
    rows = store.query("SELECT kind, cosine, self_rank FROM renders WHERE render_id IN (SELECT unnest(?))", [ids])
    per_kind = Counter(r[0] for r in rows)
    cosines = [r[1] for r in rows if r[1] is not None]
    ranks = [r[2] for r in rows if r[0] == "feature" and r[2] is not None]
    summary = {"n_planned": len(targets), "n_rendered": n_rendered, "n_superseded": n_superseded,
               "mean_cosine": round(float(np.mean(cosines)), 4) if cosines else None,
               "self_top1_share": round(float(np.mean([r == 0 for r in ranks])), 4) if ranks else None,
               "settings_hash": settings_hash}
    summary.update({f"n_{kind}": n for kind, n in sorted(per_kind.items())})
    return summary


def reset(store: Store) -> None:
    """Renders are immutable artifacts keyed by their own id, so a config change or --force keeps them (run()
    drops the ones made with other settings). Reset only tidies: rows whose file is gone (they are redone) and
    files no row points to (temp files of dead runs go in the pipeline's sweep, render's resume included)."""
    renders_dir = store.paths.renders_dir
    if not renders_dir.exists():
        if store.count("renders"):
            with store.transaction() as con:
                con.execute("DELETE FROM renders")
        return
    known = set()
    missing = []
    for render_id, path in store.query("SELECT render_id, path FROM renders"):
        if (store.paths.out_dir / path).exists():
            known.add((store.paths.out_dir / path).resolve())
        else:
            missing.append(render_id)
    if missing:
        with store.transaction() as con:
            con.execute("DELETE FROM renders WHERE render_id IN (SELECT unnest(?))", [missing])
    for path in renders_dir.rglob("*"):
        # Temp files follow paths.temp_path's rule; the pipeline's sweep removes those of dead processes.
        if path.is_file() and parse_temp_name(path.name) is None and path.resolve() not in known:
            path.unlink(missing_ok=True)
