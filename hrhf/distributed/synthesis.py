"""Synthesis on Ray: a pool of SegInversion actors, one shard of targets per task.

Finished shards go to a ``ShardStore`` (local directory or object store, resumable) or come back
through Ray's object store. On resume every shard of the step is verified against its marker and the
targets, and any shard that is missing, damaged or stale is recomputed; a finished step is recorded in
the store's per-step manifest and read back through it. A shard whose actor dies is retried, by Ray on
the restarted actor and then here on a fresh one; a NaN in inversion fails the step at once.
"""

from __future__ import annotations

import collections
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray
import ray.data
import torch
from ray.exceptions import RayActorError  # base of ActorDiedError and ActorUnavailableError
from ray.exceptions import RayTaskError
from torch import nn

from hrhf.config import Config, InversionConfig
from hrhf.distributed import peak_rss_mb
from hrhf.distributed.devices import compute_device
from hrhf.inversion import NonFiniteError, SegInversion, SyntheticSet, Target
from hrhf.models import ModelSpec
from hrhf.progress import as_progress
from hrhf.shards import NO_MARKER, ShardStore, StoredSynthetic, from_table, gallery_rows, make_shards, to_table
from hrhf.storage import write_bytes_atomic

# A directory of files named by shard id, each holding how many more times a worker should exit
# when it starts that shard: fault injection for recovery tests.
FAULT_DIR_ENV = "HRHF_SYNTHESIS_FAULTS"

Shard = tuple[str, list[Target]]


def model_id(model: nn.Module) -> str:
    """First 12 hex digits of the sha256 of a model's state dict (names and tensor bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def _inject_fault(shard_id: str) -> None:
    directory = os.environ.get(FAULT_DIR_ENV)
    path = os.path.join(directory, shard_id) if directory else None
    if path is None or not os.path.exists(path):
        return
    with open(path) as f:
        remaining = int(f.read().strip() or 0)
    if remaining > 0:
        write_bytes_atomic(path, str(remaining - 1).encode())
        os._exit(1)


@ray.remote
class SynthesisActor:
    """Holds a SegInversion of the current teacher and inverts one shard of targets per call."""

    def __init__(self, cfg: InversionConfig, image_size: int, use_gpu: bool, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        self.cfg, self.image_size, self.use_gpu = cfg, image_size, use_gpu
        self.model_id: str | None = None
        self.inverter: SegInversion | None = None

    def _inverter_of(self, teacher: list[ray.ObjectRef], model_id: str, shard_id: str) -> SegInversion:
        """The inverter of the teacher ``model_id``, built from its spec on first use."""
        if self.model_id != model_id:
            # The spec travels with each call, not the constructor: Ray pins a restartable actor's
            # constructor arguments in the object store and logs an error about them on every job.
            (spec,) = ray.get(teacher)
            try:
                model = spec.build()
            except Exception as err:  # a new actor would fail the same way: say which shard, do not retry
                raise RuntimeError(f"shard {shard_id}: cannot rebuild the teacher {model_id}: {err}") from err
            self.inverter = SegInversion(model, self.cfg, self.image_size, compute_device(self.use_gpu, "synthesis"))
            self.model_id = model_id
        return self.inverter

    @ray.method(num_returns=2)
    def run_shard(
        self,
        shard_id: str,
        targets: list[Target],
        step: int,
        teacher: list[ray.ObjectRef],
        model_id: str,
        store_uri: str | None = None,
        storage_options: dict | None = None,
    ) -> tuple[dict[str, Any], pa.Table | None]:
        """Invert the targets with the teacher (its ModelSpec ref, in a list so that Ray does not fetch it
        on every call): a summary with their metadata, and their table (None when written as a shard)."""
        _inject_fault(shard_id)
        synthetic = self._inverter_of(teacher, model_id, shard_id).invert(targets)
        table = to_table(synthetic, model_id, step, shard_id)
        summary = {"shard_id": shard_id, "meta": synthetic.meta, "peak_rss_mb": peak_rss_mb()}
        if store_uri is None:
            return summary, table
        ShardStore(store_uri, storage_options).write_shard(shard_id, table)
        return summary, None


def check_seeds(synthetic: SyntheticSet, seeds: list[int]) -> None:
    """Raise unless the set holds exactly one image per target seed, in target order."""
    got = [m["seed"] for m in synthetic.meta]
    if got == seeds:
        return
    counts = collections.Counter(got)
    missing = [s for s in seeds if counts[s] == 0]
    repeated = sorted(s for s, n in counts.items() if n > 1)
    unknown = sorted(set(got) - set(seeds))
    problem = f"missing seeds {missing[:5]}, repeated {repeated[:5]}, unknown {unknown[:5]}"
    if not (missing or repeated or unknown):
        problem = "seeds out of target order"
    raise RuntimeError(f"synthesis returned {len(got)} images for {len(seeds)} targets: {problem}")


class ObjectStoreSynthetic:
    """Synthetic images held in Ray's object store, one Arrow table per shard; the driver keeps references and metadata."""

    def __init__(self, shards: list[tuple[dict[str, Any], ray.ObjectRef]]) -> None:
        self.table_refs = [table_ref for _, table_ref in shards]
        self.shard_meta = [summary["meta"] for summary, _ in shards]
        self.meta = [entry for meta in self.shard_meta for entry in meta]

    def __len__(self) -> int:
        return len(self.meta)

    def read_all(self) -> SyntheticSet:
        """Every image, fetched to this process (tests and tools; workers stream instead)."""
        return SyntheticSet.concat([from_table(table) for table in ray.get(self.table_refs)])

    def gallery_sample(self) -> SyntheticSet:
        """The first image of each (class, scale), fetched from the tables that hold them."""
        return SyntheticSet.concat([from_table(ray.get(self.table_refs[shard]).take(rows))
                                    for shard, rows in gallery_rows(self.shard_meta)])


class RaySynthesizer:
    """Synthesizer that spreads shards of targets over a pool of Ray actors."""

    def __init__(
        self,
        cfg: Config,
        num_actors: int = 2,
        cpus_per_actor: float = 1.0,
        use_gpu: bool = False,
        store_uri: str | None = None,
        storage_options: dict | None = None,
        shard_size: int = 16,
        log: Callable[[str], None] = print,
        max_retries: int = 3,
    ) -> None:
        if num_actors < 1:
            raise ValueError(f"num_actors must be at least 1, got {num_actors}")
        self.cfg = cfg
        self.num_actors = num_actors
        self.cpus_per_actor = cpus_per_actor
        self.use_gpu = use_gpu
        self.store_uri = store_uri
        self.storage_options = storage_options
        self.shard_size = shard_size
        self.log = as_progress(log)
        self.max_retries = max_retries
        self.actor_peak_rss_mb = 0.0  # largest peak resident memory an actor reported (Parquet sink only)
        self.store = ShardStore(store_uri, storage_options) if store_uri else None
        if self.store is not None:
            self.store.check_access()  # fail before any work, not after the first step has trained

    def synthesize(self, teacher: nn.Module, targets: list[Target], step: int) -> StoredSynthetic | ObjectStoreSynthetic:
        """Invert every target on the actor pool; a handle on the images, in target order (the driver holds no image)."""
        seeds = [t.seed for t in targets]
        if len(set(seeds)) != len(seeds):
            raise ValueError("target seeds must be unique: a seed identifies a synthetic image")
        shards = make_shards(targets, self.shard_size, step)
        teacher_id = model_id(teacher)
        todo = self._unfinished(shards, teacher_id, step)
        if self.store is not None and todo:
            self.store.remove_step_manifest(step)  # it would name shards that are about to be rewritten
        results = self._run(teacher, todo, step, teacher_id, finished=len(shards) - len(todo), total=len(shards))
        if self.store is not None:
            # read_shard checks each shard against its marker's checksum, check_seeds the seeds
            self.store.write_step_manifest(step, [shard_id for shard_id, _ in shards])
            synthetic = StoredSynthetic(self.store, step)
        else:
            synthetic = ObjectStoreSynthetic([results[shard_id] for shard_id, _ in shards])
        check_seeds(synthetic, seeds)
        return synthetic

    def _unfinished(self, shards: list[Shard], teacher_id: str, step: int) -> list[Shard]:
        """The shards not in the store as sound, committed shards of this teacher and these targets."""
        if self.store is None:
            return shards
        todo = []
        for shard_id, shard_targets in shards:
            reason = self.store.verify(shard_id, [t.seed for t in shard_targets], teacher_id)
            if reason is None:
                continue
            if reason != NO_MARKER:
                self.log.event("synthesis", step, f"shard {shard_id} in {self.store.uri} cannot be reused "
                               f"({reason}); redoing it", level="warning")
            todo.append((shard_id, shard_targets))
        found = len(shards) - len(todo)
        if found:
            self.log.event("synthesis", step, f"{found}/{len(shards)} shards found in {self.store.uri}, not recomputed")
        return todo

    def _run(
        self, teacher: nn.Module, todo: list[Shard], step: int, teacher_id: str, finished: int, total: int
    ) -> dict[str, Any]:
        if not todo:
            return {}
        spec = ray.put(ModelSpec.of(teacher, self.cfg.model.name, self.cfg.model.width))
        options = dict(
            num_cpus=self.cpus_per_actor, num_gpus=1 if self.use_gpu else 0, max_restarts=2, max_task_retries=2
        )

        def new_actor() -> ray.actor.ActorHandle:
            return SynthesisActor.options(**options).remote(
                self.cfg.inversion, self.cfg.data.image_size, self.use_gpu, max(1, int(self.cpus_per_actor))
            )

        actors = [new_actor() for _ in range(min(self.num_actors, len(todo)))]
        idle = list(actors)
        pending = collections.deque(todo)
        running: dict[ray.ObjectRef, tuple[ray.actor.ActorHandle, str, list[Target]]] = {}
        failures: collections.Counter[str] = collections.Counter()
        results: dict[str, tuple[dict[str, Any], ray.ObjectRef]] = {}
        tables: dict[str, ray.ObjectRef] = {}
        images, start = 0, time.perf_counter()
        self.log.event("synthesis", step, done=finished, total=total, unit="shards", actors=len(actors))
        try:
            while pending or running:
                while idle and pending:
                    actor = idle.pop()
                    shard_id, shard_targets = pending.popleft()
                    ref, table_ref = actor.run_shard.remote(
                        shard_id, shard_targets, step, [spec], teacher_id, self.store_uri, self.storage_options
                    )
                    running[ref] = (actor, shard_id, shard_targets)
                    tables[shard_id] = table_ref
                [ref], _ = ray.wait(list(running), num_returns=1)
                actor, shard_id, shard_targets = running.pop(ref)
                try:
                    results[shard_id] = (ray.get(ref), tables.pop(shard_id))
                except RayTaskError as err:
                    if isinstance(err.cause, NonFiniteError):  # deterministic: a retry would fail the same way
                        message = f"[step {step}] synthesis of shard {shard_id} failed: {err.cause}"
                        raise NonFiniteError(message) from err
                    raise
                except RayActorError as err:
                    failures[shard_id] += 1
                    if err.actor_init_failed or failures[shard_id] > self.max_retries:
                        raise RuntimeError(f"[step {step}] synthesis of shard {shard_id} failed: {err}") from err
                    self.log.event("synthesis", step, f"shard {shard_id} lost its actor ({type(err).__name__}); "
                                   f"retry {failures[shard_id]}/{self.max_retries} on a new actor", level="warning")
                    ray.kill(actor)
                    actors.remove(actor)
                    replacement = new_actor()
                    actors.append(replacement)
                    idle.insert(0, replacement)  # a live idle actor, if any, takes the retried shard first
                    pending.appendleft((shard_id, shard_targets))
                    continue
                idle.append(actor)
                self.actor_peak_rss_mb = max(self.actor_peak_rss_mb, results[shard_id][0]["peak_rss_mb"])
                images += len(shard_targets)
                rate = images / max(time.perf_counter() - start, 1e-9)
                done = finished + len(results)
                self.log.event("synthesis", step, done=done, total=total, unit="shards", images=images,
                               images_per_s=round(rate, 2))
        finally:
            # Live actors hold their CPUs, and Ray Data waits forever for CPUs that never free up.
            for actor in actors:
                ray.kill(actor)
        return results
