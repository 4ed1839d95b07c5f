"""The weight average (``optim.ema_decay``): its arithmetic against a float64 loop, the swap that must give the
trained weights back bit for bit, its checkpoint file, and the whole tensors rebuilt from ZeRO-3 shards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lum_dist.checkpoint import CheckpointError, averaged_weights, ema_file
from lum_dist.config import ConfigError, OptimConfig
from lum_dist.train.ema import WeightAverage


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3, bias=False))


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def test_the_average_is_uniform_for_its_first_steps_then_exponential():
    decay, steps = 0.75, 9  # uniform for the first 1 / (1 - 0.75) = 4 updates
    model = _model()
    average = WeightAverage(model.named_parameters(), decay)
    reference = [p.detach().double().clone() for p in model.parameters()]
    seen: list[list[torch.Tensor]] = []
    for n in range(1, steps + 1):
        _perturb(model)
        seen.append([p.detach().double().clone() for p in model.parameters()])
        average.update()
        rate = max(1 - decay, 1 / n)
        reference = [r + rate * (w - r) for r, w in zip(reference, seen[-1], strict=True)]
        if n <= 4:  # the plain mean of every weight seen so far
            mean = [torch.stack(ws).mean(0) for ws in zip(*seen, strict=True)]
            for s, m in zip(average.shadow, mean, strict=True):
                torch.testing.assert_close(s.double(), m, rtol=1e-6, atol=1e-6)
    for s, r in zip(average.shadow, reference, strict=True):
        torch.testing.assert_close(s.double(), r, rtol=1e-6, atol=1e-6)
    assert average.rate() == pytest.approx(1 - decay)


def test_swapped_in_gives_the_average_inside_and_the_trained_weights_back_bit_for_bit():
    model = _model()
    average = WeightAverage(model.named_parameters(), 0.9)
    for _ in range(3):
        _perturb(model)
        average.update()
    trained = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 5)
    with average.swapped_in():
        for p, s in zip(model.parameters(), average.shadow, strict=True):
            assert torch.equal(p, s)
        averaged_out = model(x)
    for p, t in zip(model.parameters(), trained, strict=True):
        assert torch.equal(p, t)
    assert not torch.allclose(model(x), averaged_out)  # the average is not the trained weights


def test_the_saved_average_loads_back_with_weights_only_and_refuses_another_model(tmp_path):
    model = _model()
    average = WeightAverage(model.named_parameters(), 0.9)
    _perturb(model)
    average.update()
    torch.save(average.state_dict(), tmp_path / "ema.pt")
    again = WeightAverage(_model(seed=1).named_parameters(), 0.9)
    again.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert again.updates == 1
    for a, b in zip(again.shadow, average.shadow, strict=True):
        assert torch.equal(a, b)
    other = WeightAverage(nn.Linear(5, 7).named_parameters(), 0.9)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(average.state_dict())


def test_averaged_weights_joins_zero3_shards_in_rank_order_and_cuts_the_padding(tmp_path):
    full = {"model.w": torch.randn(3, 5), "model.b": torch.randn(7)}
    world = 2
    states = []
    for rank in range(world):  # ZeRO-3's partitions: ceil(numel / world) each, the last one zero-padded
        shards = []
        for t in full.values():
            size = -(-t.numel() // world)
            flat = torch.cat([t.reshape(-1), torch.zeros(size * world - t.numel())])
            shards.append(flat[rank * size:(rank + 1) * size].clone())
        states.append({"decay": 0.9, "updates": 3, "names": list(full), "shadow": shards,
                       "numels": [t.numel() for t in full.values()], "sharded": True})
    for rank, state in enumerate(states):
        torch.save(state, tmp_path / ema_file(rank))
    rebuilt = averaged_weights(tmp_path, {k: v.shape for k, v in full.items()})
    assert rebuilt.keys() == full.keys()
    for k in full:
        assert torch.equal(rebuilt[k], full[k]), k
    # Only what is asked for (a model without its loss's parameters), and a name without an average is an error.
    assert averaged_weights(tmp_path, {"model.b": full["model.b"].shape}).keys() == {"model.b"}
    with pytest.raises(CheckpointError, match=r"holds no average of \['model.c'\]"):
        averaged_weights(tmp_path, {"model.b": full["model.b"].shape, "model.c": torch.Size([2])})


def test_averaged_weights_names_a_checkpoint_without_them(tmp_path):
    with pytest.raises(CheckpointError, match="holds no ema_rank0.pt"):
        averaged_weights(tmp_path, {})


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_ema_decay_outside_zero_to_one_is_a_config_error(decay):
    with pytest.raises(ConfigError, match="ema_decay"):
        OptimConfig(ema_decay=decay)
