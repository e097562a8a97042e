"""The compile queue's decisions, driven ticket by ticket with no cluster and no clock."""

from kolm_ray.admission import Demand, Grant, Node, QueuePolicy, Ticket, expired, fair_order, grant_for, plan

POLICY = QueuePolicy()


def ticket(tid: str, tenant: str = "a", at: float = 0.0, workers: int = 1, cpus: float = 1.0, gpus: float = 0.0,
           state: str = "waiting", grant: Grant | None = None, beat: float = 0.0) -> Ticket:
    return Ticket(id=tid, tenant=tenant, name=tid, submitted_at=at, state=state, grant=grant, heartbeat_at=beat,
                  demand=Demand(workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus))


def running(tid: str, tenant: str, node: str = "n1", cpus: float = 1.0, workers: int = 1) -> Ticket:
    return ticket(tid, tenant, state="running", workers=workers, cpus=cpus,
                  grant=Grant(cpus_per_worker=cpus, nodes={node: workers}))


def test_fair_order_alternates_tenants_instead_of_first_come():
    waiting = [ticket("a1", "a", 1), ticket("a2", "a", 2), ticket("a3", "a", 3), ticket("b1", "b", 4), ticket("b2", "b", 5)]
    assert [t.id for t in fair_order(waiting, [])] == ["a1", "b1", "a2", "b2", "a3"]


def test_between_tenants_with_none_running_the_one_served_least_goes_first():
    # acme's backlog arrived first, but acme has just had a compile; cara has had none.
    waiting = [ticket("a1", "acme", 1), ticket("c1", "cara", 2)]
    assert [t.id for t in fair_order(waiting, [], served={"acme": 1})] == ["c1", "a1"]
    assert [t.id for t in fair_order(waiting, [])] == ["a1", "c1"]


def test_fair_order_puts_the_tenant_with_fewer_running_first():
    waiting = [ticket("a1", "a", 1), ticket("b1", "b", 2)]
    assert [t.id for t in fair_order(waiting, [running("a0", "a")])] == ["b1", "a1"]


def test_three_compiles_on_a_two_cpu_node_run_two_and_queue_one():
    nodes = [Node("n1", 2.0)]
    p = plan([ticket("c1", at=1), ticket("c2", at=2), ticket("c3", at=3)], [], nodes, POLICY)
    assert [i for i, _ in p.admit] == ["c1", "c2"]
    assert all(g.cpus_per_worker == 1.0 and g.nodes == {"n1": 1} for _, g in p.admit)
    # When one ends its grant is free again and the third is admitted.
    p2 = plan([ticket("c3", at=3)], [running("c2", "a")], nodes, POLICY)
    assert [i for i, _ in p2.admit] == ["c3"]


def test_a_worker_never_asks_for_more_than_one_node_has():
    # Two nodes of one CPU: the cluster has 2 CPUs, but a 2-CPU worker fits on neither.
    nodes = [Node("head", 1.0), Node("worker", 1.0)]
    g = grant_for(Demand(workers=1, cpus_per_worker=2.0), {n.id: (n.cpu, n.gpu) for n in nodes}, POLICY)
    assert g is not None and g.cpus_per_worker == 1.0 and sum(g.nodes.values()) == 1
    two = grant_for(Demand(workers=2, cpus_per_worker=1.0), {"head": (1.0, 0.0), "worker": (1.0, 0.0)}, POLICY)
    assert two is not None and two.nodes == {"head": 1, "worker": 1}


def test_serving_holding_most_of_the_node_shrinks_the_grant_instead_of_hanging():
    # The README's pipeline: Serve holds 1.5 of the head's 2 CPUs; the compile gets the half left.
    p = plan([ticket("c1")], [], [Node("head", 0.5, total_cpu=2.0)], POLICY)
    assert [(i, g.cpus_per_worker) for i, g in p.admit] == [("c1", 0.5)]


def test_below_the_minimum_share_the_compile_waits():
    p = plan([ticket("c1")], [], [Node("head", 0.25, total_cpu=2.0)], POLICY)
    assert p.admit == [] and p.unplaced == [] and p.order == ["c1"]


def test_a_compile_that_fits_on_no_node_now_waits_for_nodes_without_blocking_others():
    # A GPU compile while the GPU nodes are scaled to zero: it says why it waits, asks the
    # autoscaler for its bundles, and the CPU compile behind it runs.
    p = plan([ticket("gpu", at=1, gpus=1.0), ticket("cpu", at=2)], [], [Node("n1", 8.0, 0.0)], POLICY)
    assert [i for i, _ in p.admit] == ["cpu"]
    assert p.unplaced and p.unplaced[0][0] == "gpu" and "waiting for nodes" in p.unplaced[0][1]
    assert p.wanted == [{"CPU": 1.0, "GPU": 1.0}]


def test_the_first_compile_waiting_for_free_resources_is_asked_of_the_autoscaler():
    p = plan([ticket("c1", workers=2)], [running("r", "x", cpus=1.5)], [Node("n1", 2.0)], POLICY)
    assert p.admit == [] and p.wanted == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_an_even_split_is_rounded_down_so_it_fits():
    g = grant_for(Demand(workers=3, cpus_per_worker=1.0), {"n1": (2.0, 0.0)}, POLICY)
    assert g is not None and g.cpus_per_worker == 0.6666 and g.nodes == {"n1": 3}


def test_the_tenant_limit_passes_over_a_tenant_without_blocking_others():
    policy = QueuePolicy(per_tenant=1)
    waiting = [ticket("a2", "a", 1), ticket("b1", "b", 2)]
    p = plan(waiting, [running("a1", "a")], [Node("n1", 4.0)], policy)
    assert [i for i, _ in p.admit] == ["b1"]
    assert plan(waiting, [running("a1", "a")], [Node("n1", 4.0)],
                QueuePolicy(per_tenant=1, tenant_limits={"a": 2})).admit[0][0] in {"a2", "b1"}


def test_a_large_compile_at_the_head_is_not_starved_by_smaller_ones_behind_it():
    nodes = [Node("n1", 4.0)]
    waiting = [ticket("big", "a", 1, workers=4), ticket("small", "b", 2)]
    p = plan(waiting, [running("r", "c", cpus=2.5)], nodes, POLICY)
    # 1.5 CPUs free: "big" does not fit even at the minimum share, and "small" may not jump it.
    assert p.admit == []
    assert p.order == ["big", "small"]


def test_max_running_caps_the_cluster():
    p = plan([ticket("c1", at=1), ticket("c2", at=2)], [], [Node("n1", 8.0)], QueuePolicy(max_running=1))
    assert [i for i, _ in p.admit] == ["c1"]


def test_a_ticket_without_heartbeats_expires_by_its_own_lease():
    tickets = [ticket("alive", beat=100.0), ticket("dead", beat=10.0), ticket("done", beat=0.0, state="done"),
               ticket("long", beat=10.0).model_copy(update={"lease_s": 600.0})]
    assert expired(tickets, now=120.0) == ["dead"]


def test_a_paused_queue_admits_nothing_but_keeps_the_order():
    waiting = [ticket("a1", "a", 1), ticket("a2", "a", 2), ticket("b1", "b", 3)]
    p = plan(waiting, [], [Node("n1", 8.0)], QueuePolicy(paused=True))
    assert p.admit == [] and p.order == ["a1", "b1", "a2"]


def test_a_ticket_whose_driver_the_cluster_lists_as_ended_is_dropped_at_once():
    t = ticket("mine", beat=100.0).model_copy(update={"job_id": "01000000", "driver_pid": 42})
    assert expired([t], now=101.0, alive={("01000000", 42)}) == []
    # A new local cluster reuses job id 01000000 for another driver: the old ticket is gone.
    assert expired([t], now=101.0, alive={("01000000", 7)}) == ["mine"]
    assert expired([t], now=101.0, alive=None) == []  # job table unknown: heartbeats decide


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class _FakeQueue:
    """The queue actor's driver-facing methods, answering with ``state``."""

    def __init__(self, state: str):
        self.state = state
        self.calls: list[str] = []
        self.heartbeat = _Remote(lambda *a: self.calls.append("heartbeat") or {"state": self.state, "grant": None})
        self.finish = _Remote(lambda *a: self.calls.append("finish"))
        self.cancel = _Remote(lambda *a: self.calls.append("cancel"))


def _driver_side(monkeypatch, state: str):
    import ray

    from kolm_ray import admission

    interrupts: list[int] = []
    monkeypatch.setattr(ray, "get", lambda x, timeout=None: x)
    monkeypatch.setattr(admission._thread, "interrupt_main", lambda: interrupts.append(1))
    queue = _FakeQueue(state)
    return admission.Admission(queue, {"id": "t1", "lease_s": 3.0}), queue, interrupts


def test_a_cancel_seen_after_the_fit_stops_the_compile_before_it_signs(monkeypatch):
    """Ray Train's SIGINT handler may swallow the interrupt once the fit is over: the next stage
    boundary still stops the compile, so nothing is signed after a cancel."""
    import pytest

    from kolm_ray.admission import CompileCancelled

    adm, _, interrupts = _driver_side(monkeypatch, "cancelled")
    adm.start_heartbeats()
    assert adm.cancelled.wait(timeout=30)
    with pytest.raises(CompileCancelled):
        adm.stage("sign")
    assert interrupts == [1]


def test_a_compile_that_ended_is_never_interrupted_by_a_late_heartbeat(monkeypatch):
    adm, queue, interrupts = _driver_side(monkeypatch, "running")
    adm.start_heartbeats()
    adm.close("done")  # stops and joins the heartbeat thread before telling the queue
    queue.state = "done"
    import time

    time.sleep(1.5)  # three heartbeat periods: none may come
    assert interrupts == [] and not adm.cancelled.is_set() and queue.calls[-1] == "finish"
