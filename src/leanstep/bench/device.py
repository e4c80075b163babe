"""What a measurement ran on: the CPU or GPU's name, and RAM available."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["available_memory_mib", "cpu_model", "device_name"]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; platform's answer elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, the CPU's model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def available_memory_mib() -> float | None:
    """RAM available to new allocations without swapping (MemAvailable), in MiB."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return None
