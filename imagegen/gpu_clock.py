"""The GPU's SM clock and power draw while something is timed, read through NVML (the driver's
libnvidia-ml, called with ctypes; nothing to install), so a benchmark row says whether the card ran at its
boost clock or was held down by its power limit.

    with ClockSampler() as clocks:        # samples every 50 ms in a thread
        ms = time_ms(step)
    clocks.summary()   # {"sm_mhz": median MHz, "power_w": median W, "power_capped": share of samples, ...}

On an H200 the 12288 x 2 sparse training step drew its 700 W limit and ran at 1400-1650 MHz, the anchor GPT
at 1830-1890 MHz (nvidia-smi beside the train stage, benchmarks/h200n): there kernel time saved does not
become step time one for one. Without NVML (a CPU machine, no driver) the summary is empty.
"""

from __future__ import annotations

import ctypes
import functools
import statistics
import threading

import torch

_CLOCK_SM = 1  # nvmlClockType_t NVML_CLOCK_SM
_SW_POWER_CAP, _HW_SLOWDOWN, _SW_THERMAL = 0x4, 0x8, 0x20  # nvmlClocksEventReasons bits


@functools.cache
def _nvml() -> ctypes.CDLL | None:
    for name in ("libnvidia-ml.so.1", "libnvidia-ml.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.nvmlInit_v2() == 0:
            return lib
    return None


def _handle(lib: ctypes.CDLL, device: int) -> ctypes.c_void_p | None:
    """The NVML handle of CUDA device `device`, found by its PCI bus id (NVML's indices ignore
    CUDA_VISIBLE_DEVICES)."""
    handle = ctypes.c_void_p()
    props = torch.cuda.get_device_properties(device)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
        if lib.nvmlDeviceGetHandleByPciBusId_v2(pci.encode(), ctypes.byref(handle)) == 0:
            return handle
    return handle if lib.nvmlDeviceGetHandleByIndex_v2(device, ctypes.byref(handle)) == 0 else None


def summarize(samples: list[tuple[int, float, int]]) -> dict:
    """(SM MHz, W, clock-event reasons) samples -> medians and the share of samples held down by the power limit
    (software power cap or hardware slowdown) and by temperature."""
    if not samples:
        return {}
    return {"sm_mhz": statistics.median(s[0] for s in samples),
            "power_w": statistics.median(s[1] for s in samples),
            "power_capped": sum(1 for s in samples if s[2] & (_SW_POWER_CAP | _HW_SLOWDOWN)) / len(samples),
            "thermal": sum(1 for s in samples if s[2] & _SW_THERMAL) / len(samples),
            "samples": len(samples)}


class ClockSampler:
    """Samples the current CUDA device's SM clock, power and clock-event reasons every `period_s` while the
    `with` block runs; summary() as summarize()."""

    def __init__(self, period_s: float = 0.05):
        self.period_s, self.samples = period_s, []
        self._stop, self._thread = threading.Event(), None

    @staticmethod
    def _read(lib, handle, get_reasons) -> tuple[int, float, int] | None:
        mhz, mw, reasons = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_ulonglong()
        if (lib.nvmlDeviceGetClockInfo(handle, _CLOCK_SM, ctypes.byref(mhz)) != 0
                or lib.nvmlDeviceGetPowerUsage(handle, ctypes.byref(mw)) != 0):
            return None
        if get_reasons is None or get_reasons(handle, ctypes.byref(reasons)) != 0:
            reasons.value = 0
        return mhz.value, mw.value / 1e3, reasons.value

    def _run(self, lib, handle) -> None:
        get_reasons = (getattr(lib, "nvmlDeviceGetCurrentClocksEventReasons", None)
                       or getattr(lib, "nvmlDeviceGetCurrentClocksThrottleReasons", None))  # the older name
        while not self._stop.wait(self.period_s):
            sample = self._read(lib, handle, get_reasons)
            if sample is not None:
                self.samples.append(sample)

    def __enter__(self):  # -> the sampler itself
        lib = _nvml() if torch.cuda.is_available() else None
        handle = _handle(lib, torch.cuda.current_device()) if lib is not None else None
        if handle is not None:
            self._thread = threading.Thread(target=self._run, args=(lib, handle), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict:
        return summarize(self.samples)
