"""Description of the machine a run or a benchmark ran on."""

from __future__ import annotations

import platform


def cpu_model_name() -> str:
    """Return the CPU's model name from /proc/cpuinfo, or the platform's processor or machine name elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
