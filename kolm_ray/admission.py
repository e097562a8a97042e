"""Compile admission: one queue of compiles per cluster and kolm home, fair across tenants.

Ray has no job queue: a job whose resources never come stays PENDING and fails after a while,
and compiles that each start a Ray Data pipeline and a Ray Train fit on a small cluster starve
each other. So every compile first takes a ticket from the ``CompileQueue`` actor (named,
detached, no CPU; its state kept in ``<state dir>/queue/state.json`` so a restarted actor
picks it up) and waits, holding nothing, until the queue admits it. A ticket carries the
compile's peak demand (its fit workers, which its eval reuses; the teacher stage's actors hold
no CPU), and the queue admits only what fits, node by node, in what the cluster's nodes have
minus what non-compile work (Serve replicas, other jobs) holds and minus the grants of the
compiles already running. The grant says how many CPUs each fit or eval worker takes, so no
request of an admitted compile is ever larger than one node can give.

The decisions are pure functions (``fair_order``, ``grant_for``, ``plan``, ``expired``) of
the tickets and the nodes; the actor keeps the state, measures the cluster and calls ``plan``
once per tick. A running compile heartbeats (stage, progress, teacher spend); a ticket whose
heartbeats stop for ``lease_s`` is dropped and its grant freed, so a killed driver never keeps
its place. ``kolm cancel`` marks a ticket cancelled; its driver learns it at the next heartbeat
and stops, which frees everything the compile's job held.

Must not run compile stages, nor hold cluster resources itself.
"""

from __future__ import annotations

import _thread
import asyncio
import getpass
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from kolm_ray.durable import write_atomic
from kolm_ray.errors import InputError, KolmRuntimeError

NAMESPACE = "kolm"
STATE_FORMAT_VERSION = 1
log = logging.getLogger(__name__)

State = Literal["waiting", "running", "done", "failed", "cancelled", "lost", "rejected"]
ACTIVE: frozenset[str] = frozenset({"waiting", "running"})


class CompileCancelled(KolmRuntimeError):
    """The compile was cancelled (``kolm cancel``) or its ticket was dropped by the queue."""


# ----- configs and records -------------------------------------------------------------------


class QueuePolicy(BaseModel):
    """The operator's admission rules (``kolm queue limits``), kept beside the queue's state."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_running: int | None = Field(None, ge=1, description="Compiles running at once on the cluster (default: as many as fit).")
    per_tenant: int | None = Field(None, ge=1, description="Compiles one tenant may run at once (default: no limit).")
    tenant_limits: dict[str, int] = Field(default_factory=dict, description="Per-tenant overrides of per_tenant.")
    # Below half a core a CPU worker's torch gets no thread of its own; wait for more instead.
    min_cpus_per_worker: float = Field(0.5, gt=0, description="Smallest CPU share a fit or eval worker is granted.")
    # One missed heartbeat (every lease_s / 6 s) is normal under load; six in a row is a dead driver.
    lease_s: float = Field(60.0, gt=0, description="Seconds without a heartbeat before a ticket is dropped.")
    paused: bool = Field(False, description="Admit nothing new (running compiles go on): to drain the cluster.")

    def tenant_limit(self, tenant: str) -> int | None:
        return self.tenant_limits.get(tenant, self.per_tenant)


class Demand(BaseModel):
    """What a compile will hold at its peak: its fit's workers (the eval reuses their shape)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    workers: int = Field(1, ge=1, description="Fit (and eval) workers.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker asks for (granted less if a node has less free).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each worker takes.")


class Grant(BaseModel):
    """What the queue reserved for a running compile: per-worker resources and where they fit."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    cpus_per_worker: float
    gpus_per_worker: float = 0.0
    nodes: dict[str, int] = Field(default_factory=dict, description="Workers placed per node id.")


class Ticket(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    tenant: str
    name: str
    demand: Demand
    submitted_at: float
    state: State = "waiting"
    grant: Grant | None = None
    admitted_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float = 0.0
    stage: str = "queued"
    done: int = 0
    total: int = 0
    spend_usd: float = 0.0
    job_id: str | None = None
    driver_pid: int | None = None
    lease_s: float = 60.0  # the policy's at submission: a later change does not drop running compiles
    message: str | None = None


@dataclass(frozen=True)
class Node:
    """One alive node as the queue sees it: what compiles may use there (total minus what
    non-compile work holds)."""

    id: str
    cpu: float
    gpu: float = 0.0
    total_cpu: float | None = None  # the node's size (default: ``cpu``); a compile that fits no
    total_gpu: float | None = None  # node's size is rejected, one that fits no free share waits

    @property
    def size(self) -> tuple[float, float]:
        return (self.cpu if self.total_cpu is None else self.total_cpu,
                self.gpu if self.total_gpu is None else self.total_gpu)


@dataclass(frozen=True)
class Plan:
    admit: list[tuple[str, Grant]]
    # Tickets that fit on no node as the cluster is now (a GPU compile while the GPU nodes are
    # scaled to zero): they wait for nodes without blocking the others, and say why.
    unplaced: list[tuple[str, str]]
    order: list[str]  # waiting tickets in the order they will be admitted
    # Resource bundles worth asking the autoscaler for: the unplaced tickets' and those of the
    # first ticket that waits for free resources.
    wanted: list[dict[str, float]]


# ----- the decisions -------------------------------------------------------------------------


def fair_order(waiting: Sequence[Ticket], running: Sequence[Ticket], served: Mapping[str, int] | None = None) -> list[Ticket]:
    """Waiting tickets in admission order: round-robin over tenants, the tenant with the fewest
    compiles running (counting those placed ahead in this order) first; ties to the tenant
    served least lately (``served``: compiles admitted in the queue's memory, a day), then to
    the one whose oldest waiting ticket is oldest; within a tenant, first come first served."""
    queues: dict[str, list[Ticket]] = {}
    for t in sorted(waiting, key=lambda t: (t.submitted_at, t.id)):
        queues.setdefault(t.tenant, []).append(t)
    load = {tenant: sum(1 for r in running if r.tenant == tenant) for tenant in queues}
    given = {tenant: (served or {}).get(tenant, 0) for tenant in queues}
    out: list[Ticket] = []
    while queues:
        tenant = min(queues, key=lambda x: (load[x], given[x], queues[x][0].submitted_at, queues[x][0].id))
        out.append(queues[tenant].pop(0))
        load[tenant] += 1
        given[tenant] += 1
        if not queues[tenant]:
            del queues[tenant]
    return out


def served_counts(tickets: Iterable[Ticket]) -> dict[str, int]:
    """Compiles admitted per tenant among ``tickets`` (running, and ended in the last day)."""
    out: dict[str, int] = {}
    for t in tickets:
        if t.admitted_at is not None:
            out[t.tenant] = out.get(t.tenant, 0) + 1
    return out


def _pack(cpu: float, gpu: float, count: int, free: dict[str, tuple[float, float]]) -> dict[str, int] | None:
    """Place ``count`` bundles of (cpu, gpu) on nodes, fullest-fitting node first (packing keeps
    whole nodes free for larger compiles). None when they do not all fit."""
    left = dict(free)
    placed: dict[str, int] = {}
    eps = 1e-9
    for _ in range(count):
        fits = [n for n, (c, g) in left.items() if c + eps >= cpu and g + eps >= gpu]
        if not fits:
            return None
        n = min(fits, key=lambda n: (left[n][0] - cpu, n))
        placed[n] = placed.get(n, 0) + 1
        left[n] = (left[n][0] - cpu, left[n][1] - gpu)
    return placed


def grant_for(demand: Demand, free: dict[str, tuple[float, float]], policy: QueuePolicy) -> Grant | None:
    """The largest per-worker CPU share, at most what the compile asks for and at least the
    policy's minimum, at which all its workers fit on the nodes' free resources. None: not now."""
    ask = demand.cpus_per_worker
    floor = min(policy.min_cpus_per_worker, ask)
    candidates = {ask}
    for c, _ in free.values():  # a node's whole free share, or an even split of it
        for m in range(1, demand.workers + 1):
            share = math.floor(c / m * 1e4) / 1e4  # down: a share rounded up would not fit
            if floor <= share <= ask:
                candidates.add(share)
    for share in sorted(candidates, reverse=True):
        placed = _pack(share, demand.gpus_per_worker, demand.workers, free)
        if placed is not None:
            return Grant(cpus_per_worker=share, gpus_per_worker=demand.gpus_per_worker, nodes=placed)
    return None


def _free(nodes: Sequence[Node], running: Sequence[Ticket]) -> dict[str, tuple[float, float]]:
    free = {n.id: (n.cpu, n.gpu) for n in nodes}
    for t in running:
        if t.grant is None:
            continue
        for node, count in t.grant.nodes.items():
            if node in free:
                c, g = free[node]
                free[node] = (c - count * t.grant.cpus_per_worker, g - count * t.grant.gpus_per_worker)
    return free


def _bundles(d: Demand) -> list[dict[str, float]]:
    one = {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.gpus_per_worker else {})}
    return [dict(one) for _ in range(d.workers)]


def plan(waiting: Sequence[Ticket], running: Sequence[Ticket], nodes: Sequence[Node], policy: QueuePolicy,
         served: Mapping[str, int] | None = None) -> Plan:
    """Which waiting tickets start now, and with what grant.

    In ``fair_order``; a tenant at its limit is passed over (its tickets block no one else);
    the first ticket that does not fit stops admission, so a large compile is not starved by
    smaller ones behind it. A ticket that fits on no node as the cluster is now waits for nodes
    (an autoscaler may add them) without blocking the others.
    """
    order = fair_order(waiting, running, served)
    admitted: list[tuple[str, Grant]] = []
    unplaced: list[tuple[str, str]] = []
    wanted: list[dict[str, float]] = []
    active = list(running)
    empty = {n.id: n.size for n in nodes}
    blocked = False
    for t in order:
        if grant_for(t.demand, empty, policy) is None:
            d = t.demand
            cpu, gpu = max((n.size for n in nodes), default=(0.0, 0.0))
            unplaced.append((t.id, f"waiting for nodes: {d.workers} worker(s) of {d.cpus_per_worker:g} CPU / "
                                   f"{d.gpus_per_worker:g} GPU fit on no set of the cluster's nodes now (largest: "
                                   f"{cpu:g} CPU, {gpu:g} GPU); cancel it or add nodes"))
            wanted += _bundles(t.demand)
            continue
        if blocked or policy.paused:
            continue
        if policy.max_running is not None and len(active) >= policy.max_running:
            break
        limit = policy.tenant_limit(t.tenant)
        if limit is not None and sum(1 for r in active if r.tenant == t.tenant) >= limit:
            continue
        grant = grant_for(t.demand, _free(nodes, active), policy)
        if grant is None:
            blocked = True
            wanted += _bundles(t.demand)
            continue
        admitted.append((t.id, grant))
        active.append(t.model_copy(update={"state": "running", "grant": grant}))
    return Plan(admit=admitted, unplaced=unplaced, order=[t.id for t in order], wanted=wanted)


def expired(tickets: Sequence[Ticket], now: float, alive: set[tuple[str, int]] | None = None) -> list[str]:
    """Active tickets whose driver has not been heard from for the ticket's ``lease_s``, or
    whose driver's job the cluster lists as ended (``alive``: (job id, driver pid) of live
    jobs, when known; the pid tells a new local cluster's job 01000000 from an old one's)."""
    out = []
    for t in tickets:
        if t.state not in ACTIVE:
            continue
        gone = alive is not None and t.job_id is not None and t.driver_pid is not None \
            and (t.job_id, t.driver_pid) not in alive
        if gone or now - t.heartbeat_at > t.lease_s:
            out.append(t.id)
    return out


def live_drivers() -> set[tuple[str, int]] | None:
    """(job id, driver pid) of every job the cluster has not marked dead; None if unknown."""
    try:  # the GCS job table; no public API lists drivers without the dashboard
        from ray._private.state import jobs

        return {(j["JobID"], int(j["DriverPid"])) for j in jobs() if not j.get("IsDead")}
    except Exception as e:  # noqa: BLE001 - fall back to heartbeats alone
        log.debug("job table unavailable: %s", e)
        return None


# ----- the cluster as the queue sees it ------------------------------------------------------


def measure_nodes(compile_jobs: set[str]) -> list[Node]:
    """Alive nodes, each with its CPUs and GPUs minus what non-compile work holds there: alive
    actors outside placement groups and placement-group bundles, of every job that is not a
    running compile (Serve replicas, other drivers). Without the state API (a local instance
    started without its dashboard) nothing is subtracted."""
    import ray

    nodes = {n["NodeID"]: [float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0))]
             for n in ray.nodes() if n.get("Alive")}
    sizes = {i: (c, g) for i, (c, g) in nodes.items()}
    try:
        from ray.util.state import list_actors, list_placement_groups

        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000, raise_on_missing_output=False)
        groups = list_placement_groups(detail=True, limit=10_000, raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - no dashboard: the state API is not there
        log.debug("state API unavailable (%s): counting whole nodes", e)
        return [Node(i, c, g) for i, (c, g) in nodes.items()]
    for a in actors:
        # Serve's replicas are created by its controller, under the job that first started
        # Serve: a compile's driver may be that job, and they still are not the compile's.
        ours = a.job_id in compile_jobs and a.ray_namespace != "serve"
        if ours or a.placement_group_id or a.node_id not in nodes:
            continue
        req = a.required_resources or {}
        nodes[a.node_id][0] -= float(req.get("CPU", 0))
        nodes[a.node_id][1] -= float(req.get("GPU", 0))
    for pg in groups:
        if pg.state != "CREATED" or pg.creator_job_id in compile_jobs:
            continue
        for b in pg.bundles or []:
            node = b.get("node_id")
            if node in nodes:
                nodes[node][0] -= float(b.get("unit_resources", {}).get("CPU", 0))
                nodes[node][1] -= float(b.get("unit_resources", {}).get("GPU", 0))
    return [Node(i, max(0.0, c), max(0.0, g), total_cpu=sizes[i][0], total_gpu=sizes[i][1])
            for i, (c, g) in nodes.items()]


# ----- the actor -----------------------------------------------------------------------------


def _ask_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Tell an autoscaling cluster what waiting compiles need (an empty list withdraws it): the
    queue holds them back, so no pending Ray request would ask for nodes. A no-op without one."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as e:  # noqa: BLE001 - a cluster without an autoscaler: nothing to ask
        log.debug("request_resources: %s", e)


def load_policy(state_dir: Path) -> QueuePolicy:
    p = state_dir / "queue" / "policy.json"
    return QueuePolicy.model_validate_json(p.read_text()) if p.is_file() else QueuePolicy()


def save_policy(state_dir: Path, policy: QueuePolicy) -> None:
    write_atomic(state_dir / "queue" / "policy.json", policy.model_dump_json(indent=2))


class CompileQueueActor:
    """The queue's state and its tick; created through ``get_queue`` as a detached actor."""

    def __init__(self, state_dir: str, tick_s: float = 1.0, measure_every_s: float = 5.0):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "queue" / "state.json"
        self.tick_s = tick_s
        self.measure_every_s = measure_every_s
        self.tickets: dict[str, Ticket] = {}
        if self.path.is_file():  # a restarted actor resumes the queue
            data = json.loads(self.path.read_text())
            self.tickets = {t["id"]: Ticket.model_validate(t) for t in data.get("tickets", [])}
            now = time.time()
            for t in self.tickets.values():  # drivers get a lease's grace to find the new actor
                if t.state in ACTIVE:
                    t.heartbeat_at = max(t.heartbeat_at, now)
        self.nodes: list[Node] = []
        self.measured_at = 0.0
        self.wanted: list[dict[str, float]] = []  # what the autoscaler was last asked for
        self.changed: asyncio.Event | None = None  # created on the actor's event loop
        self.loop_task: asyncio.Task | None = None

    def _ensure_loop(self) -> None:
        if self.loop_task is None:
            self.changed = asyncio.Event()
            self.loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:  # noqa: BLE001 - one bad tick must not stop the queue; logged
                log.exception("queue tick failed")
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=self.tick_s)
            except asyncio.TimeoutError:
                pass
            self.changed.clear()

    async def _tick(self) -> None:
        policy = load_policy(self.state_dir)
        dirty = False
        active = [t for t in self.tickets.values() if t.state in ACTIVE]
        alive = await asyncio.to_thread(live_drivers) if active else None
        now = time.time()
        for tid in expired([t for t in self.tickets.values() if t.state in ACTIVE], now, alive):
            t = self.tickets[tid]
            t.state, t.finished_at, t.grant = "lost", now, None
            t.message = f"its driver (job {t.job_id}) ended or sent no heartbeat for {t.lease_s:g} s"
            dirty = True
        wanted: list[dict[str, float]] = []
        if any(t.state == "waiting" for t in self.tickets.values()):
            if time.time() - self.measured_at >= self.measure_every_s or not self.nodes:
                jobs = {t.job_id for t in self.tickets.values() if t.state == "running" and t.job_id}
                self.nodes = await asyncio.to_thread(measure_nodes, jobs)
                self.measured_at = time.time()
            # Read the tickets after the awaits: a cancel or finish may have come in meanwhile.
            waiting = [t for t in self.tickets.values() if t.state == "waiting"]
            running = [t for t in self.tickets.values() if t.state == "running"]
            p = plan(waiting, running, self.nodes, policy, served_counts(self.tickets.values()))
            now = time.time()
            for tid, grant in p.admit:
                t = self.tickets[tid]
                t.state, t.grant, t.admitted_at, t.stage, t.message = "running", grant, now, "admitted", None
                dirty = True
            unplaced = dict(p.unplaced)
            for t in waiting:
                if t.state == "waiting" and t.message != unplaced.get(t.id):
                    t.message = unplaced.get(t.id)
                    dirty = True
            if p.admit:
                self.measured_at = 0.0  # the next admission sees the new grants' actual use
            wanted = p.wanted
        if wanted != self.wanted:
            self.wanted = wanted
            await asyncio.to_thread(_ask_autoscaler, wanted)
        if dirty:
            self._save()

    def _save(self) -> None:
        # Finished tickets are kept for `kolm queue` for a day, then forgotten.
        cutoff = time.time() - 86_400
        self.tickets = {i: t for i, t in self.tickets.items() if t.state in ACTIVE or (t.finished_at or 0) > cutoff}
        write_atomic(self.path, json.dumps({"format_version": STATE_FORMAT_VERSION,
                                             "tickets": [t.model_dump(mode="json") for t in self.tickets.values()]}))

    def _poke(self) -> None:
        self._ensure_loop()
        self.changed.set()

    async def submit(self, tenant: str, name: str, demand: dict, job_id: str | None,
                     driver_pid: int | None = None) -> dict[str, Any]:
        """A new waiting ticket; returns its record (the driver keeps it to re-register)."""
        self._ensure_loop()
        tid = f"{name}-{uuid.uuid4().hex[:8]}"
        now = time.time()
        t = Ticket(id=tid, tenant=tenant, name=name, demand=Demand.model_validate(demand), submitted_at=now,
                   heartbeat_at=now, job_id=job_id, driver_pid=driver_pid, lease_s=load_policy(self.state_dir).lease_s)
        self.tickets[tid] = t
        self._save()
        self._poke()
        return t.model_dump(mode="json")

    async def adopt(self, record: dict[str, Any]) -> dict[str, Any]:
        """Take back a ticket this actor does not know (restarted without its state file) from
        its driver's copy: a running compile keeps running, with its grant."""
        self._ensure_loop()
        t = Ticket.model_validate(record)
        if t.id not in self.tickets and t.state in ACTIVE:
            t.heartbeat_at = time.time()
            self.tickets[t.id] = t
            self._save()
            self._poke()
        return self._view(self.tickets[t.id]) if t.id in self.tickets else {"state": "lost", "message": "ended"}

    async def heartbeat(self, tid: str, stage: str | None = None, done: int | None = None, total: int | None = None,
                        spend_usd: float | None = None) -> dict[str, Any]:
        """Keep the ticket alive; returns its state, position and grant (the driver's view)."""
        self._ensure_loop()
        t = self.tickets.get(tid)
        if t is None:
            return {"state": "unknown", "message": "the queue does not know this ticket"}
        if t.state in ACTIVE:
            t.heartbeat_at = time.time()
            if t.state == "running":
                t.stage = stage or t.stage
                t.done = t.done if done is None else done
                t.total = t.total if total is None else total
                t.spend_usd = t.spend_usd if spend_usd is None else spend_usd
        return self._view(t)

    def _order(self) -> list[Ticket]:
        return fair_order([x for x in self.tickets.values() if x.state == "waiting"],
                          [x for x in self.tickets.values() if x.state == "running"], served_counts(self.tickets.values()))

    def _view(self, t: Ticket) -> dict[str, Any]:
        waiting = self._order()
        pos = next((i + 1 for i, x in enumerate(waiting) if x.id == t.id), None)
        return {"state": t.state, "position": pos, "waiting": len(waiting),
                "running": sum(1 for x in self.tickets.values() if x.state == "running"),
                "grant": t.grant.model_dump() if t.grant else None, "message": t.message, "lease_s": t.lease_s}

    async def finish(self, tid: str, state: State, message: str | None = None) -> None:
        t = self.tickets.get(tid)
        if t is not None and t.state in ACTIVE:
            t.state, t.finished_at, t.message, t.grant = state, time.time(), message, None
            self._save()
            self._poke()

    async def cancel(self, tid: str) -> dict[str, Any]:
        t = self.tickets.get(tid)
        if t is None:
            return {"found": False}
        was = t.state
        if t.state in ACTIVE:
            t.state, t.finished_at, t.message, t.grant = "cancelled", time.time(), "cancelled by kolm cancel", None
            self._save()
            self._poke()
        return {"found": True, "was": was, "job_id": t.job_id}

    async def snapshot(self) -> list[dict[str, Any]]:
        self._ensure_loop()
        waiting = self._order()
        pos = {t.id: i + 1 for i, t in enumerate(waiting)}
        return [{**t.model_dump(mode="json"), "position": pos.get(t.id)} for t in self.tickets.values()]


def queue_name(state_dir: Path) -> str:
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return f"kolm-compile-queue-{digest}"


def get_queue(state_dir: Path):
    """This kolm home's queue on the connected cluster, created on first use."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(CompileQueueActor)
    return actor.options(name=queue_name(state_dir), namespace=NAMESPACE, lifetime="detached",
                         get_if_exists=True, max_concurrency=1000).remote(str(state_dir.resolve()))


def default_tenant() -> str:
    """The submitting user: ``KOLM_TENANT``, else the login name."""
    try:
        return os.environ.get("KOLM_TENANT") or getpass.getuser()
    except (KeyError, OSError):
        return "default"


def check_tenant(tenant: str) -> str:
    """Raises: InputError for a tenant name that is not a short identifier."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", tenant):
        raise InputError(f"invalid --tenant {tenant!r}: letters, digits and . _ @ - only, at most 64")
    return tenant


# ----- the driver's side ---------------------------------------------------------------------


class Admission:
    """A compile's place in the queue: waits to be admitted, then heartbeats its stage and
    progress until ``close``. A cancel seen at a heartbeat interrupts the compile's main thread
    (``KeyboardInterrupt`` there, or whatever the running stage makes of it), and the next
    ``stage`` or ``progress`` call raises ``CompileCancelled``, so nothing is signed after it."""

    def __init__(self, queue: Any, record: dict[str, Any]):
        self.queue = queue
        self.record = record  # the ticket as the queue gave it: to re-register after a restart
        self.ticket: str = record["id"]
        self.heartbeat_s = max(0.5, float(record.get("lease_s", 60.0)) / 6)
        self.grant: Grant | None = None
        self.stage_name = "admitted"
        self.done = 0
        self.total = 0
        self.spend_usd: float | None = None
        # Reads the teacher spend of a running stage (the quota's book for this compile).
        self.probe: Callable[[], float | None] | None = None
        self.cancelled = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a cancel is acted on only while the compile runs
        self._thread: threading.Thread | None = None

    def _check(self) -> None:
        if self.cancelled.is_set():
            raise CompileCancelled(f"compile {self.ticket} was cancelled; everything it held is freed. "
                                   "Re-running it resumes from its cached teacher answers and checkpoints.")

    def stage(self, name: str, total: int = 0) -> None:
        self._check()
        self.stage_name, self.done, self.total = name, 0, total

    def progress(self, n: int) -> None:
        self._check()
        self.done += n

    def spend(self, usd: float) -> None:
        self.spend_usd = usd

    def _beat(self) -> dict[str, Any]:
        import ray

        if self.probe is not None and self.stage_name == "teacher":
            try:
                self.spend_usd = self.probe() or self.spend_usd
            except Exception as e:  # noqa: BLE001 - spend so far is for display; the stage reports the total
                log.debug("spend probe failed: %s", e)
        view = ray.get(self.queue.heartbeat.remote(self.ticket, self.stage_name, self.done, self.total,
                                                   self.spend_usd), timeout=60)
        if view["state"] == "unknown":  # the actor restarted without its state: hand it the ticket back
            record = {**self.record, **({"state": "running", "grant": self.grant.model_dump()} if self.grant else {})}
            view = ray.get(self.queue.adopt.remote(record), timeout=60)
        return view

    def wait(self, say: Callable[[str], None], poll_s: float = 1.0) -> Grant:
        last = None
        while True:
            view = self._beat()
            if view["state"] == "running":
                self.grant = Grant.model_validate(view["grant"])
                return self.grant
            if view["state"] != "waiting":
                raise CompileCancelled(f"compile {self.ticket} {view['state']}: {view.get('message') or ''}".rstrip(": "))
            line = (f"queue       {self.ticket}: waiting, position {view['position']} of {view['waiting']} "
                    f"({view['running']} compile(s) running)" + (f"; {view['message']}" if view.get("message") else ""))
            if line != last:
                say(line)
                last = line
            time.sleep(poll_s)

    def start_heartbeats(self) -> None:
        def run() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    view = self._beat()
                except Exception as e:  # noqa: BLE001 - a slow GCS: the lease covers several misses
                    log.warning("queue heartbeat failed: %s", e)
                    continue
                if view["state"] == "running":
                    continue
                with self._lock:
                    if self._stop.is_set():  # the compile ended meanwhile: nothing to interrupt
                        return
                    self.cancelled.set()
                    _thread.interrupt_main()
                return

        self._thread = threading.Thread(target=run, name="kolm-queue-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeats(self) -> None:
        with self._lock:
            self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def close(self, state: State, message: str | None = None) -> None:
        import ray

        self.stop_heartbeats()
        if state == "cancelled":
            return  # the queue already holds the ticket as cancelled (or lost)
        try:
            ray.get(self.queue.finish.remote(self.ticket, state, message), timeout=60)
        except Exception as e:  # noqa: BLE001 - the lease frees the slot anyway
            log.warning("could not tell the queue the compile ended: %s", e)


class admitted:
    """``with admitted(state_dir, tenant, name, demand, say) as adm:`` — wait for admission,
    heartbeat while the body runs, tell the queue how it ended.

    Raises:
        CompileCancelled: the ticket was cancelled (while waiting or running), its driver was
            interrupted (Ctrl-C), or the queue dropped it.
    """

    def __init__(self, state_dir: Path, tenant: str, name: str, demand: Demand, say: Callable[[str], None]):
        import ray

        self.say = say
        self.queue = get_queue(state_dir)
        job = ray.get_runtime_context().get_job_id()
        record = ray.get(self.queue.submit.remote(tenant, name, demand.model_dump(), job, os.getpid()))
        self.adm = Admission(self.queue, record)

    def __enter__(self) -> Admission:
        try:
            grant = self.adm.wait(self.say)
        except CompileCancelled:
            raise
        except BaseException:  # Ctrl-C, or the queue unreachable: give the place back now
            give_back(self.adm)
            raise
        self.say(f"queue       {self.adm.ticket}: admitted · {grant.cpus_per_worker:g} CPU"
                 + (f", {grant.gpus_per_worker:g} GPU" if grant.gpus_per_worker else "") + " per worker")
        self.adm.start_heartbeats()
        return self.adm

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.adm.stop_heartbeats()
        if self.adm.cancelled.is_set():
            self.adm.close("cancelled")
            if exc_type is not None and not issubclass(exc_type, CompileCancelled):
                # The interrupt surfaced as KeyboardInterrupt, or as whatever the running stage
                # made of it (Ray Train's SIGINT handler aborts the fit and calls sys.exit).
                raise CompileCancelled(f"compile {self.adm.ticket} was cancelled; everything it held is freed. "
                                       "Re-running it resumes from its cached teacher answers and checkpoints.") from None
            return False
        if exc_type is None:
            self.adm.close("done")
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            give_back(self.adm)
            # Ray Train turns a Ctrl-C during the fit into SystemExit(0): not a success.
            raise CompileCancelled(f"compile {self.adm.ticket} was interrupted; re-running it resumes from its "
                                   "cached teacher answers and checkpoints.") from None
        else:
            self.adm.close("failed", f"{exc_type.__name__}: {exc}"[:500])
        return False


def give_back(adm: Admission) -> None:
    """Interrupted at the terminal (Ctrl-C): give the place back at once instead of at lease expiry."""
    import ray

    adm.stop_heartbeats()
    try:
        ray.get(adm.queue.cancel.remote(adm.ticket), timeout=10)
    except Exception:  # noqa: BLE001 - the lease (or the job table) frees it anyway
        pass


def list_tickets(state_dir: Path) -> list[dict[str, Any]]:
    import ray

    return ray.get(get_queue(state_dir).snapshot.remote())


def cancel(state_dir: Path, ticket: str) -> dict[str, Any]:
    """Cancel a waiting or running compile. Raises: InputError for an unknown ticket."""
    import ray

    res = ray.get(get_queue(state_dir).cancel.remote(ticket))
    if not res["found"]:
        raise InputError(f"no compile {ticket!r} in the queue (see `kolm queue`)")
    return res
