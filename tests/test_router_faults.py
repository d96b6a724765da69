"""The router and membership with fake workers that die, refuse and move requests (no Ray, no model).

The fake "model" makes output token i of a request a fixed function of its prompt and i, so a
request that moved or was recomputed elsewhere must produce exactly the uninterrupted sequence."""

import asyncio

import pytest

from splitserve.engine.output import RequestOutput
from splitserve.engine.request import RequestSnapshot
from splitserve.errors import (InvalidRequestError, NoCapacityError, RequestStateError, UnknownRequestError,
                               WorkerLostError)
from splitserve.platform.membership import Membership, MembershipView, WorkerState
from splitserve.platform.router import Router
from splitserve.platform.routing import PrefillSpeeds
from splitserve.stats import EngineStats, WorkerStats

MAX_TOKENS = 12


def token(prompt, i):
    return (sum(prompt) * 31 + i * 7) % 101


def expected(prompt):
    return [token(prompt, i) for i in range(MAX_TOKENS)]


class FakeDecode:
    def __init__(self, name, free_blocks=100):
        self.name, self.address, self.free_blocks = name, f"kv://{name}", free_blocks
        self.requests = {}  # wid -> [prompt, num tokens produced]
        self.die_after = None  # tokens this worker streams before it "dies"
        self.dead = False
        self.aborted = []
        self.opened = []  # streams opened
        self.fail_migrations = False
        self.wait_cancelled = []

    async def stats(self):
        if self.dead:
            raise WorkerLostError(self.name, "actor died")
        engine = EngineStats(num_waiting=0, num_running=len(self.requests), num_kv_blocks=self.free_blocks,
                             num_free_kv_blocks=self.free_blocks, num_cached_kv_blocks=0, num_held=0, num_reserved=0,
                             num_pinned=0, max_model_len=4096)
        return WorkerStats(self.name, 0, engine)

    async def stream(self, wid, wait_s=0.0):
        if self.dead:
            raise WorkerLostError(self.name, "actor died")
        for _ in range(int(wait_s * 1000)):  # a stream opened early waits for the request to arrive
            if wid in self.requests:
                break
            await asyncio.sleep(0.001)
        self.opened.append(wid)
        prompt, produced = self.requests[wid]
        while True:
            await asyncio.sleep(0)
            if self.dead:
                raise WorkerLostError(self.name, "actor died")
            if self.requests.get(wid) is None:  # migrated away
                return
            if isinstance(self.requests[wid], tuple) and self.requests[wid][0] == "failing":  # notice, then on
                target = self.requests[wid][1]
                self.requests[wid] = [prompt, produced]
                yield RequestOutput(wid, [], "", False, None, len(prompt), produced, moved_to=target)
                continue
            if isinstance(self.requests[wid], tuple):  # ("moved", target): notice, then the final marker
                del self.requests[wid]
                target = self._moved[wid]
                yield RequestOutput(wid, [], "", False, None, len(prompt), produced, moved_to=target)
                await asyncio.sleep(0.01)
                CLUSTER.workers[target].requests[wid] = [prompt, produced]  # committed there
                yield RequestOutput(wid, [], "", True, "migrated", len(prompt), produced, moved_to=target)
                return
            i = produced
            produced += 1
            self.requests[wid] = [prompt, produced]
            done = produced == MAX_TOKENS
            if done:
                del self.requests[wid]
            yield RequestOutput(wid, [token(prompt, i)], f"<{token(prompt, i)}>", done, "length" if done else None,
                                len(prompt), produced)
            if self.die_after is not None and produced >= self.die_after:
                self.dead = True

    async def migrate(self, wid, target_name, target_address):
        if self.fail_migrations:  # stops for the last stage, then the transfer fails: it goes on here
            self.requests[wid] = ("failing", target_name)
            return {"status": "failed", "error": "DATA_LOSS"}
        self._moved = getattr(self, "_moved", {})
        self._moved[wid] = target_name
        self.requests[wid] = ("moved", target_name)
        return {"status": "migrated", "target": target_name}

    def abort(self, wid):
        self.aborted.append(wid)
        self.requests.pop(wid, None)

    def cancel_wait(self, wid):
        self.wait_cancelled.append(wid)


class FakePrefill:
    def __init__(self, name):
        self.name, self.dead, self.busy, self.calls, self.offered = name, False, False, [], []
        self.reserved = []  # work ids it announced as reserved
        self.transfer_gate = asyncio.Event()
        self.transfer_gate.set()
        self.fail_transfers = 0  # transfers that fail after the reservation

    async def prefill(self, wid, prompt, params, decodes, resume=None, wait_s=30.0):
        """As ``RayWorker.prefill``: a "reserved" event once a decode worker holds room, then the result."""
        result = await self._prefill(wid, prompt, params, decodes, resume)
        if result["status"] in ("transferred", "transfer_failed"):
            self.reserved.append(wid)
            yield {"status": "reserved", "first": result["first"], "decode": result["decode"]}
            await self.transfer_gate.wait()  # the KV moves (a test may hold it)
            if self.fail_transfers:
                self.fail_transfers -= 1
                result = {**result, "status": "transfer_failed", "error": "KV transfer failed: DATA_LOSS"}
                CLUSTER.workers[next(w for w in CLUSTER.workers if getattr(CLUSTER.workers[w], "address", None)
                                     == result["decode"])].requests.pop(wid, None)
        yield result

    async def _prefill(self, wid, prompt, params, decodes, resume=None):
        self.calls.append((wid, resume))
        self.offered.append(list(decodes))
        if self.dead:
            raise WorkerLostError(self.name, "actor died")
        if self.busy:
            return {"status": "busy", "error": f"{self.name} is full"}
        by_address = {getattr(w, "address", None): w for w in CLUSTER.workers.values()}
        alive = [by_address[a] for a in decodes if not by_address[a].dead]
        failed = {a: "UNAVAILABLE" for a in decodes if by_address[a].dead}
        if not alive:
            return {"status": "decode_failed", "code": "UNAVAILABLE", "failed": failed, "error": "reserve failed"}
        d = next((w for w in alive if w.free_blocks > 0), None)
        if d is None:
            return {"status": "no_capacity", "error": "no room"}
        done = RequestSnapshot.from_dict(resume).output_token_ids if resume else []
        assert done == expected(prompt)[:len(done)]  # the snapshot holds exactly what the client has
        i = len(done)
        d.requests[wid] = [prompt, i + 1]
        first = RequestOutput(wid, [token(prompt, i)], f"<{token(prompt, i)}>", True, "prefilled", len(prompt), i + 1)
        return {"status": "transferred", "decode": d.address, "failed": failed, "first": first, "pid": 0,
                "kv_bytes": 0}

    def abort(self, wid):
        pass


class FakeCluster:
    def __init__(self, prefills, decodes):
        self.membership = Membership()
        self.workers = {}
        for w in prefills + decodes:
            self.workers[w.name] = w
            pool = "prefill" if isinstance(w, FakePrefill) else "decode"
            self.membership.add(w.name, pool, w)
            self.membership.came_up(w.name, "inc-0", getattr(w, "address", None))
        self.reported = []

    async def view(self) -> MembershipView:
        return self.membership.view()

    def cached(self, name):
        return self.membership.get(name)

    async def report_lost(self, member):
        self.reported.append(member.name)
        self.membership.lost(member.name, member.generation)


CLUSTER: FakeCluster = None


def make(prefills=1, decodes=2):
    global CLUSTER
    CLUSTER = FakeCluster([FakePrefill(f"p{i}") for i in range(prefills)],
                          [FakeDecode(f"d{i}") for i in range(decodes)])
    return CLUSTER, Router(CLUSTER, block_size=16, max_wait_s=0.5, recovery_wait_s=1.0)


async def collect(router, rid, prompt):
    return [o async for o in router.generate(rid, prompt, {"max_tokens": MAX_TOKENS})]


def check_stream(outs, prompt):
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == expected(prompt)
    assert [o.index for o in outs] == list(range(MAX_TOKENS))  # each index once, in order
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert not any(o.finished for o in outs[:-1])


def test_a_decode_worker_dying_mid_stream_costs_a_pause_not_the_request():
    cluster, router = make(decodes=2)
    cluster.workers["d1"].free_blocks = 50  # d0 is picked first (more free blocks)
    cluster.workers["d0"].die_after = 5
    prompt = [1, 2, 3]
    outs = asyncio.run(collect(router, "r", prompt))
    check_stream(outs, prompt)
    assert cluster.reported == ["d0"] and router.num_recoveries == 1
    # the recovery went through the prefill worker with a snapshot of the 5 tokens the client had
    wid, resume = cluster.workers["p0"].calls[-1]
    assert wid == "r@2" and len(resume["output_token_ids"]) == 5 and resume["num_computed_tokens"] == 0
    # the dead worker is never picked again, although its last stats said it was the emptiest
    outs = asyncio.run(collect(router, "r2", [4, 5]))
    check_stream(outs, [4, 5])
    assert cluster.workers["d1"].requests == {} and router.tracks == {}


def test_a_dead_worker_that_was_idle_is_skipped_and_the_reserve_retried_elsewhere():
    """The reported bug: a killed decode worker kept its last stats (idle, all blocks free) and every
    new request failed on it."""
    cluster, router = make(decodes=2)
    cluster.workers["d1"].free_blocks = 50  # d0 would look best
    cluster.workers["d0"].dead = True  # its stats call fails: reported, skipped
    check_stream(asyncio.run(collect(router, "a", [7])), [7])
    assert cluster.reported == ["d0"]
    # a worker that answers stats but whose KV plane is unreachable: the reserve fails, another is used
    cluster, router = make(decodes=2)
    cluster.workers["d1"].free_blocks = 50  # d0 looks best
    d0 = cluster.workers["d0"]
    real_stats = d0.stats

    async def stats():
        d0.dead = False
        s = await real_stats()
        d0.dead = True
        return s
    d0.stats = stats
    d0.dead = True
    check_stream(asyncio.run(collect(router, "b", [8])), [8])
    assert cluster.reported == ["d0"]


def test_a_prefill_worker_lost_is_retried_on_another():
    cluster, router = make(prefills=2)
    cluster.workers["p0"].dead = True
    check_stream(asyncio.run(collect(router, "r", [3])), [3])
    assert cluster.reported == ["p0"] and cluster.workers["p1"].calls


def test_a_lost_worker_costs_a_pause_as_long_as_its_restart_not_the_request():
    """The only prefill worker dies under a request and is back after longer than max_queue_wait_s (a
    restart): the request waits for it (recovery_wait_s) and completes; so does one whose only decode
    worker died mid-stream. Without a restart, it fails with the reason after recovery_wait_s."""
    async def restart(cluster, name, after_s):
        await asyncio.sleep(after_s)
        cluster.workers[name].dead = False
        cluster.workers[name].die_after = None
        cluster.membership.came_up(name, "inc-1", getattr(cluster.workers[name], "address", None))

    async def run(cluster, router, name, prompt):
        task = asyncio.create_task(restart(cluster, name, 0.8))  # longer than max_wait_s (0.5 s)
        try:
            return await collect(router, "r", prompt)
        finally:
            await task

    cluster, router = make(prefills=1, decodes=1)
    cluster.workers["p0"].dead = True
    check_stream(asyncio.run(run(cluster, router, "p0", [5])), [5])
    assert cluster.reported == ["p0"] and router.num_recoveries == 1
    cluster, router = make(prefills=1, decodes=1)
    cluster.workers["d0"].die_after = 4
    check_stream(asyncio.run(run(cluster, router, "d0", [6])), [6])
    assert cluster.reported == ["d0"] and router.tracks == {}
    cluster, router = make(prefills=1, decodes=1)
    cluster.workers["p0"].dead = True
    with pytest.raises(NoCapacityError, match=r"no prefill worker is up \(waited 1s"):
        asyncio.run(collect(router, "r", [5]))
    assert router.tracks == {}


def test_a_worker_that_dies_under_every_placement_fails_the_request_after_max_recoveries():
    cluster, router = make(prefills=4)
    for w in cluster.workers.values():
        if isinstance(w, FakePrefill):
            w.dead = True
    real_lost = cluster.report_lost

    async def report_lost(member):  # each comes straight back, and dies again on the next call
        await real_lost(member)
        cluster.membership.came_up(member.name, f"inc-{len(cluster.reported)}")
    cluster.report_lost = report_lost
    with pytest.raises(WorkerLostError):
        asyncio.run(collect(router, "r", [2]))
    assert len(cluster.reported) == router.max_recoveries + 1 and router.tracks == {}


def test_the_first_token_goes_out_while_the_kv_moves_and_a_failed_transfer_repeats_nothing():
    """Once a decode worker holds room ("reserved"), the first token reaches the client before the
    transfer ends; a transfer that then fails places the request again from a snapshot holding that
    token, and the client sees each token once; a client that leaves while the KV moves aborts the
    request on the prefill worker and on every decode worker offered."""
    cluster, router = make(decodes=2)
    p0 = cluster.workers["p0"]
    p0.transfer_gate.clear()

    async def early():
        outs = router.generate("r", [3, 4], {"max_tokens": MAX_TOKENS})
        first = await asyncio.wait_for(outs.__anext__(), 2)  # the gate still holds the transfer
        assert p0.reserved == ["r@1"] and not first.finished
        p0.transfer_gate.set()
        return [first] + [o async for o in outs]
    check_stream(asyncio.run(early()), [3, 4])

    cluster, router = make(decodes=2)
    cluster.workers["p0"].fail_transfers = 1
    outs = asyncio.run(collect(router, "f", [9]))
    check_stream(outs, [9])
    wid, resume = cluster.workers["p0"].calls[-1]
    assert wid == "f@2" and resume["output_token_ids"] == expected([9])[:1]  # the token already out
    assert router.tracks == {} and not any(w.requests for n, w in cluster.workers.items() if n != "p0")

    cluster, router = make(decodes=2)
    p0 = cluster.workers["p0"]
    p0.transfer_gate.clear()
    aborted = []
    p0.abort = aborted.append

    async def leave():
        outs = router.generate("g", [5], {"max_tokens": MAX_TOKENS})
        await outs.__anext__()
        await outs.aclose()  # the client goes while the KV moves
    asyncio.run(leave())
    assert aborted == ["g@1"] and all(w.aborted == ["g@1"] for n, w in cluster.workers.items() if n != "p0")
    assert router.tracks == {} and not any(w.requests for n, w in cluster.workers.items() if n != "p0")


class Unmeasured(PrefillSpeeds):
    def done(self, worker: str, tokens: int, now: float) -> None:
        self.dropped(worker, now)


def test_prompts_sharing_a_prefix_follow_the_prefill_worker_that_computed_it():
    """KV-aware routing: with p0 busy, the first prompt of a shared prefix goes to p1; later ones follow
    it to p1 although both queues are empty (by queues alone, the tie would pick p0); a lost p1 is
    forgotten, and the prefix goes back to the tie."""
    cluster, router = make(prefills=2, decodes=1)
    router.speeds = Unmeasured()  # these fakes' speeds differ by noise: prefixes and queues alone decide here
    p0, p1 = cluster.workers["p0"], cluster.workers["p1"]
    system = list(range(1, 40))  # two full blocks of 16 before the last token's block

    async def while_p0_is_busy():
        p0.transfer_gate.clear()
        held = asyncio.ensure_future(collect(router, "u", [900, 901]))
        while not p0.reserved:
            await asyncio.sleep(0.01)
        s0 = await collect(router, "s0", system + [50])
        p0.transfer_gate.set()
        return await held, s0
    u, s0 = asyncio.run(while_p0_is_busy())
    check_stream(u, [900, 901]), check_stream(s0, system + [50])
    for i in (1, 2):
        check_stream(asyncio.run(collect(router, f"s{i}", system + [50 + i])), system + [50 + i])
    assert [w for w, _ in p0.calls] == ["u@1"] and [w for w, _ in p1.calls] == ["s0@1", "s1@1", "s2@1"]
    check_stream(asyncio.run(collect(router, "v", [700])), [700])  # no prefix anywhere: the tie, p0
    assert p0.calls[-1][0] == "v@1"
    cluster.membership.lost("p1", cluster.membership.get("p1").generation)
    cluster.membership.came_up("p1", "inc-1", None)  # back, with an empty cache
    check_stream(asyncio.run(collect(router, "s3", system + [53])), system + [53])
    assert p0.calls[-1][0] == "s3@1" and router.tracks == {}


def test_no_worker_left_fails_with_the_reason():
    cluster, router = make(decodes=1)
    cluster.workers["d0"].dead = True
    with pytest.raises(NoCapacityError, match="no decode worker is up"):
        asyncio.run(collect(router, "r", [1]))
    cluster, router = make(decodes=1)
    cluster.workers["d0"].free_blocks = 0
    with pytest.raises(NoCapacityError, match="no decode worker had room"):
        asyncio.run(collect(router, "r", [1]))
    cluster, router = make(decodes=1)
    cluster.workers["d0"].die_after = 1  # dies, and nothing is left to recover on
    with pytest.raises(NoCapacityError, match="no decode worker is up"):
        asyncio.run(collect(router, "r", [1]))


def test_the_stream_follows_a_migration_and_bad_migrations_are_refused():
    cluster, router = make(decodes=2)

    async def run():
        outs = []
        errors = {}
        async for out in router.generate("r", [5, 5], {"max_tokens": MAX_TOKENS}):
            outs.append(out)
            if len(outs) == 4:
                src = router.requests()["r"]["worker"]
                dst = "d1" if src == "d0" else "d0"
                with pytest.raises(UnknownRequestError):
                    await router.migrate("nope", dst)
                with pytest.raises(InvalidRequestError, match="no decode worker named 'p0'"):
                    await router.migrate("r", "p0")
                with pytest.raises(RequestStateError, match="already on"):
                    await router.migrate("r", src)
                cluster.membership.drain(dst)
                with pytest.raises(RequestStateError, match="draining"):
                    await router.migrate("r", dst)
                cluster.membership.undrain(dst)
                errors["result"] = await router.migrate("r", dst)
                errors["moved"] = (src, dst)
        return outs, errors

    outs, info = asyncio.run(run())
    check_stream(outs, [5, 5])
    assert info["result"]["status"] == "migrated" and info["result"]["source"] == info["moved"][0]
    target = cluster.workers[info["moved"][1]]
    assert target.requests == {} and target.opened == ["r@1"]  # opened once, early, on the notice
    assert target.wait_cancelled == []


def test_a_failed_migration_closes_the_early_stream_and_the_request_goes_on():
    cluster, router = make(decodes=2)
    cluster.workers["d1"].free_blocks = 50
    cluster.workers["d0"].fail_migrations = True

    async def run():
        outs = []
        async for out in router.generate("r", [9], {"max_tokens": MAX_TOKENS}):
            outs.append(out)
            if len(outs) == 3:
                result = await router.migrate("r", "d1")
        return outs, result

    outs, result = asyncio.run(run())
    check_stream(outs, [9])
    assert result["status"] == "failed"
    d1 = cluster.workers["d1"]
    assert d1.wait_cancelled == ["r@1"] and d1.requests == {}  # the early stream on d1 was given up


def test_membership_generations_ignore_stale_reports_and_draining_takes_nothing():
    m = Membership()
    m.add("d0", "decode")
    assert m.view().live("decode") == []  # starting: not yet
    m.came_up("d0", "inc-a", "127.0.0.1:1")
    gen = m.get("d0").generation
    assert [w.name for w in m.view().live("decode")] == ["d0"]
    assert m.lost("d0", gen) and m.get("d0").state is WorkerState.DEAD
    m.came_up("d0", "inc-b", "127.0.0.1:2")  # Ray restarted it: a new process
    assert m.get("d0").generation == gen + 1 and m.get("d0").kv_address == "127.0.0.1:2"
    assert not m.lost("d0", gen)  # a late report about the old process does not kill the new one
    v = m.version
    m.drain("d0")
    assert m.view().live("decode") == [] and m.version > v
    m.came_up("d0", "inc-b", "127.0.0.1:2")  # a probe of a draining worker leaves it draining
    assert m.get("d0").state is WorkerState.DRAINING
    with pytest.raises(ValueError, match="already exists"):
        m.add("d0", "decode")
    with pytest.raises(ValueError, match="pool must be one of"):
        m.add("x", "gpu")


def test_admission_is_bounded_in_time_and_refuses_before_any_output():
    """A full prefill worker ("busy") sends the request to another; all full, or every slot of the front
    door taken, or a worker that could not start it in time: refused within max_wait_s, no output."""
    cluster, router = make(prefills=2)
    cluster.workers["p0"].busy = True
    check_stream(asyncio.run(collect(router, "a", [2])), [2])
    assert cluster.workers["p1"].calls and router.tracks == {}
    # each call offers every decode worker that fits, the emptiest first
    assert cluster.workers["p1"].offered[-1] == ["kv://d0", "kv://d1"]

    cluster.workers["p1"].busy = True
    outs = []

    async def refused():
        start = asyncio.get_running_loop().time()
        with pytest.raises(NoCapacityError, match="every prefill worker was full"):
            async for out in router.generate("b", [3], {"max_tokens": MAX_TOKENS}):
                outs.append(out)
        return asyncio.get_running_loop().time() - start
    waited = asyncio.run(refused())
    assert outs == [] and 0.5 <= waited < 2.0 and router.tracks == {}

    cluster, router = make()
    router = Router(cluster, block_size=16, max_wait_s=0.3, max_inflight=1)

    async def one_slot():
        hold = router.generate("first", [4], {"max_tokens": MAX_TOKENS})
        await hold.__anext__()  # it holds the only slot
        with pytest.raises(NoCapacityError, match="max_queued_requests"):
            await collect(router, "second", [5])
        rest = [o async for o in hold]
        assert rest[-1].finished
        check_stream(await collect(router, "third", [6]), [6])  # the slot came back
    asyncio.run(one_slot())

    cluster, router = make()

    async def timed_out(wid, prompt, params, decodes, resume=None, wait_s=30.0):
        yield {"status": "queue_timeout", "error": f"it did not start within {wait_s:.1f}s on p0"}
    cluster.workers["p0"].prefill = timed_out
    with pytest.raises(NoCapacityError, match="did not start within"):
        asyncio.run(collect(router, "c", [7]))
    assert router.tracks == {}
