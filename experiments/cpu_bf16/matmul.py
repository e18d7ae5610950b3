"""This machine's bare 2,048^2 matmul speed in fp32 and bf16 (one thread, as the training runs): the
ceiling the training-speed ratio is compared with. Prints one JSON line; run.sh saves it as matmul.json."""
from __future__ import annotations

import json
import platform
import re
import time

import torch


def gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):  # warm-up: oneDNN picks and caches its kernel on the first calls
        a @ b
    best = float("inf")
    for _ in range(repeats):  # best of N: the 2 cores are shared, the minimum is the least disturbed
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def cpu_info() -> dict:
    text = open("/proc/cpuinfo").read()
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    return {"cpu": model.group(1) if model else platform.processor(),
            "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


if __name__ == "__main__":
    torch.set_num_threads(1)
    fp32, bf16 = gflops(torch.float32), gflops(torch.bfloat16)
    print(json.dumps({**cpu_info(), "threads": 1, "n": 2048, "fp32_gflops": round(fp32, 1),
                      "bf16_gflops": round(bf16, 1), "bf16_over_fp32": round(bf16 / fp32, 2),
                      "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                      "load": open("/proc/loadavg").read().split()[0]}))
