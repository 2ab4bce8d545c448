"""The NVML sampler's columns, from a fake NVML module (no GPU needed): power, SM clock and the share
of time a power or thermal limit held the clock down, and a column a driver does not report left
out rather than faked."""
from __future__ import annotations

import time
import types

from fixtures import gpu


def _fake_nvml(held_down: list[bool], clock_error: bool = False):
    ticks = iter(range(10**6))
    reasons = {0: 0x4, 1: 0x0}  # SW power cap on GPU 0 when asked, idle bit never counted

    def clock(h, kind):
        if clock_error:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 1500 + 100 * h

    def events(h):
        return reasons[h] if held_down[min(next(ticks) // 2, len(held_down) - 1)] else 0x1
    return types.SimpleNamespace(
        NVML_CLOCK_SM=1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=90 + h),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2e9),
        nvmlDeviceGetPowerUsage=lambda h: 500_000 + 100_000 * h,  # mW
        nvmlDeviceGetClockInfo=clock,
        nvmlDeviceGetCurrentClocksEventReasons=events,
        nvmlDeviceGetTotalEnergyConsumption=lambda h: 0,
    )


def test_clock_power_and_held_down_share(monkeypatch):
    monkeypatch.setattr(gpu, "_nvml", lambda: _fake_nvml([True, False, False, False]))
    s = gpu.GpuSampler([0, 1], interval_s=0.0)
    s.samples = [[tuple(s._read(r, h) for r in s._readers()) for h in s.handles] for _ in range(4)]
    s._thread, s._e0 = types.SimpleNamespace(join=lambda timeout: None), None
    out = s.stop(tokens=4)
    assert out["power_w_mean"] == 1100.0  # summed over the GPUs
    assert out["sm_clock_mhz_mean"] == 1550.0
    assert out["clock_held_down_share"] == 0.25  # the first sample: GPU 0 at its power cap
    assert out["gpu_util_mean"] == 90.5


def test_a_column_the_driver_lacks_is_absent(monkeypatch):
    monkeypatch.setattr(gpu, "_nvml", lambda: _fake_nvml([False], clock_error=True))
    s = gpu.GpuSampler([0], interval_s=0.001).start()
    deadline = time.monotonic() + 10
    while len(s.samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # waits for the sampler thread, times nothing
    out = s.stop(tokens=1)
    assert "sm_clock_mhz_mean" not in out and out["clock_held_down_share"] == 0.0
    assert out["power_w_mean"] == 500.0
