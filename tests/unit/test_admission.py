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
    assert p.admit == [] and p.reject == [] and p.order == ["c1"]


def test_a_compile_that_fits_on_no_node_is_rejected_not_left_waiting():
    p = plan([ticket("big", gpus=1.0)], [], [Node("n1", 8.0, 0.0)], POLICY)
    assert p.admit == [] and p.reject and p.reject[0][0] == "big" and "GPU" in p.reject[0][1]


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


def test_a_ticket_without_heartbeats_expires():
    tickets = [ticket("alive", beat=100.0), ticket("dead", beat=10.0), ticket("done", beat=0.0, state="done")]
    assert expired(tickets, now=120.0, lease_s=60.0) == ["dead"]


def test_a_paused_queue_admits_nothing_but_keeps_the_order():
    waiting = [ticket("a1", "a", 1), ticket("a2", "a", 2), ticket("b1", "b", 3)]
    p = plan(waiting, [], [Node("n1", 8.0)], QueuePolicy(paused=True))
    assert p.admit == [] and p.order == ["a1", "b1", "a2"]


def test_a_ticket_whose_driver_the_cluster_lists_as_ended_is_dropped_at_once():
    t = ticket("mine", beat=100.0).model_copy(update={"job_id": "01000000", "driver_pid": 42})
    assert expired([t], now=101.0, lease_s=60.0, alive={("01000000", 42)}) == []
    # A new local cluster reuses job id 01000000 for another driver: the old ticket is gone.
    assert expired([t], now=101.0, lease_s=60.0, alive={("01000000", 7)}) == ["mine"]
    assert expired([t], now=101.0, lease_s=60.0, alive=None) == []  # job table unknown: heartbeats decide
