"""Executors: where the units of embed and render run (`[run] executor`, `--executor`).

A stage that can spread out cuts its work into units (embed: a chunk of image ids; render: a batch of targets)
and gives an executor two pure functions:

    setup(payload) -> state                   once per worker: builds the model (and SAE) from the payload
    fn(state, unit, on_step) -> result        one unit; touches no store and no output folder

`map_units` yields `(unit, result)` as units finish. The stage (the driver) commits each result in one
transaction as it arrives, so it stays the only writer of the store and of the pictures, and a driver killed
at any point resumes with its finished units kept.

- `LocalExecutor`: this process, units in order; what atlasgen always did.
- `RayExecutor`: units are calls on Ray actors (each keeps its state between units). The payload goes ONCE into
  Ray's object store (`ray.put`), so a worker node needs no copy of the checkpoint. A GPU unit asks for
  `ray_gpus_per_worker`, so every GPU of every node gets a worker; CPU-only clusters get CPU workers. Ray
  restarts a worker that dies and retries its units (`ray_max_retries`); the driver records each unit once.

`PackedModel` / `PackedSAE` are the payloads: weights as numpy arrays (Ray shares them zero-copy between the
workers of one node), rebuilt on the worker's device.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Sequence

import numpy as np
import torch

from .config import RunConfig
from .errors import AtlasError, reclaim_sigterm
from .model import EmbeddingModel, PreprocessSpec, bf16_is_fast, resolve_device
from .progress import say
from .sae import SparseAutoencoder

RAY_INSTALL_HINT = "pip install 'atlasgen[ray]' (here and on every node of the cluster), or use --executor local"
# Units queued per worker: one running, one waiting, so a worker never idles while the driver commits.
UNITS_AHEAD_PER_WORKER = 2

OnStep = Callable[[int], None]


# --- payloads: what travels to the workers ------------------------------------------------------------------
@dataclass
class PackedModel:
    """An EmbeddingModel as plain data: its transformers config, its weights in the model's dtype (bf16 as
    int16 bit patterns, which numpy lacks) and its preprocessing. `build` gives back the same model."""

    config: Any
    weights: dict[str, np.ndarray]
    spec: PreprocessSpec
    dtype: str                     # "float32" | "bfloat16"

    @classmethod
    def pack(cls, model: EmbeddingModel) -> "PackedModel":
        weights = {}
        for name, tensor in model.backbone.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            weights[name] = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
        return cls(model.backbone.config, weights, model.spec, str(model.dtype).replace("torch.", ""))

    def build(self, device: torch.device) -> EmbeddingModel:
        from transformers import AutoModel
        backbone = AutoModel.from_config(self.config)
        state = {}
        with warnings.catch_warnings():  # Ray's shared buffers are read-only; load_state_dict copies them
            warnings.simplefilter("ignore", UserWarning)
            for name, array in self.weights.items():
                tensor = torch.from_numpy(array)
                state[name] = tensor.view(torch.bfloat16) if array.dtype == np.int16 else tensor
            backbone.load_state_dict(state, strict=True)
        return EmbeddingModel(backbone, self.spec, getattr(torch, self.dtype)).to(device)


@dataclass
class PackedSAE:
    d_in: int
    n_features: int
    weights: dict[str, np.ndarray]

    @classmethod
    def pack(cls, sae: SparseAutoencoder) -> "PackedSAE":
        return cls(sae.d_in, sae.n_features, {k: v.detach().float().cpu().numpy() for k, v in sae.state_dict().items()})

    def build(self, device: torch.device) -> SparseAutoencoder:
        sae = SparseAutoencoder(self.d_in, self.n_features)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sae.load_state_dict({k: torch.from_numpy(v) for k, v in self.weights.items()})
        return sae.to(device)


@dataclass(frozen=True)
class UnitHardware:
    """Where units run, as a worker sees it: for precision = "auto" and for sizing work to free GPU memory."""

    device_type: str                # "cpu" | "cuda"
    bf16_fast: bool                 # bf16 is fast there (what precision = "auto" picks)
    free_bytes: int | None = None   # free memory of the worker's GPU (None on a CPU)


def hardware_of(device: str) -> UnitHardware:
    resolved = resolve_device(device)
    free_bytes = int(torch.cuda.mem_get_info(resolved)[0]) if resolved.type == "cuda" else None
    return UnitHardware(resolved.type, bf16_is_fast(resolved), free_bytes)


def resolve_precision(precision: str, bf16_fast: bool) -> str:
    """precision "auto" → "bf16" where the units' hardware is fast at it, else "fp32"; others as they are."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_fast else "fp32"


# --- the executors --------------------------------------------------------------------------------------------
class LocalExecutor:
    """Units in this process, one after another, in the order given."""

    name = "local"
    remote = False   # False: payloads may be live objects (the driver's own model)
    shared_corpus = True   # units can read the output folder's corpus/ themselves
    n_workers = 1

    def unit_hardware(self, device: str) -> UnitHardware:
        """The hardware units run on (this machine's)."""
        return hardware_of(device)

    def map_units(self, setup: Callable[[Any], Any], payload: Any, fn: Callable[..., Any], units: Sequence,
                  *, unit_id: Callable[[Any], Hashable], device: str = "auto",
                  ship: Callable[[Any], Any] | None = None,
                  on_step: Callable[[Any, int], None] | None = None) -> Iterator[tuple[Any, Any]]:
        """Yield (unit, fn(state, unit, on_step)) per unit; `on_step(unit, step)` reports progress inside a
        unit (local only: a remote worker cannot call back)."""
        state = setup(payload)
        for unit in units:
            step_cb = (lambda step, _unit=unit: on_step(_unit, step)) if on_step is not None else None
            yield unit, fn(state, unit, step_cb)

    def close(self) -> None:
        pass


def ray_available() -> bool:
    try:
        import ray  # noqa: F401  (only asked when --executor ray is)
    except ImportError:
        return False
    return True


class RayExecutor:
    """Units as calls on Ray actors. Connects (or starts a local Ray) on first use, not when made, so a build
    whose embed and render are up to date never starts Ray."""

    name = "ray"
    remote = True

    def __init__(self, cfg: RunConfig):
        if not ray_available():
            raise AtlasError("--executor ray needs Ray, which is not installed", RAY_INSTALL_HINT)
        assert cfg.ray_cpus_per_worker > 0 and cfg.ray_gpus_per_worker >= 0 and cfg.ray_max_retries >= 0, \
            "run.ray_cpus_per_worker > 0, ray_gpus_per_worker ≥ 0, ray_max_retries ≥ 0"
        if cfg.ray_address:
            _check_reachable(cfg.ray_address)  # before any stage runs, not when the first one needs Ray
        self.cfg = cfg
        self.shared_corpus = cfg.shared_corpus
        self._started_ray = False
        self._connected = False
        self._workers: list = []
        self._workers_use_gpu: bool | None = None

    # -- connection and workers
    def _ray(self):
        import ray
        if self._connected:
            return ray
        if not ray.is_initialized():
            address = self.cfg.ray_address or None
            # A local Ray we start runs its workers at normal priority, as the local executor runs (Ray nices
            # them to 15 by default, which on a machine shared with other jobs starves them).
            local_only = {} if address else {"_system_config": {"worker_niceness": 0}}
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, **local_only)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise AtlasError(f"could not start or join {where}: {str(e).splitlines()[0] if str(e) else e!r}",
                                 "check --ray-address (the head's `ray start --head` prints it), or omit it to "
                                 "start a local Ray") from None
            self._started_ray = address is None
            # ray.init replaced the CLI's SIGTERM handler with its own (exit 1 or 15, the stage recorded failed):
            # SIGTERM stops the stage as Ctrl-C does, and close() shuts down a local Ray as after Ctrl-C.
            reclaim_sigterm()
        resources = ray.cluster_resources()
        where = self.cfg.ray_address or ("a local Ray" if self._started_ray else "the connected Ray")
        say(f"ray: {where}: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs")
        self._connected = True
        return ray

    def _units_use_gpu(self, device: str) -> bool:
        if device == "cpu":
            return False
        has_gpus = self._ray().cluster_resources().get("GPU", 0) > 0
        if device == "cuda" and not has_gpus:
            raise AtlasError("--device cuda was asked for but the Ray cluster has no GPUs",
                             "use --device cpu or auto, or add GPU nodes to the cluster")
        return has_gpus and self.cfg.ray_gpus_per_worker > 0

    def workers(self, device: str = "auto", n_units: int | None = None) -> list:
        """The actor pool for units on `device`: as many workers as the cluster allows (or ray_n_workers), at
        most `n_units`; made on first use, grown when more units come, remade if GPU-ness changes."""
        ray = self._ray()
        use_gpu = self._units_use_gpu(device)
        if self._workers_use_gpu != use_gpu:
            self._kill_workers()
        resources = ray.cluster_resources()
        if self.cfg.ray_n_workers > 0:
            n = self.cfg.ray_n_workers
        elif use_gpu:
            n = int(resources.get("GPU", 0) // self.cfg.ray_gpus_per_worker)
        else:
            n = int(resources.get("CPU", 1) // self.cfg.ray_cpus_per_worker)
        n = max(1, min(n, n_units) if n_units else n)
        if len(self._workers) < n:
            actor_cls = ray.remote(_UnitWorker).options(
                num_cpus=self.cfg.ray_cpus_per_worker, num_gpus=self.cfg.ray_gpus_per_worker if use_gpu else 0,
                max_restarts=self.cfg.ray_max_retries, max_task_retries=self.cfg.ray_max_retries)
            n_threads = max(1, int(self.cfg.ray_cpus_per_worker))
            self._workers += [actor_cls.remote(n_threads) for _ in range(n - len(self._workers))]
            self._workers_use_gpu = use_gpu
        return self._workers

    @property
    def n_workers(self) -> int:
        return len(self._workers)

    def worker_pids(self) -> list[int]:
        """Process ids of the workers (for tests that kill one)."""
        ray = self._ray()
        return ray.get([w.pid.remote() for w in self._workers])

    def worker_cpu_seconds(self) -> list[float]:
        """CPU seconds each worker process has used so far, all threads (for benchmarks)."""
        ray = self._ray()
        return ray.get([w.cpu_seconds.remote() for w in self._workers])

    def unit_hardware(self, device: str) -> UnitHardware:
        """Asked of one worker (the first of the pool), so the answer is the hardware units run on."""
        workers = self.workers(device, n_units=1)
        return self._get(workers[0].hardware.remote(device))

    # -- the work
    def map_units(self, setup, payload, fn, units: Sequence, *, unit_id, device: str = "auto", ship=None,
                  on_step=None) -> Iterator[tuple[Any, Any]]:
        """Yield (unit, result) as units finish, in any order; each unit id at most once."""
        units = list(units)
        if not units:
            return
        ray = self._ray()
        workers = self.workers(device, n_units=len(units))
        # A list keeps Ray from resolving the payload at each call: a worker fetches it once, on its first
        # unit, and keeps what setup() built from it (also after Ray restarts it).
        payload_box = [ray.put(payload)]
        queue = iter(units)
        load = [0] * len(workers)
        in_flight: dict = {}
        finished: set = set()

        def submit() -> None:
            while True:
                w = min(range(len(workers)), key=load.__getitem__)
                if load[w] >= UNITS_AHEAD_PER_WORKER:
                    return
                unit = next(queue, None)
                if unit is None:
                    return
                arg = ship(unit) if ship is not None else unit
                ref = workers[w].run.remote(setup, payload_box, fn, arg)
                in_flight[ref] = (unit_id(unit), unit, w)
                load[w] += 1

        try:
            submit()
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                key, unit, w = in_flight.pop(ready[0])
                load[w] -= 1
                result = self._get(ready[0], what=f"unit {key}")
                submit()  # before yielding, so the workers keep going while the driver commits
                if key in finished:
                    continue
                finished.add(key)
                yield unit, result
        finally:
            for ref in in_flight:  # the stage stopped early (an error, Ctrl-C): drop what is queued
                try:
                    ray.cancel(ref)
                except Exception:  # already finished or not cancellable: harmless
                    pass

    def _get(self, ref, what: str = "a call"):
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        try:
            return ray.get(ref)
        except RayTaskError as e:
            # A user error inside fn/setup stays one line (an AtlasError); a bug keeps Ray's remote traceback.
            if isinstance(getattr(e, "cause", None), AtlasError):
                raise e.cause from None
            raise
        except RayActorError as e:  # the worker died (again after ray_max_retries restarts) or never started
            raise AtlasError(f"a Ray worker failed running {what}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                             "every node needs atlasgen installed (pip install 'atlasgen[ray]', the driver's "
                             "version) and enough memory; see the logs in /tmp/ray/session_latest/logs on the "
                             "nodes; the same command resumes (finished units are kept)") from None

    def _kill_workers(self) -> None:
        if self._workers:
            import ray
            for w in self._workers:
                try:
                    ray.kill(w)
                except Exception:  # already dead
                    pass
        self._workers = []
        self._workers_use_gpu = None

    def close(self) -> None:
        if not self._connected:
            return
        self._kill_workers()
        if self._started_ray:
            import ray
            ray.shutdown()
        self._connected = False


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A HOST:PORT that nobody answers on is one clear line now (ray.init would retry for minutes)."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise AtlasError(f"no Ray cluster answers at {address}: {e.strerror if isinstance(e, OSError) and e.strerror else e}",
                         "start one with `ray start --head` (it prints the address to join), check "
                         "--ray-address / [run] ray_address, or omit it to start a local Ray") from None


class _UnitWorker:
    """A Ray actor (wrapped with ray.remote in RayExecutor.workers): builds its state from a payload on the
    first unit that brings it, keeps it for the next units."""

    def __init__(self, n_threads: int):
        torch.set_num_threads(n_threads)
        self._payload_key: str | None = None
        self._state = None

    def hardware(self, device: str) -> UnitHardware:
        return hardware_of(device)

    def pid(self) -> int:
        return os.getpid()

    def cpu_seconds(self) -> float:
        return time.process_time()

    def run(self, setup, payload_box: list, fn, unit):
        import ray
        ref = payload_box[0]
        if self._payload_key != ref.hex():
            self._state = None  # free the previous stage's model before building the next
            self._state = setup(ray.get(ref))
            self._payload_key = ref.hex()
        return fn(self._state, unit, None)


def make_executor(cfg: RunConfig):
    """The executor [run] asks for (Ray is only connected when a stage first needs it)."""
    if cfg.executor == "local":
        return LocalExecutor()
    assert cfg.executor == "ray", f"unknown executor {cfg.executor!r}"
    return RayExecutor(cfg)
