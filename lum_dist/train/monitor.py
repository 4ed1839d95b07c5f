"""What the user sees while training: a log line per step, a metrics file, wandb, MFU.

MFU = achieved model FLOP/s / peak FLOP/s of the hardware, with model FLOPs from
``lum_dist.model.config.flops_per_token`` (fwd + bwd, dense matmuls + causal attention).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

# Dense (no sparsity) peak TFLOP/s per device, from the vendors' data sheets.
PEAK_TFLOPS_BF16 = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "V100": 125.0,  # fp16 tensor cores (no bf16)
}


def peak_flops(device: torch.device, bf16: bool = True) -> float | None:
    """Peak FLOP/s of ``device`` for the run's precision, or None where no honest figure exists (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS_BF16.items():  # dict order: more specific names first
        if key in name:
            return tflops * 1e12 if bf16 else tflops * 1e12 / 2  # tf32 is half the bf16 rate
    return None


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory of this process (CUDA) or its peak resident set size (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class Throughput:
    """Tokens/s and MFU over the steps since the last report (the first step, with warm-up, is skipped)."""

    def __init__(self, flops_per_token: float, peak: float | None, world_size: int):
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
        self.tokens = 0
        self.t0: float | None = None

    def step(self, global_tokens: int) -> None:
        if self.t0 is None:  # step 1 includes compilation, allocation and warm-up
            self.t0 = time.perf_counter()
            return
        self.tokens += global_tokens

    def report(self) -> dict[str, float]:
        if self.t0 is None or self.tokens == 0:
            return {}
        dt = time.perf_counter() - self.t0
        tps = self.tokens / dt
        out = {"tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world_size}
        if self.peak:
            out["mfu"] = tps * self.flops_per_token / (self.peak * self.world_size)
        self.tokens, self.t0 = 0, time.perf_counter()
        return out


class MetricsLogger:
    """Rank 0 only: per-step JSON lines in ``<output_dir>/metrics.jsonl`` plus wandb (offline by default)."""

    def __init__(self, output_dir: Path, run_config: dict[str, Any], project: str, mode: str, name: str,
                 enabled: bool):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", mode)
        if mode != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(project=project, name=name or None, mode=mode, config=run_config,
                                        dir=str(output_dir), resume="allow")
            except Exception as e:  # logging must never take training down
                print(f"[lum-dist] wandb unavailable ({e}); logging to {self.path} only")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def format_line(step: int, max_steps: int, m: dict[str, float]) -> str:
    parts = [f"step {step:>6}/{max_steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}"]
    if "tokens_per_s" in m:
        parts.append(f"tok/s {m['tokens_per_s']:,.0f}")
    parts.append(f"mfu {100 * m['mfu']:.1f}%" if "mfu" in m else "mfu n/a")
    parts.append(f"mem {m['mem_gib']:.2f}GiB")
    return " | ".join(parts)


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """Per-step metrics of a run, the records of one step merged (a later value of a key wins).

    A step can have several records: the final evaluation is logged at the last training step, and a
    step re-run after a resume is logged again (its newer values replace the older ones)."""
    out: dict[int, dict[str, float]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], {}).update(rec)
    return out
