"""Fault injection: SIGKILL a real `atlasgen build` at random points inside every stage, rerun it, and check
that nothing is lost and nothing is left behind.

A round starts from an empty output folder and kills one build inside each stage in turn (ingest, embed,
..., site), each rerun resuming the last; then one build runs to the end. After a complete build it forces
`site` and then `layout` again and kills those too (the published site must stay readable), then builds to the
end once more. Checked after every kill: the store still opens, and site/index.html exists whenever a
complete build has existed. Checked at the end of a round: exit 0; no duplicate rows; the same counts and
content as a clean build; every file the store names exists (artefacts.missing_artefacts); no file under
renders/ or corpus/ that the store does not name; no temp file or folder (paths.parse_temp_name) anywhere.

Prints, per stage: kills tried (landed inside that stage), survived, lost. A kill is lost when the run after
it fails, or a check after it (or at the end of its round) fails.

    python benchmarks/faults.py                 # 4 rounds: ≥ 40 kills, every stage (~15 min on 2 busy cores)
    python benchmarks/faults.py --rounds 1      # one round, as tests/test_fault_injection.py runs it

The config is the tiny preset cut down (`SMALL_CONFIG`), so a build takes seconds and the kills are many.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlasgen.stages import REGISTRY  # noqa: E402

# The tiny preset, cut down: 48 images, small commits (embed chunks of 8), a short SAE run, 7 renders one
# per batch on one thread (so a resumed render gives the same bytes as a clean one), PCA instead of UMAP
# (n_neighbors above the feature count), a short toy, no search index.
SMALL_CONFIG = """\
[ingest]
n_tiny_images = 48
[embed]
batch_size = 8
chunk_size = 8
n_threads = 1
[train]
n_steps = 200
warmup_steps = 20
dead_window = 50
resample_every = 100
log_every = 20
[render]
features = "top:6"
n_seeds = 1
n_views = 1
n_steps = 6
size = 32
batch_targets = 1
n_threads = 1
n_auto_pairs = 0
n_auto_images = 1
slerp_steps = 0
ablation = false
[layout]
n_neighbors = 500
[probe]
n_auto_features = 2
[toy]
n_steps = 40
frame_every = 10
[site]
search_index = false
"""

# Columns that record when, not what.
VOLATILE_COLUMNS = {"created_at", "skipped_at"}
# Each table's key: no two rows may share it.
TABLE_KEYS = {
    "images": "image_id", "embeddings": "image_id", "sae_runs": "run_id", "sae_metrics": "run_id, step",
    "activations": "image_id, feature_id", "features": "feature_id", "top_images": "feature_id, rank",
    "similar_features": "feature_id, rank", "coactivation": "feature_a, feature_b", "renders": "render_id",
    "probes": "probe, step, feature_id", "skipped_inputs": "source, stage",
}
# After a complete build: `site --force` first (it needs a finished layout), then `layout --force`.
PHASE2_STAGES = ("site", "layout")


def write_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "faults.toml"
    path.write_text(SMALL_CONFIG)
    return path


def build_command(out: Path, config: Path, stage: str = "build", force: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "atlasgen.cli", stage, "--out", str(out)]
    if stage == "build":
        cmd += ["--preset", "tiny", "--config", str(config)]
    return cmd + (["--force"] if force else [])


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def clean_build(out: Path, config: Path) -> dict[str, float]:
    """A build without faults; returns each stage's seconds (where the kills aim)."""
    result = subprocess.run(build_command(out, config) + ["--quiet"], capture_output=True, text=True, env=_env())
    if result.returncode != 0:
        raise RuntimeError(f"the clean build failed:\n{result.stderr[-3000:]}")
    from atlasgen.store import Store
    with Store.open(out, read_only=True) as store:
        return {name: float((store.stage_row(name) or {}).get("summary", {}).get("seconds", 1.0))
                for name in REGISTRY.names}


# --- what a build left behind -------------------------------------------------------------------------
def snapshot(out: Path) -> dict[str, tuple[int, str]]:
    """table → (row count, digest of its rows without the volatile columns)."""
    import hashlib

    from atlasgen.store import OUTPUT_TABLES_ALL, Store
    out_snap = {}
    with Store.open(out, read_only=True) as store:
        for table in OUTPUT_TABLES_ALL:
            cols = [r[0] for r in store.query(f"SELECT column_name FROM information_schema.columns "
                                              f"WHERE table_name = '{table}' ORDER BY ordinal_position")]
            keep = [c for c in cols if c not in VOLATILE_COLUMNS]
            rows = store.query(f"SELECT {', '.join(keep)} FROM {table} ORDER BY ALL")
            out_snap[table] = (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest()[:16])
    return out_snap


def problems_after_build(out: Path, clean: dict | None) -> list[str]:
    """Everything the end of a round checks; an empty list when all is well."""
    from atlasgen.artefacts import missing_artefacts
    from atlasgen.paths import parse_temp_name
    from atlasgen.stages.ingest import JOURNAL_NAME
    from atlasgen.store import Store
    found: list[str] = []
    with Store.open(out, read_only=True) as store:
        for table, key in TABLE_KEYS.items():
            n, n_keys = store.query(f"SELECT count(*), count(DISTINCT ({key})) FROM {table}")[0]
            if n != n_keys:
                found.append(f"{table}: {n - n_keys} duplicate rows")
        for stage in REGISTRY.names:
            row = store.stage_row(stage)
            if row is None or row["status"] != "done":
                found.append(f"{stage}: not done after the build")
            missing = missing_artefacts(store, stage)
            if missing:
                found.append(f"{stage}: {missing}")
        named = {out / p for p in store.render_paths()} | {out / p for p in store.corpus_copy_paths()}
        named.add(out / "corpus" / JOURNAL_NAME)  # ingest's record of what made each copy (kept for repairs)
    on_disk = {p for d in ("renders", "corpus") for p in (out / d).rglob("*") if p.is_file()}
    for path in sorted(on_disk - named)[:3]:
        found.append(f"{path.relative_to(out)} is not named by the store")
    for path in out.rglob("*"):
        if parse_temp_name(path.name) is not None:
            found.append(f"temp left behind: {path.relative_to(out)}")
    if clean is not None:
        now = snapshot(out)
        for table, (n, digest) in clean.items():
            if now.get(table) != (n, digest):
                found.append(f"{table}: {now.get(table, (0, ''))[0]} rows / content differ from the clean build "
                             f"({n} rows)")
    return found


# --- killing ------------------------------------------------------------------------------------------
@dataclass
class Kill:
    aimed: str                      # the stage the kill was meant for
    landed: str | None              # the stage running when it came (None: the build had ended)
    delay_s: float
    problems: list[str] = field(default_factory=list)

    @property
    def lost(self) -> bool:
        return bool(self.problems)


def run_and_kill(cmd: list[str], stage: str, delay_s: float, timeout_s: float = 600) -> tuple[str | None, int]:
    """Run `cmd`; `delay_s` after it prints "<stage>: running" (or at once when it reaches a later stage),
    SIGKILL it. Returns (the stage the kill landed in, or None if the run ended first; its exit code). A kill
    between two stages (the next one importing its module, say) counts for the next one; one after the last
    stage of the run, for that stage."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    seen: dict[str, str] = {}   # stage → "running" | "done"
    lock = threading.Lock()

    def watch():
        buffer = b""
        while True:
            chunk = proc.stderr.read1(4096)
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = re.split(rb"[\r\n]", buffer)
            for line in lines:
                m = re.match(rb"(\w+): (running|resuming|done|up to date|.* so it runs again)", line)
                if m and m.group(1).decode() in REGISTRY.names:
                    word = m.group(2).decode()
                    with lock:
                        seen[m.group(1).decode()] = ("done" if word in ("done", "up to date") else "running")

    threading.Thread(target=watch, daemon=True).start()
    command = cmd[cmd.index("atlasgen.cli") + 1]
    run_stages = list(REGISTRY.names) if command == "build" else [command]
    later = set(REGISTRY.names[REGISTRY.names.index(stage) + 1:])
    deadline = time.time() + timeout_s
    started = None
    while proc.poll() is None and time.time() < deadline:
        with lock:
            if started is None and (stage in seen or later & set(seen)):
                started = time.time()
        if started is not None and time.time() - started >= delay_s:
            with lock:
                running = [s for s in REGISTRY.names if seen.get(s) == "running"]
                done = [s for s in REGISTRY.names if seen.get(s) == "done"]
            proc.send_signal(signal.SIGKILL)
            if proc.wait() != -signal.SIGKILL:
                return None, proc.returncode  # it ended just before the signal
            if running:
                return running[-1], proc.returncode
            if not done:
                return stage, proc.returncode  # still starting up
            after = run_stages.index(done[-1]) + 1 if done[-1] in run_stages else len(run_stages)
            # Past the last stage (closing the store, printing the site's path) counts for that stage.
            return (run_stages[after] if after < len(run_stages) else done[-1]), proc.returncode
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    return None, proc.wait()


def run_round(work: Path, config: Path, clean: dict, seconds: dict[str, float], rng: random.Random,
              log=print) -> list[Kill]:
    """One round (see the module doc) in `work/build`; returns every kill with what went wrong after it."""
    out = work / "build"
    shutil.rmtree(out, ignore_errors=True)
    kills: list[Kill] = []
    completed = False

    def after_kill(kill: Kill) -> None:
        from atlasgen.store import Store
        try:
            Store.open(out, read_only=True).close()
        except Exception as e:  # the store must survive any kill
            kill.problems.append(f"store unreadable after the kill: {e}")
        if completed and not (out / "site" / "index.html").is_file():
            kill.problems.append("site/index.html missing after a kill")
        kills.append(kill)
        log(f"  kill aimed at {kill.aimed:7s} landed in {kill.landed or '-':7s} after {kill.delay_s:5.2f}s"
            + (f"  PROBLEMS: {kill.problems}" if kill.problems else ""))

    def finish(stage_cmd: list[str]) -> list[str]:
        result = subprocess.run(stage_cmd + ["--quiet"], capture_output=True, text=True, env=_env())
        if result.returncode != 0:
            return [f"rerun failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-3:]}"]
        return []

    def kill_in(stage: str, cmd: list[str]) -> None:
        delay = rng.uniform(0.0, max(0.1, 0.8 * seconds.get(stage, 1.0)))
        landed, code = run_and_kill(cmd, stage, delay)
        if landed is None:  # the run ended before the kill: it must have ended well
            if code != 0:
                kill = Kill(stage, stage, delay, [f"run failed (exit {code}) before the kill"])
                kills.append(kill)
                log(f"  run aimed at {stage} failed before the kill: PROBLEMS: {kill.problems}")
            return
        after_kill(Kill(stage, landed, delay))

    build = build_command(out, config)
    for stage in REGISTRY.names:
        kill_in(stage, build)
    problems = finish(build)
    completed = (out / "site" / "index.html").is_file()
    for stage in PHASE2_STAGES:
        kill_in(stage, build_command(out, config, stage, force=True))
    problems += finish(build)
    problems += problems_after_build(out, clean)
    if problems:
        log(f"  end of round: PROBLEMS: {problems}")
        for kill in kills:  # a bad end cannot be pinned on one kill: every kill of the round counts as lost
            kill.problems.extend(problems)
    return kills


def table(kills: list[Kill]) -> str:
    tried = Counter(k.landed for k in kills if k.landed)
    lost = Counter(k.landed for k in kills if k.landed and k.lost)
    lines = [f"{'stage':8s} {'tried':>6s} {'survived':>9s} {'lost':>5s}"]
    for stage in REGISTRY.names:
        lines.append(f"{stage:8s} {tried[stage]:6d} {tried[stage] - lost[stage]:9d} {lost[stage]:5d}")
    total, total_lost = sum(tried.values()), sum(lost.values())
    lines.append(f"{'all':8s} {total:6d} {total - total_lost:9d} {total_lost:5d}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="rounds of one kill per stage (+2 in layout/site)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="atlasgen-faults-"))
    t0 = time.time()
    try:
        config = write_config(work)
        seconds = clean_build(work / "clean", config)
        clean = snapshot(work / "clean")
        print(f"clean build: {sum(seconds.values()):.1f}s of stages "
              f"({', '.join(f'{k} {v:.1f}' for k, v in seconds.items())})")
        kills: list[Kill] = []
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}")
            kills += run_round(work / f"round{r}", config, clean, seconds, rng)
        print(table(kills))
        print(f"{len(kills)} kills in {time.time() - t0:.0f}s on {platform.machine()} "
              f"({os.cpu_count()} CPUs), seed {args.seed}")
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
