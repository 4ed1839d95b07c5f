"""The MFU denominator (peak FLOP/s for the run's precision, TF32 honest) and the throughput meter."""

from __future__ import annotations

import pytest
import torch

from lum_dist.train import monitor
from lum_dist.train.monitor import Throughput, peak_flops


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3 SXM")
    return torch.device("cuda", 0)


def test_peak_follows_the_precision_and_tf32(h100, monkeypatch):
    assert peak_flops(h100, bf16=True) == 989e12
    monkeypatch.setattr(monitor, "tf32_enabled", lambda: False)
    assert peak_flops(h100, bf16=False) == 67e12  # fp32 matmuls without tensor cores
    monkeypatch.setattr(monitor, "tf32_enabled", lambda: True)
    assert peak_flops(h100, bf16=False) == 494.5e12  # TF32 tensor cores: half the bf16 rate


def test_no_peak_on_the_cpu_or_an_unknown_gpu(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(torch.device("cuda", 0)) is None


def test_throughput_skips_the_first_step_and_counts_only_step_time():
    meter = Throughput(peak=100.0, world_size=2)
    meter.step(1000, 5e4, seconds=9.0, data_seconds=1.0)  # warm-up: skipped
    meter.step(400, 2e3, seconds=2.0, data_seconds=0.1)
    meter.step(600, 2e3, seconds=2.0, data_seconds=0.1)
    out = meter.report()
    assert out["tokens_per_s"] == 250 and out["tokens_per_s_per_device"] == 125
    assert out["mfu"] == pytest.approx(4e3 / 4 / (100 * 2))
    assert out["data_wait"] == pytest.approx(0.05)
    assert meter.report() == {}  # reset after a report
