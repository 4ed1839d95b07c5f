"""Training throughput: tokens/s, MFU and peak memory per preset x sequence length x packing x ZeRO stage.

Each configuration is one real training process (``launch/pretrain.py`` via the sweep launcher) for a
few steps; the numbers are the trainer's own metrics at its last log line (lum_dist.train.monitor:
the first step, with warm-up and allocation, is excluded; tokens are real tokens, not padding, so
"pack" vs "pad" compares useful work: "pad" batches are padded [B, L] rows the model really computes
on, of the same size as a packed row). MFU (useful FLOPs) is reported only on GPUs with a known peak.

    python benchmarks/train_throughput.py --smoke        # CPU: lum-tiny, tiny shapes, a few steps
    python benchmarks/train_throughput.py --presets lum-100m lum-1b --seq-lens 1024 4096 \\
        --launcher torchrun --nproc 8                     # a GPU node

Writes benchmarks/results/train_throughput[_smoke].json (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

from lum_dist.scaling.grid import LauncherConfig, launch_command, subprocess_runner  # noqa: E402
from lum_dist.train.monitor import read_metrics  # noqa: E402

FLOP_FORMULA = ("per batch, the model config's train_flops over the real sequence lengths: 6 * matmul params * "
                "tokens + 12 * layers * hidden * sum_s L_s (L_s + 1) / 2 (fwd + bwd, causal attention); MFU = "
                "model FLOP/s / (peak FLOP/s of the precision * GPUs), evaluation and checkpoint time excluded")


def overrides_for(preset: str, seq_len: int, packing: str, zero: int, steps: int, token_budget: int,
                  out: Path) -> list[str]:
    """Batches of the same size either way: one packed row of ``token_budget`` tokens, or
    token_budget // seq_len rows of one user padded to ``seq_len`` (the model computes on the padding)."""
    budget = max(token_budget, seq_len)
    rows = (f"data.token_budget={budget}", "data.rows_per_batch=1") if packing == "pack" else (
        f"data.token_budget={seq_len}", f"data.rows_per_batch={budget // seq_len}")
    return [f"model.preset={preset}", f"data.max_seq_len={seq_len}", f"data.packing={packing}", *rows,
            f"train.zero_stage={zero}",
            f"train.max_steps={steps}", f"train.log_every={steps}", "train.eval_every=0", "train.save_every=0",
            "train.resume=never", "eval.max_users=8", f"train.output_dir={out}"]


def measure(launcher: LauncherConfig, base: str, overrides: list[str], out: Path,
            runner: Callable[[list[str], dict[str, str], Path], int] = subprocess_runner) -> dict[str, Any]:
    """Run one configuration (``runner(cmd, env, log)`` -> exit status); its last logged throughput record,
    or the failure and its log's tail."""
    rc = runner(launch_command(launcher, base, overrides), _env(launcher), out / "train.log")
    history = read_metrics(out / "metrics.jsonl")
    speeds = [history[s] for s in sorted(history) if "tokens_per_s" in history[s]]
    if rc != 0 or not speeds:
        last = (out / "train.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return {"status": f"failed (exit {rc}): {last[0].strip()[:120]}"}
    m, result = speeds[-1], json.loads((out / "result.json").read_text())
    return {"status": "ok", "dense_params": result["params"]["dense"], "tokens_per_s": m["tokens_per_s"],
            "tokens_per_s_per_device": m.get("tokens_per_s_per_device"),
            "model_tflops_per_s": m["tflops_per_device"] * result["world_size"], "mfu": m.get("mfu"),
            "tflops_per_device": m.get("tflops_per_device"), "data_wait": m.get("data_wait"),
            "peak_mem_gib": m.get("mem_gib"), "final_loss": m.get("loss")}


def _env(launcher: LauncherConfig) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", **launcher.env}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes: lum-tiny, seq 64, 6 steps")
    p.add_argument("--config", default="configs/pretrain/synthetic.yaml", help="base pretraining config")
    p.add_argument("--presets", nargs="+", default=["lum-19m", "lum-100m"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--packing", nargs="+", default=["pack", "pad"], choices=["pack", "pad"])
    p.add_argument("--zero", nargs="+", type=int, default=[2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--token-budget", type=int, default=8192, help="tokens per packed row (at least seq len)")
    p.add_argument("--launcher", default="python", choices=["python", "torchrun"])
    p.add_argument("--nproc", type=int, default=1)
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.presets, args.seq_lens, args.steps, args.token_budget = (
            "configs/pretrain/debug-cpu.yaml", ["lum-tiny"], [64], 6, 256)
    launcher = LauncherConfig(kind=args.launcher, nproc=args.nproc,
                              env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} if args.smoke else {})

    rows = []
    with tempfile.TemporaryDirectory(prefix="lum-train-throughput-") as tmp:
        for preset, seq_len, packing, zero in itertools.product(args.presets, args.seq_lens, args.packing, args.zero):
            out = Path(tmp) / f"{preset}_L{seq_len}_{packing}_z{zero}"
            row = {"preset": preset, "seq_len": seq_len, "packing": packing, "zero_stage": zero,
                   "world_size": launcher.world_size}
            print(f"[train_throughput] {preset} L={seq_len} {packing} ZeRO-{zero} ...", flush=True)
            row.update(measure(launcher, args.config,
                               overrides_for(preset, seq_len, packing, zero, args.steps, args.token_budget, out), out))
            rows.append(row)
    print_table(rows)
    meta = {"base_config": args.config, "steps": args.steps, "token_budget": args.token_budget,
            "launcher": args.launcher, "nproc": args.nproc, "shapes": "presets x seq_lens x packing x zero stages",
            "flop_formula": FLOP_FORMULA}
    path = write_result("train_throughput_smoke" if args.smoke else "train_throughput", rows, meta)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
