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


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _library_versions() -> dict[str, str]:
    """MKL and oneDNN versions from torch's build summary (they pick kernels by CPU model)."""
    found = {}
    for line in torch.__config__.show().splitlines():
        line = line.strip(" -")
        if "Math Kernel Library Version" in line:
            found["mkl"] = line.split("Version", 1)[1].split()[0].removesuffix("-Product")
        elif line.startswith(("Intel(R) MKL-DNN v", "Intel(R) oneDNN v")):
            found["onednn"] = line.split(" v", 1)[1].split()[0]
    return found


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX): there, bf16 autocast
    halves conv time; elsewhere it is emulated and slower than float32."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


# Environment variables that change which float kernels run (and so the last bits of results).
CODE_PATH_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS")


def cpu_code_path() -> dict:
    """Which CPU code path float results come from: ATen's kernel level, native bf16, the
    libraries' versions and any variable that overrides their choice."""
    return {
        "cpu": _cpu_model(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
        **_library_versions(),
        **{k: os.environ[k] for k in CODE_PATH_VARIABLES if k in os.environ},
    }


def environment(device: torch.device | str | None = None) -> dict:
    """Hardware and versions as a JSON-ready dict."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    info = {
        "hardware": {
            "device": str(device),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_code_path": cpu_code_path(),
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
