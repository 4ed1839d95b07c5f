"""``pretrain`` called from Python (a notebook, a sweep, a test) leaves the process as it found it: the process
group it made is gone (torch's and DeepSpeed's), so a second call in the same process trains again, also after a
call that failed; a group the caller made is left alive. Run in a child process, so a failure cannot leak a group
into the test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from pathlib import Path
import torch.distributed as dist
from lum_dist.config import PretrainConfig, load_config
from lum_dist.train.trainer import pretrain

work = Path(sys.argv[1])

def run(out, *overrides):
    cfg = load_config(PretrainConfig, "configs/pretrain/debug-cpu.yaml", [
        f"data.path={work / 'data'}", f"train.output_dir={work / out}", "train.max_steps=2", "train.save_every=0",
        "eval.final_splits=[valid]", "eval.max_users=10", *overrides])  # ZeRO-3, the DeepSpeed engine's full path
    return pretrain(cfg)

try:  # fails once the group is made: the raw file is missing
    run("failed", f"data.path={work / 'missing-data'}", "data.prepare={format: s3rec, input: " + str(work / 'no.txt') + "}")
except Exception as err:
    print("after failure:", type(err).__name__, "group alive", dist.is_initialized(), flush=True)
run("first")
print("after first: group alive", dist.is_initialized(), flush=True)
run("second")
print("after second: group alive", dist.is_initialized(), flush=True)
dist.init_process_group("gloo", init_method=f"file://{work / 'init'}", rank=0, world_size=1)
run("third")
print("callers group alive", dist.is_initialized(), flush=True)
dist.destroy_process_group()
"""


def test_pretrain_closes_the_group_it_made_and_keeps_the_callers(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "after failure: FileNotFoundError group alive False" in proc.stdout  # closed on the way out too
    assert "after first: group alive False" in proc.stdout
    assert "after second: group alive False" in proc.stdout  # DeepSpeed started afresh and closed again
    assert "callers group alive True" in proc.stdout
    for out in ("first", "second", "third"):
        assert (tmp_path / out / "result.json").is_file()
