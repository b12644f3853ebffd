"""/metrics: the engine's state in Prometheus text, and what no other engine exports: each MoE
layer's expert load and the serving router's imbalance (docs/routing.md, section 8) over the
last `window` forward passes."""
import threading
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..routing.metrics import device_loads, imbalance, physical_loads, placed

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ExpertWindow:
    """A load recorder (MoEBlock.recorder) keeping each layer's last `window` passes. A recorder
    sends the one-call decode step's routing back through Python (models/native_decode.py); that
    is its cost, and why `--expert-window 0` turns it off."""

    def __init__(self, model, window: int, devices: int):
        self.window, self.devices = window, devices
        self.blocks = {b.ctx.layer: b for b in model.moe_blocks()}
        self.loads = {layer: deque(maxlen=window) for layer in self.blocks}
        self._lock = threading.Lock()
        for block in self.blocks.values():
            block.recorder = self

    def record(self, layer: int, ids):
        import torch
        load = torch.bincount(ids.reshape(-1).cpu(), minlength=self.blocks[layer].ctx.rule.num_experts)
        with self._lock:
            self.loads[layer].append(load)

    def families(self):
        with self._lock:
            loads = {layer: list(q) for layer, q in self.loads.items()}
        per_expert = GaugeMetricFamily("tinymoe_expert_load", "tokens routed to each expert over the recent "
                                       "window of forward passes", labels=["layer", "expert"])
        layer_i = GaugeMetricFamily("tinymoe_router_imbalance", "I = max/mean load per pass, averaged over "
                                    "the window (physical copies under a plan)", labels=["layer"])
        layer_dev = GaugeMetricFamily("tinymoe_router_device_imbalance", f"I_dev over {self.devices} devices "
                                      "per pass, averaged over the window", labels=["layer"])
        i_all, dev_all = [], []
        for layer, passes in loads.items():
            block = self.blocks[layer]
            if passes:
                for e, value in enumerate(sum(passes).tolist()):
                    per_expert.add_metric([str(layer), str(e)], value)
            plan, device_of, devices = placed(block.experts, block.ctx.state, block.ctx.rule.num_experts, self.devices)
            phys = [physical_loads(p, plan) for p in passes]
            i = sum(map(imbalance, phys)) / len(phys) if phys else 1.0
            dev = sum(imbalance(device_loads(p, device_of, devices)) for p in phys) / len(phys) if phys else 1.0
            layer_i.add_metric([str(layer)], i)
            layer_dev.add_metric([str(layer)], dev)
            i_all.append(i)
            dev_all.append(dev)
        yield per_expert
        yield layer_i
        yield layer_dev
        yield GaugeMetricFamily("tinymoe_router_i_agg", "I_agg: mean over MoE layers of tinymoe_router_imbalance",
                                value=sum(i_all) / len(i_all) if i_all else 1.0)
        yield GaugeMetricFamily("tinymoe_router_i_dev", "mean over MoE layers of tinymoe_router_device_imbalance",
                                value=sum(dev_all) / len(dev_all) if dev_all else 1.0)
        yield GaugeMetricFamily("tinymoe_router_window_passes", "forward passes in the window",
                                value=max(map(len, loads.values()), default=0))


class ServerMetrics:
    def __init__(self, llm, expert_window: int = 64, devices: int = 4):
        self.registry = CollectorRegistry()
        self.prompt_tokens = Counter("tinymoe_prompt_tokens", "prompt tokens of started requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("tinymoe_generation_tokens", "generated tokens", registry=self.registry)
        self.requests = Counter("tinymoe_requests", "finished sequences by finish reason", ["finish_reason"],
                                registry=self.registry)
        self.ttft = Histogram("tinymoe_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("tinymoe_time_per_output_token_seconds", "a sequence's mean time between "
                              "tokens after the first", buckets=TPOT_BUCKETS, registry=self.registry)
        self.experts = ExpertWindow(llm.model, expert_window, devices) if expert_window > 0 else None
        self._state = {"running": 0, "waiting": 0, "used": 0, "total": llm.blocks.num_blocks, "hits": 0,
                       "preemptions": 0}
        self.registry.register(self)

    def after_step(self, llm, waiting: int):
        """Called by the engine thread after each step: a snapshot for the scrapes to read."""
        blocks = llm.blocks
        self._state = {"running": len(llm.scheduler.running), "waiting": waiting,
                       "used": blocks.num_blocks - blocks.num_free, "total": blocks.num_blocks,
                       "hits": blocks.prefix_hits, "preemptions": llm.scheduler.num_preemptions}

    def request_done(self, out):
        self.requests.labels(out.finish_reason or "unknown").inc()
        n = len(out.token_ids)
        if n:
            self.ttft.observe(out.time_to_first_token)
        if n > 1 and out.latency > 0:
            self.tpot.observe((out.latency - out.time_to_first_token) / (n - 1))

    def collect(self):  # the engine snapshot and the expert window, read at scrape time
        s = self._state
        yield GaugeMetricFamily("tinymoe_requests_running", "sequences in the running batch", value=s["running"])
        yield GaugeMetricFamily("tinymoe_requests_waiting", "sequences queued in the engine, not yet running",
                                value=s["waiting"])
        yield GaugeMetricFamily("tinymoe_kv_blocks_used", "paged KV cache blocks held by sequences", value=s["used"])
        yield GaugeMetricFamily("tinymoe_kv_blocks_total", "paged KV cache blocks", value=s["total"])
        yield CounterMetricFamily("tinymoe_prefix_cache_hits", "KV blocks reused from the prefix cache",
                                  value=s["hits"])
        yield CounterMetricFamily("tinymoe_preemptions", "sequences preempted for KV space (recomputed later)",
                                  value=s["preemptions"])
        if self.experts is not None:
            yield from self.experts.families()

    def text(self) -> bytes:
        return generate_latest(self.registry)
