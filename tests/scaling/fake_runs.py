"""A stand-in for launch/pretrain.py: writes the result.json and metrics.jsonl a finished run leaves.

Metrics follow known laws so that tests can check the report's fits: hr@10 = 0.02 ln(dense) - 0.1 + 0.01
ln(seq len), loss = 50 * C^-0.1 with C = flops_per_token * tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HIDDEN_TO_DENSE = {32: 10_000, 64: 40_000, 128: 160_000}


def parse_overrides(cmd: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in cmd if "=" in arg and not arg.startswith("-"))


def expected_hr(dense: int, seq_len: int) -> float:
    return 0.02 * math.log(dense) - 0.1 + 0.01 * math.log(seq_len)


def fake_runner(calls: list[list[str]], fail_names: tuple[str, ...] = ()):
    def run(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
        calls.append(cmd)
        o = parse_overrides(cmd)
        out = Path(o["train.output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        if any(out.name == n for n in fail_names):
            return 1
        dense = HIDDEN_TO_DENSE[int(o.get("model.overrides.hidden_size", 128))]
        seq_len, steps = int(o["data.max_seq_len"]), int(o["train.max_steps"])
        fpt = 6.0 * dense + 6.0 * seq_len
        tokens = 2048 * steps
        loss = 50.0 * (fpt * tokens) ** -0.1
        with open(out / "metrics.jsonl", "w") as f:
            for step in range(1, steps + 1):
                f.write(json.dumps({"step": step, "loss": loss * (1 + 1.0 / step), "tokens_per_s": 1000.0}) + "\n")
            f.write(json.dumps({"step": steps, "loss": loss, "tokens_per_s": 1000.0}) + "\n")  # re-logged: last wins
            f.write(json.dumps({"step": steps, "test/hr@10": 0.1}) + "\n")  # the final eval, at the same step
        hr = expected_hr(dense, seq_len)
        result = {"eval": {"test/hr@10": hr, "test/ndcg@10": hr / 2, "test/mrr": hr / 3, "test/pop_hr@10": 0.05,
                           "valid/hr@10": 1.5 * hr, "valid/ndcg@10": 0.75 * hr},
                  "params": {"dense": dense, "embedding": 1000, "total": dense + 1000}, "flops_per_token": fpt,
                  "max_steps": steps, "tokens_budgeted": tokens, "world_size": 1, "preset": "lum-tiny",
                  "max_seq_len": seq_len}
        (out / "result.json").write_text(json.dumps(result))
        return 0

    return run
