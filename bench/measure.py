"""What the benchmarks measure and how: wall time with device synchronisation, peak memory, FLOPs, and
the device's own matrix-multiply throughput to compare achieved FLOP/s against."""
from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

# torch counts the CUDA attention kernels but not the CPU one that SDPA dispatches to: without these the
# fused attention of our editor would count as free on the CPU, and the reference's explicit bmm would not.
if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Latency:
    median_ms: float
    p95_ms: float
    iterations: int


def latency(fn: Callable[[], object], device: torch.device, warmup: int, iterations: int) -> Latency:
    """Per-call latency after `warmup` calls: CUDA events around each call on a GPU (no host sync in the
    timed loop), perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iterations)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return Latency(statistics.median(times), p95, iterations)


def _resident_set_peak_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory of the block in GiB: CUDA's allocator peak on a GPU; on the CPU the process's peak
    resident set (Linux, reset through /proc/self/clear_refs), which includes the weights and Python."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    try:
        yield result
    finally:
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _resident_set_peak_bytes()
        result["peak_gib"] = peak / 2**30


class FlopCount(TorchDispatchMode):
    """torch.utils.flop_counter's per-op formulas, forward and backward ops alike, summed over the block.

    FlopCounterMode itself also tracks modules with backward hooks, which break `autograd.grad` on a leaf
    tensor, and both editors take exactly that gradient (of the latents)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call. Not under torch.inference_mode, whose ops this mode does not see (it counts 0)."""
    with FlopCount() as counter:
        fn()
    return counter.total


def top_kernels(fn: Callable[[], object], device: torch.device, count: int = 8) -> list[dict]:
    """The ops (CPU) or kernels (GPU) that took the most self time in one call: what bounds it."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        synchronize(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [event for event in profile.key_averages() if getattr(event, attribute) > 0]
    total = sum(getattr(event, attribute) for event in events)
    events.sort(key=lambda event: getattr(event, attribute), reverse=True)
    return [{"kernel": event.key[:90], "calls": event.count, "ms": getattr(event, attribute) / 1e3,
             "share %": 100 * getattr(event, attribute) / total} for event in events[:count]]


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """The device's measured dense matmul throughput in this precision: the yardstick for achieved TFLOP/s."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = latency(lambda: a @ b, device, warmup=2, iterations=repeats)
    return 2 * size**3 / (timing.median_ms * 1e-3) / 1e12


class OpCount(TorchDispatchMode):
    """aten ops the block dispatches, leaving out views (no kernel) and randint (the regularizer's offsets, drawn on
    the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._overloadpacket is not torch.ops.aten.randint:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Host-device synchronisations of one call (torch.cuda's sync debug mode warns at each); None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)
