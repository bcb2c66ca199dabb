"""What a pipeline stage is: the one contract every stage module fills in, checked when it is declared.

A stage module ends with `SPEC = Stage(...)`; `atlasgen.stages` imports every stage module statically and
lists them in pipeline order in `REGISTRY`. Order, config hashes, resets, navigation and the site's page
providers are all derived from these declarations.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..paths import BuildPaths

if TYPE_CHECKING:
    from ..store import Store


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    name     the stage's name: its CLI command, its `[name]` config section and its `stage_runs` row
    config   the frozen config dataclass of its `[name]` section
    run      `run(cfg, store) -> dict`: does the work; returns a small JSON-able summary for `stage_runs`
             (where a rerun wrote files with other content than before, its `n_files_changed` says how many:
             the stages reading it then run again even where its tables came out the same)
    inputs   stages whose outputs it reads (its config hash covers theirs, so an upstream rerun reruns it)
    tables   store tables it writes (it is their only writer); the default reset empties them
    folders  `BuildPaths` attributes naming the folders it writes; the default reset removes them
    reset    `reset(store)`, called when the stage's hash changed or on --force; default: empty `tables`,
             remove `folders`. A stage whose outputs are immutable artefacts (render) or published
             folders (layout, site) brings its own.
    pages    site pages it contributes (file names under site/, e.g. "map.html"); the site package has a
             writer for each, and a placeholder stands in while the stage has not run
    skips    True when it records skipped inputs (its rows in `skipped_inputs` are reset with it)
    executor True when its work is units run by an executor: `run(cfg, store, executor=...)` gets the one
             `[run]` asks for (`atlasgen.executor`: here, or on Ray workers)
    repair   `repair(cfg, store) -> dict`: writes again the files a finished run lost (`atlasgen.artefacts`)
             from its tables, computing nothing else; returns the summary keys it changes. The pipeline calls
             it instead of `run` for a finished, up-to-date stage with missing files, and the stage keeps its
             finish time. Without one, the stage runs again (and keeps its finish time only where its tables
             come out the same).
    """

    name: str
    config: type
    run: Callable[..., dict]
    inputs: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    reset: Callable[["Store"], None] | None = None
    pages: tuple[str, ...] = ()
    skips: bool = False
    executor: bool = False
    repair: Callable[..., dict] | None = None

    def __post_init__(self):
        # A stage with a missing or misspelt piece fails here, when its module is imported.
        if not (self.name.isidentifier() and self.name.islower()):
            raise TypeError(f"stage name {self.name!r} must be a lower-case identifier")
        if not (dataclasses.is_dataclass(self.config) and self.config.__dataclass_params__.frozen):
            raise TypeError(f"stage {self.name}: config must be a frozen dataclass, got {self.config!r}")
        if not callable(self.run):
            raise TypeError(f"stage {self.name}: run must be callable")
        for name in ("reset", "repair"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"stage {self.name}: {name} must be callable")
        for folder in self.folders:
            if not isinstance(getattr(BuildPaths, folder, None), property):
                raise TypeError(f"stage {self.name}: folder {folder!r} is not a BuildPaths property")
        for page in self.pages:
            if not page.endswith(".html") or "/" in page:
                raise TypeError(f"stage {self.name}: page {page!r} must be a top-level .html file name")

    def reset_outputs(self, store: "Store") -> None:
        """Delete what the stage wrote, so it can run afresh."""
        if self.reset is not None:
            self.reset(store)
            return
        store.clear_stage_outputs(self.name, self.tables, self.skips)
        for folder in self.folders:
            shutil.rmtree(getattr(store.paths, folder), ignore_errors=True)


class Registry:
    """The stages in pipeline order, checked as a whole when built."""

    def __init__(self, stages: tuple[Stage, ...]):
        self.stages = tuple(stages)
        from ..config import section_classes
        sections = section_classes()
        seen: set[str] = set()
        writers: dict[str, str] = {}
        pages: dict[str, str] = {}
        for stage in self.stages:
            if stage.name in seen:
                raise TypeError(f"stage {stage.name} is declared twice")
            if sections.get(stage.name) is not stage.config:
                raise TypeError(f"stage {stage.name}: config {stage.config.__name__} is not AtlasConfig.{stage.name}'s "
                                "section class")
            for upstream in stage.inputs:
                if upstream not in seen:
                    raise TypeError(f"stage {stage.name} reads {upstream!r}, which is not an earlier stage")
            for table in stage.tables:
                if table in writers:
                    raise TypeError(f"table {table} has two writers: {writers[table]} and {stage.name}")
                writers[table] = stage.name
            for page in stage.pages:
                if page in pages:
                    raise TypeError(f"page {page} is contributed by {pages[page]} and {stage.name}")
                pages[page] = stage.name
            seen.add(stage.name)
        # Every page a stage provides must have a writer in the site's page table: checked here, at import.
        from ..site.pages import PAGES, check_stage_pages
        check_stage_pages(PAGES, {s.name: s.pages for s in self.stages if s.pages})
        self._by_name = {s.name: s for s in self.stages}
        self.table_writers = writers
        self.page_stages = pages

    def __iter__(self):
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Stage:
        return self._by_name[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def ordered(self, names) -> list[Stage]:
        """The named stages, in pipeline order."""
        wanted = set(names)
        unknown = wanted - set(self._by_name)
        assert not unknown, f"unknown stage(s) {sorted(unknown)}"
        return [s for s in self.stages if s.name in wanted]
