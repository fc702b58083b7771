"""What a result was measured on: hardware and software versions, written beside every number."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

import lvat


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str | None = None) -> dict:
    """Hardware and versions as a JSON-ready dict."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    info = {
        "hardware": {
            "device": str(device),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "lvat": lvat.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    }
    if device.type == "cuda":
        info["hardware"]["gpu"] = torch.cuda.get_device_name(device)
        info["versions"]["cuda"] = torch.version.cuda
    return info
