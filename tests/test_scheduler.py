"""The scheduler against a deterministic fake engine (tests/fake_engine.py): continuous and static batching,
the bounded queue, cancellation, stop tokens and strings, failures, the prefix cache, the background thread."""

import threading

import pytest
from fake_engine import FakeEngine, FakeTokenizer, expected

from infer.prefix_cache import BLOCK, PrefixCache
from infer.sampling import InferenceError, SamplingParams
from infer.scheduler import Overloaded, Request, Scheduler


class Recorder:
    """Collects each request's events."""

    def __init__(self):
        self.events = {}

    def request(self, prompt, max_new=8, **sampling) -> Request:
        request = Request(list(prompt), SamplingParams(max_new_tokens=max_new, **sampling), emit=None)
        self.events[request.id] = []
        request.emit = self.events[request.id].append
        return request

    def tokens(self, request) -> list[int]:
        return [t for e in self.events[request.id] for t in e.token_ids]

    def text(self, request) -> str:
        return "".join(e.text for e in self.events[request.id])

    def last(self, request):
        return self.events[request.id][-1]


def drain(scheduler: Scheduler, limit: int = 1000) -> list[tuple[int, int]]:
    """Step until nothing is left; (busy slots, queued requests) at each generate step."""
    busy, generate = [], scheduler.engine.generate

    def counted(state, longest=None):
        busy.append((scheduler.busy, len(scheduler.queue)))
        return generate(state, longest)

    scheduler.engine.generate = counted
    try:
        for _ in range(limit):
            if not (scheduler.queue or scheduler.busy):
                return busy
            scheduler.step()
        raise AssertionError(f"not done after {limit} iterations")
    finally:
        scheduler.engine.generate = generate


def workload(rec: Recorder, n: int = 10) -> list[Request]:
    """Varied prompt and output lengths, varied seeds."""
    return [rec.request([(3 * i + j) % 100 for j in range(2 + i % 5)], max_new=1 + (7 * i) % 13, seed=i)
            for i in range(n)]


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_every_request_gets_the_models_tokens(batching):
    engine, rec = FakeEngine(slots=3), Recorder()
    scheduler = Scheduler(engine, batching=batching, static_wait=0.0)
    requests = workload(rec)
    for r in requests:
        scheduler.submit(r)
    drain(scheduler)
    for r in requests:
        assert rec.tokens(r) == expected(r.prompt, r.params.max_new_tokens, r.params.seed)
        assert rec.last(r).finish_reason == "length"
        assert rec.last(r).completion_tokens == r.params.max_new_tokens
        assert sum(e.finish_reason is not None for e in rec.events[r.id]) == 1
    assert scheduler.busy == 0 and not scheduler.queue and not scheduler._requests


def test_continuous_batching_refills_slots_at_once_and_static_waits():
    busy = {}
    for batching in ("continuous", "static"):
        engine, rec = FakeEngine(slots=3), Recorder()
        scheduler = Scheduler(engine, batching=batching, static_wait=0.0)
        for r in workload(rec):
            scheduler.submit(r)
        busy[batching] = drain(scheduler)
    # continuous: a freed slot is refilled before the next step, so no step runs with a free slot while
    # a request waits
    cont, static = busy["continuous"], busy["static"]
    assert all(slots == 3 for slots, queued in cont if queued) and sum(q > 0 for _, q in cont) > 10
    # static: a batch runs until its longest request ends; slots sit empty while requests wait, and it
    # takes more steps
    assert sum(slots < 3 for slots, queued in static if queued) > 5 and len(static) > len(cont)


def test_static_batching_waits_for_a_full_batch_or_the_timeout():
    engine, rec = FakeEngine(slots=3), Recorder()
    scheduler = Scheduler(engine, batching="static", static_wait=3600.0)
    first, second = rec.request([1, 2]), rec.request([3, 4])
    scheduler.submit(first)
    scheduler.submit(second)
    assert scheduler.step() is False and engine.calls["prefill"] == 0  # 2 of 3: waits
    scheduler.submit(rec.request([5, 6]))
    scheduler.step()
    assert engine.calls["prefill"] == 3 and scheduler.busy == 3
    scheduler.static_wait = 0.0
    late = rec.request([7, 8])
    scheduler.submit(late)
    scheduler.step()
    assert scheduler.queue[0] is late  # a batch is running: the late request waits for all of it
    drain(scheduler)
    assert rec.last(late).finish_reason == "length"


def test_a_full_queue_refuses_at_once():
    engine, rec = FakeEngine(slots=1), Recorder()
    scheduler = Scheduler(engine, max_queue=2)
    scheduler.submit(rec.request([1]))
    scheduler.submit(rec.request([2]))
    with pytest.raises(Overloaded, match="queue is full") as caught:
        scheduler.submit(rec.request([3]))
    assert caught.value.retry_after > 0
    scheduler.step()  # one admitted: room for one more
    scheduler.submit(rec.request([4]))
    assert b'meshlm_requests_rejected_total{reason="queue_full"} 1.0' in scheduler.metrics.exposition()


def test_requests_that_can_never_run_are_refused_with_the_reason():
    scheduler = Scheduler(FakeEngine(max_length=64))
    rec = Recorder()
    with pytest.raises(InferenceError, match="60 tokens and max_new_tokens is 8"):
        scheduler.submit(rec.request([1] * 60, max_new=8))
    with pytest.raises(InferenceError, match="outside the vocabulary"):
        scheduler.submit(rec.request([100]))
    with pytest.raises(InferenceError, match="empty"):
        scheduler.submit(rec.request([]))
    with pytest.raises(InferenceError, match="batching"):
        Scheduler(FakeEngine(), batching="dynamic")


def test_cancel_frees_the_slot_and_drops_queued_requests():
    engine, rec = FakeEngine(slots=1), Recorder()
    scheduler = Scheduler(engine)
    running, queued, after = rec.request([1, 2], max_new=50), rec.request([3], max_new=50), rec.request([4], max_new=3)
    for r in (running, queued, after):
        scheduler.submit(r)
    scheduler.step()
    scheduler.step()
    assert scheduler.slots[0] is running and len(rec.tokens(running)) == 3  # prefill + 2 steps
    scheduler.cancel(queued.id)
    scheduler.cancel(running.id)
    scheduler.cancel("no-such-request")
    scheduler.step()
    assert rec.last(running).finish_reason == "cancelled" and rec.last(queued).finish_reason == "cancelled"
    assert scheduler.slots[0] is after  # the freed slot went to the next request in the same iteration
    drain(scheduler)
    assert rec.tokens(after) == expected([4], 3)


def test_stop_token_and_stop_strings():
    engine, rec = FakeEngine(slots=2), Recorder()
    scheduler = Scheduler(engine, FakeTokenizer())
    free = expected([5, 6], 12)
    stop_id = free[4]
    by_id = rec.request([5, 6], max_new=12, stop_token_ids=(stop_id,))
    text = FakeTokenizer().decode(free)
    stop = text[6:8]
    by_text = rec.request([5, 6], max_new=12, stop=(stop,))
    scheduler.submit(by_id)
    scheduler.submit(by_text)
    drain(scheduler)
    first = free.index(stop_id)
    assert rec.tokens(by_id) == free[:first] and rec.last(by_id).finish_reason == "stop"
    assert rec.last(by_id).completion_tokens == first + 1  # the stop token counts as generated
    assert rec.text(by_text) == text[:text.find(stop)] and rec.last(by_text).finish_reason == "stop"
    with pytest.raises(InferenceError, match="tokenizer"):
        Scheduler(FakeEngine()).submit(rec.request([1], stop=("x",)))


def test_a_failing_prefill_fails_only_its_request_and_a_failing_step_only_the_running_ones():
    engine, rec = FakeEngine(slots=2, fail_prefill_token=99), Recorder()
    scheduler = Scheduler(engine)
    bad, good = rec.request([1, 99], max_new=4), rec.request([1, 2], max_new=4)
    scheduler.submit(bad)
    scheduler.submit(good)
    drain(scheduler)
    assert rec.last(bad).finish_reason == "error" and "prefill failed on purpose" in rec.last(bad).error
    assert rec.tokens(good) == expected([1, 2], 4)
    hit, hit_too = rec.request([3], max_new=9), rec.request([4], max_new=9)
    scheduler.submit(hit)
    scheduler.submit(hit_too)
    scheduler.step()
    engine.fail_next_generate = True
    scheduler.step()
    assert rec.last(hit).finish_reason == "error" == rec.last(hit_too).finish_reason
    assert scheduler.busy == 0
    later = rec.request([5], max_new=6)
    scheduler.submit(later)
    drain(scheduler)
    assert rec.tokens(later) == expected([5], 6)
    assert b'meshlm_requests_total{outcome="error"} 3.0' in scheduler.metrics.exposition()


def test_prefix_cache_reuses_shared_prompts_and_earlier_turns():
    engine, rec = FakeEngine(slots=2, max_length=256), Recorder()
    scheduler = Scheduler(engine, prefix_cache_bytes=10_000)
    system = [(5 * i) % 97 for i in range(40)]
    a, b = rec.request(system + [1, 2, 3], max_new=20), rec.request(system + [4, 5], max_new=5)
    scheduler.submit(a)
    drain(scheduler)
    scheduler.submit(b)
    drain(scheduler)
    assert rec.last(a).cached_tokens == 0 and rec.last(b).cached_tokens == 40  # the shared system prompt
    # the next turn of a's conversation: its prompt, its reply, a new message
    turn = a.prompt + rec.tokens(a) + [7, 8]
    c = rec.request(turn, max_new=3)
    scheduler.submit(c)
    drain(scheduler)
    assert rec.last(c).cached_tokens == len(a.prompt) + 19  # all but a's last token (never fed) was cached
    for r in (a, b, c):
        assert rec.tokens(r) == expected(r.prompt, r.params.max_new_tokens)
    assert engine.bad_reuse == []
    metrics = scheduler.metrics.exposition().decode()
    assert "meshlm_prefix_cache_hits_total 2.0" in metrics and "meshlm_prefix_cache_lookups_total 3.0" in metrics
    assert "meshlm_prefix_cache_hit_rate 0.666" in metrics


def test_prefix_cache_lookup_eviction_and_superseded_entries():
    cache = PrefixCache(capacity_bytes=100)
    seq = list(range(50))
    assert cache.add(seq, "kv50", 50)
    assert cache.lookup(seq[:10] + [999] * 20) is None  # shares less than a block
    hit = cache.lookup(seq[:37] + [999])
    assert hit.entry.cache == "kv50" and hit.length == 37
    assert cache.lookup(seq).length == 49  # the last prompt token is always computed
    assert not cache.add(seq[:30], "kv30", 30)  # covered by the longer entry
    assert cache.add(seq + [1, 2], "kv52", 52) and len(cache) == 1  # supersedes the entry it extends
    other = [7] * 40
    assert cache.add(other, "kv40", 40) and len(cache) == 2 and cache.bytes == 92
    cache.lookup(seq + [3])  # touch: `other` is now the least recently used
    assert cache.add([8] * 30, "kv30b", 30) and cache.evictions == 1
    assert cache.lookup(other + [1]) is None and cache.lookup(seq + [3]).entry.cache == "kv52"
    assert not cache.add([9] * (BLOCK - 1), "short", 1)  # shorter than a block
    assert not cache.add(list(range(200)), "big", 101)  # larger than the whole budget


def test_background_thread_serves_concurrent_submitters_and_drains_on_shutdown():
    engine, rec = FakeEngine(slots=3), Recorder()
    scheduler = Scheduler(engine, FakeTokenizer(), max_queue=64)
    scheduler.start()
    requests = workload(rec, 24)
    done = threading.Event()
    finished = []

    def finish_watch(request):
        inner = request.emit

        def emit(event):
            inner(event)
            if event.finish_reason:
                finished.append(request.id)
                if len(finished) == len(requests):
                    done.set()
        request.emit = emit

    threads = []
    for chunk in range(4):
        def submit(chunk=chunk):
            for r in requests[chunk::4]:
                finish_watch(r)
                scheduler.submit(r)
        threads.append(threading.Thread(target=submit))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    scheduler.shutdown(drain=True, timeout=30)
    assert done.is_set()
    for r in requests:
        assert rec.tokens(r) == expected(r.prompt, r.params.max_new_tokens, r.params.seed)
    assert scheduler.health() == (False, "the scheduler thread has stopped")
    with pytest.raises(Overloaded, match="shutting down"):
        scheduler.submit(rec.request([1]))
