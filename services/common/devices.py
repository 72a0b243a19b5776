"""Where and in which dtype a model runs: the names users and configs write, resolved once; and
how much memory a device has left for it.

`auto` device: CUDA when available, else CPU. `auto` dtype: bf16 (the release dtype) on CUDA,
fp32 on CPU, where bf16 matmuls are slower at small sizes and less exact. Pure torch.
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def available_memory(device: torch.device) -> int:
    """Bytes this process can still take on `device`: free GPU memory, or on CPU what
    `host_memory_available` says."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_memory_available()


def host_memory_available() -> int:
    """Bytes this machine can give now: the kernel's MemAvailable, and no more than the cgroup's
    limit (a container's) less its usage where there is a limit."""
    available = 8 << 30  # no /proc: assume a small machine
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit():
            available = min(available, max(0, int(limit) - int(usage)))
        break
    return available
