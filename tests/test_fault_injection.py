"""SIGKILL a real build once inside each stage (seeded random points), rerun it each time, then kill
`site --force` and `layout --force` after a complete build: nothing lost, nothing left behind.

The harness is benchmarks/faults.py (one round of it); its module doc lists every check: exit 0, no duplicate
rows, the same counts and content as a clean build, every file the store names exists, no stray temp files
or unnamed renders/corpus files, and site/index.html present at every kill after the first complete build.
"""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from atlasgen.stages import REGISTRY

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def load_harness():
    spec = importlib.util.spec_from_file_location("bench_faults", REPO / "benchmarks" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_faults"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """(harness, config path, stage seconds, snapshot, folder) of a build without faults."""
    faults = load_harness()
    work = tmp_path_factory.mktemp("faults")
    config = faults.write_config(work)
    seconds = faults.clean_build(work / "clean", config)
    return faults, config, seconds, faults.snapshot(work / "clean"), work / "clean"


def test_kills_inside_every_stage_lose_nothing_and_leave_nothing(clean, tmp_path):
    faults, config, seconds, clean, clean_dir = clean
    assert faults.problems_after_build(clean_dir, clean) == [], "the clean build itself must pass"

    lines: list[str] = []
    kills = faults.run_round(tmp_path / "round", config, clean, seconds, random.Random(12), log=lines.append)
    report = "\n".join(lines) + "\n" + faults.table(kills)
    assert kills, report
    assert not [k for k in kills if k.lost], report
    landed = {k.landed for k in kills}
    # Each stage is aimed at once; a kill aimed at a very short stage may land in the next one.
    assert len(landed & set(REGISTRY.names)) >= len(REGISTRY.names) - 2, report
    assert sum(k.landed == "site" for k in kills) >= 1 and sum(k.landed == "layout" for k in kills) >= 1, report


def test_the_checks_see_what_a_kill_can_leave(clean, tmp_path):
    """The end-of-round checks are not blind: a stray temp, an unnamed render, a missing file and changed rows
    are each reported (a test that cannot fail is a defect)."""
    import shutil

    from atlasgen.store import Store
    faults, _, _, clean, clean_dir = clean
    out = shutil.copytree(clean_dir, tmp_path / "broken")
    (out / "renders" / "feature" / ".x.webp.tmp999999999").write_bytes(b"x")
    (out / "renders" / "feature" / "orphan.webp").write_bytes(b"x")
    (out / "toy" / "frames.json").unlink()
    with Store.open(out) as store:
        store.con.execute("DELETE FROM probes WHERE step = 0")
    problems = "\n".join(faults.problems_after_build(out, clean))
    assert "temp left behind: renders/feature/.x.webp.tmp999999999" in problems
    assert "renders/feature/orphan.webp is not named by the store" in problems
    assert "toy: its toy files toy/frames.json is missing" in problems or "toy/frames.json" in problems
    assert "probes:" in problems
