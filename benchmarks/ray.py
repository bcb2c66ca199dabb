"""The tiny render with the local executor, with Ray on one 1-CPU worker and with Ray on two 1-CPU workers, in
one run on this machine: Ray's overhead against local (goal ≤ 15 %) and the two-worker speed-up (goal ≥ 1.7×).

Each run renders the same plan into its own copy of one tiny atlas built (ingest → encode) at the start. Local
renders with one torch thread (as a 1-CPU worker does); Ray starts once, locally, with 2 CPUs and its workers
at normal priority like the local run (its start is printed apart: on a cluster it is paid once, when the
cluster comes up). A Ray run's time includes what every stage pays on a running cluster: starting its workers,
sending the model and SAE through the object store and building them on each worker. `--batch-targets` sets
the unit size (it does not change the pictures): the default 32 makes 14 full units of the tiny plan's 447
targets, so two workers can share them evenly (the preset's 64 gives 7 full units: at best 7/4 = 1.75×).

Two views of each run are printed:
- wall-clock seconds, as measured;
- CPU seconds (all threads) of this process and of each Ray worker process (its start-up included). On a
  machine shared with other jobs the wall clock measures the competition: Linux's autogroup scheduling gives
  each session one share of the CPUs, so two workers of one session get no more CPU than one when other
  sessions keep the cores busy. A worker's CPU seconds are its wall time on a core of its own, so the
  CPU-based figures say what the run would take on idle cores: overhead = Ray's total CPU / local's CPU − 1,
  speed-up = the single worker's CPU / the busier of the two workers' CPU.

    python benchmarks/ray.py              # the tiny render (447 targets of 24 steps): 3 runs of ~1.5 min idle
    python benchmarks/ray.py --quick      # 64 features × 1 seed, 8 steps
    python benchmarks/ray.py --repeats 3  # medians of 3 rounds
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

# This file is named ray.py: its own folder (sys.path[0]) would shadow the ray package, so the repo root
# takes its place.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from atlasgen.config import RunConfig, load_config  # noqa: E402
from atlasgen.executor import RayExecutor  # noqa: E402
from atlasgen.pipeline import run_stages  # noqa: E402
from atlasgen.progress import set_quiet  # noqa: E402
from atlasgen.store import Store  # noqa: E402


def render_run(encoded: Path, work: Path, name: str, cfg, executor=None) -> dict:
    """Render into a fresh copy of `encoded`; wall seconds, this process's CPU seconds, the workers' CPU seconds."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(encoded, out)
    with Store.open(out) as store:
        t0, cpu0 = time.perf_counter(), time.process_time()
        summary = run_stages(cfg, store, ["render"], executor=executor)["render"]
        wall, driver_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    workers_cpu = executor.worker_cpu_seconds() if executor is not None else []
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": wall, "driver_cpu": driver_cpu, "workers_cpu": workers_cpu, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 features × 1 seed, 8 steps, no pairs/images/ablation")
    ap.add_argument("--batch-targets", type=int, default=32, help="targets per unit (the preset has 64)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the three runs; medians are printed")
    ap.add_argument("--keep", type=Path, default=None, help="build the tiny atlas here (reused if it exists)")
    args = ap.parse_args()
    set_quiet(True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)

    cfg = load_config("tiny")
    render_cfg = replace(cfg.render, batch_targets=args.batch_targets, n_threads=1)
    if args.quick:
        render_cfg = replace(render_cfg, features="top:64", n_seeds=1, n_steps=8, n_auto_pairs=0,
                             n_auto_images=0, ablation=False)
    cfg = replace(cfg, render=render_cfg)

    with tempfile.TemporaryDirectory(prefix="rb", dir="/tmp") as tmp:
        work = Path(tmp)
        encoded = args.keep or work / "encoded"
        t0 = time.perf_counter()
        with Store.open(encoded) as store:
            run_stages(cfg, store, ["ingest", "embed", "train", "encode"])
        print(f"tiny atlas through encode: {time.perf_counter() - t0:.1f} s")

        import ray
        t0 = time.perf_counter()
        # Workers at the local run's priority: Ray nices them to 15 by default, which on a shared machine
        # would measure the other jobs, not Ray.
        ray.init(num_cpus=2, _temp_dir=str(work / "r"), include_dashboard=False, log_to_driver=False,
                 _system_config={"worker_niceness": 0})
        print(f"Ray start (local, 2 CPUs): {time.perf_counter() - t0:.1f} s (paid once per cluster, not per stage)")

        runs: dict[str, list[dict]] = {"local": [], "ray1": [], "ray2": []}
        for round_ in range(args.repeats):
            run = render_run(encoded, work, "local", cfg)
            runs["local"].append(run)
            n_planned = run["summary"]["n_planned"]
            print(f"local: {run['wall']:.1f} s wall, {run['driver_cpu']:.1f} s CPU", flush=True)
            for n_workers in (1, 2):
                executor = RayExecutor(RunConfig(executor="ray", ray_n_workers=n_workers, ray_cpus_per_worker=1))
                try:
                    run = render_run(encoded, work, f"ray{n_workers}", cfg, executor)
                finally:
                    executor.close()
                assert run["summary"]["n_rendered"] == n_planned and run["summary"]["n_workers"] == n_workers
                runs[f"ray{n_workers}"].append(run)
                print(f"ray, {n_workers} worker(s): {run['wall']:.1f} s wall, driver {run['driver_cpu']:.1f} s CPU, "
                      f"workers {', '.join(f'{c:.1f}' for c in run['workers_cpu'])} s CPU", flush=True)
        ray.shutdown()

    def med(name: str, value) -> float:
        return statistics.median(value(r) for r in runs[name])

    wall = {k: med(k, lambda r: r["wall"]) for k in runs}
    total_cpu = {k: med(k, lambda r: r["driver_cpu"] + sum(r["workers_cpu"])) for k in runs}
    busiest_worker_cpu = {k: med(k, lambda r: max(r["workers_cpu"])) for k in ("ray1", "ray2")}
    print(f"\nthe tiny render{' (--quick)' if args.quick else ''}: {n_planned} targets, {render_cfg.n_steps} steps, "
          f"units of {render_cfg.batch_targets} targets; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end; median of {args.repeats} round(s)")
    print("| run | wall s | CPU s (driver + workers) | busiest worker CPU s |")
    print("|---|---|---|---|")
    print(f"| local executor, 1 thread | {wall['local']:.1f} | {total_cpu['local']:.1f} | |")
    print(f"| Ray, one 1-CPU worker | {wall['ray1']:.1f} | {total_cpu['ray1']:.1f} | {busiest_worker_cpu['ray1']:.1f} |")
    print(f"| Ray, two 1-CPU workers | {wall['ray2']:.1f} | {total_cpu['ray2']:.1f} | {busiest_worker_cpu['ray2']:.1f} |")
    print(f"Ray overhead against local (one worker): wall {wall['ray1'] / wall['local'] - 1:+.1%}, "
          f"CPU {total_cpu['ray1'] / total_cpu['local'] - 1:+.1%}  (goal ≤ 15 %)")
    print(f"two-worker speed-up over one: wall {wall['ray1'] / wall['ray2']:.2f}×, on idle cores (CPU) "
          f"{busiest_worker_cpu['ray1'] / busiest_worker_cpu['ray2']:.2f}×  (goal ≥ 1.7×)")

if __name__ == "__main__":
    main()
