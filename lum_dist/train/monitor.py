"""What the user sees while training: a log line per step, a metrics file, wandb, MFU.

MFU = achieved model FLOP/s / peak FLOP/s of the hardware, with each batch's model FLOPs from the model
config's ``train_flops`` over the batch's real sequence lengths (fwd + bwd, dense matmuls + causal attention).
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

# Dense (no sparsity) peak TFLOP/s per device from the vendors' data sheets: bf16 tensor cores, and fp32 without
# tensor cores. TF32 tensor cores run at half the bf16 rate on every listed part.
PEAK_TFLOPS = {  # name: (bf16, fp32); dict order: more specific names first
    "H200": (989.0, 67.0),
    "H100 SXM": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100 NVL": (835.0, 60.0),
    "H100": (989.0, 67.0),
    "GH200": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "A10G": (125.0, 31.2),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
}


def tf32_enabled() -> bool:
    """Whether float32 matmuls may run on TF32 tensor cores (torch's default is no)."""
    return torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


def peak_flops(device: torch.device, bf16: bool = True) -> float | None:
    """Peak FLOP/s of ``device`` for the run's matmul precision: bf16 tensor cores; fp32 on TF32 tensor cores
    (half the bf16 rate) when TF32 is enabled, else plain fp32. None where no honest figure exists (the CPU,
    an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16_tflops, fp32_tflops) in PEAK_TFLOPS.items():
        if key in name:
            if bf16:
                return bf16_tflops * 1e12
            return (bf16_tflops / 2 if tf32_enabled() else fp32_tflops) * 1e12
    return None


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory of this process (CUDA) or its peak resident set size (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class Throughput:
    """Tokens/s, MFU and the data-wait share over the steps since the last report.

    Only training steps count (fetching the batch, forward, backward, optimizer): evaluation and checkpoint
    time fall between steps and are excluded. The first step (compilation, allocation) is skipped.
    """

    def __init__(self, peak: float | None, world_size: int):
        self.peak, self.world_size = peak, world_size
        self.tokens, self.flops, self.seconds, self.data_seconds, self.steps = 0, 0.0, 0.0, 0.0, 0

    def step(self, global_tokens: int, global_flops: float, seconds: float, data_seconds: float) -> None:
        """One optimizer step: tokens and model FLOPs of every rank, this rank's step and data-wait time."""
        self.steps += 1
        if self.steps == 1:
            return
        self.tokens += global_tokens
        self.flops += global_flops
        self.seconds += seconds
        self.data_seconds += data_seconds

    def report(self) -> dict[str, float]:
        if self.seconds <= 0:
            return {}
        out = {"tokens_per_s": self.tokens / self.seconds,
               "tokens_per_s_per_device": self.tokens / self.seconds / self.world_size,
               "tflops_per_device": self.flops / self.seconds / self.world_size / 1e12,
               "data_wait": self.data_seconds / self.seconds}
        if self.peak:
            out["mfu"] = self.flops / self.seconds / (self.peak * self.world_size)
        self.tokens, self.flops, self.seconds, self.data_seconds = 0, 0.0, 0.0, 0.0
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
    if "data_wait" in m:
        parts.append(f"data {100 * m['data_wait']:.0f}%")
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
