"""What the serving scheduler counts, as Prometheus metrics (`GET /metrics`). Each Scheduler has its own
registry, so several can live in one process (tests, benchmarks)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    def __init__(self, slots: int = 0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("meshlm_requests", "Finished requests by outcome (stop, length, cancelled, error)",
                                ["outcome"], registry=r)
        self.rejected = Counter("meshlm_requests_rejected", "Requests refused before they ran, by reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("meshlm_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("meshlm_generation_tokens", "Tokens generated", registry=r)
        self.steps = Counter("meshlm_engine_steps", "Generate steps run (one token for every busy slot)",
                             registry=r)
        self.queue_depth = Gauge("meshlm_queue_depth", "Requests waiting for a slot", registry=r)
        self.slots_busy = Gauge("meshlm_slots_busy", "Slots holding a running request", registry=r)
        self.slots_total = Gauge("meshlm_slots", "Slots of the engine", registry=r)
        self.slots_total.set(slots)
        self.prefix_lookups = Counter("meshlm_prefix_cache_lookups", "Prompts looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("meshlm_prefix_cache_hits", "Prompts that reused a cached prefix", registry=r)
        self.prefix_hit_tokens = Counter("meshlm_prefix_cache_hit_tokens", "Prompt tokens whose KV was reused",
                                         registry=r)
        self.prefix_hit_rate = Gauge("meshlm_prefix_cache_hit_rate", "Share of looked-up prompts that reused a "
                                     "cached prefix", registry=r)
        self.prefix_bytes = Gauge("meshlm_prefix_cache_bytes", "Device memory held by the prefix cache", registry=r)
        self.ttft = Histogram("meshlm_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("meshlm_inter_token_latency_seconds", "Time between a request's tokens", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("meshlm_request_latency_seconds", "Arrival to the last token", registry=r,
                             buckets=LATENCY_BUCKETS)

        compiles = Gauge("meshlm_xla_compilations", "Programs this process compiled (persistent-cache hits not "
                         "counted)", registry=r)
        compiles.set_function(lambda: COMPILATION["compiled"])
        seconds = Gauge("meshlm_xla_compile_seconds", "Seconds this process spent compiling", registry=r)
        seconds.set_function(lambda: COMPILATION["seconds"])
        hits = Gauge("meshlm_compile_cache_hits", "Programs loaded from the persistent compilation cache",
                     registry=r)
        hits.set_function(lambda: COMPILATION["cache_hits"])
        watch_compilation()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


COMPILATION = {"compiled": 0, "seconds": 0.0, "cache_hits": 0}  # this process's, from jax.monitoring events
_watching = threading.Lock()
_watched = False


def watch_compilation() -> None:
    """Count the process's compilations and persistent-cache hits into COMPILATION (once per process)."""
    global _watched
    with _watching:
        if _watched:
            return
        _watched = True
    from jax import monitoring

    hit = threading.local()  # the cache-hit event comes first, on the thread that then records the duration

    def event(name: str, **kwargs) -> None:
        if name == "/jax/compilation_cache/cache_hits":
            COMPILATION["cache_hits"] += 1
            hit.value = True

    def duration(name: str, seconds: float, **kwargs) -> None:
        if name == "/jax/core/compile/backend_compile_duration":  # compiled, or loaded from the cache
            if getattr(hit, "value", False):
                hit.value = False
            else:
                COMPILATION["compiled"] += 1
                COMPILATION["seconds"] += seconds

    monitoring.register_event_listener(event)
    monitoring.register_event_duration_secs_listener(duration)
