"""The memory model against hand-computed cases (the ZeRO paper's 7.5B example) and its activation formula."""

from dataclasses import replace

import pytest

from lum_dist.scaling.memory import (
    GiB,
    ModelShape,
    TrainSetup,
    activation_bytes,
    activation_bytes_per_token_layer,
    gpus_needed,
    gpus_table,
    loss_bytes,
    model_state_bytes,
    per_gpu_bytes,
)

PSI = 7_500_000_000


@pytest.mark.parametrize("stage, expected_gb", [(0, 120.0), (1, 31.40625), (2, 16.640625), (3, 1.875)])
def test_zero_paper_example(stage, expected_gb):
    # ZeRO paper fig. 1: 7.5B parameters, N_d = 64, K = 12 -> 120 / 31.4 / 16.6 / 1.9 GB.
    states = model_state_bytes(PSI, TrainSetup(num_gpus=64, zero_stage=stage))
    assert sum(states.values()) / 1e9 == pytest.approx(expected_gb)


def test_offload_moves_terms_off_the_gpu():
    s = model_state_bytes(PSI, TrainSetup(num_gpus=64, zero_stage=3, offload_optimizer=True))
    assert s == {"params": 2 * PSI / 64, "grads": 2 * PSI / 64, "optimizer": 0.0}
    s = model_state_bytes(PSI, TrainSetup(num_gpus=64, zero_stage=3, offload_optimizer=True, offload_params=True))
    assert s["params"] == 0.0 and s["optimizer"] == 0.0
    with pytest.raises(ValueError, match="zero_stage=3"):
        TrainSetup(zero_stage=2, offload_params=True)


SHAPE = ModelShape(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, item_emb_dim=32,
                   dense_params=100_000, embedding_params=50_000)


def test_activations_by_hand():
    per_layer = 16 * 64 + 8 * 128 + 4 * 4  # 2064 bytes per token per layer
    assert activation_bytes_per_token_layer(SHAPE) == per_layer
    head = 6 * 64 + 10 * 32  # 704
    t = 1000
    full = activation_bytes(SHAPE, TrainSetup(micro_batch_tokens=t, activation_checkpointing=False))
    assert full == t * (2 * per_layer + head)
    ckpt = activation_bytes(SHAPE, TrainSetup(micro_batch_tokens=t, activation_checkpointing=True))
    assert ckpt == t * (2 * 2 * 64 + per_layer + head)
    assert ckpt < full


def test_per_gpu_total_by_hand():
    setup = TrainSetup(num_gpus=4, zero_stage=3, micro_batch_tokens=1000, activation_checkpointing=False,
                       reserved_bytes=0)
    out = per_gpu_bytes(SHAPE, setup)
    psi = 150_000
    layer = 4 * 64 * 64 + 3 * 64 * 128
    expected = (16 * psi / 4  # model states
                + 2 * (2 * layer + 50_000)  # gathered: two layers + embeddings, bf16
                + 1000 * (2 * 2064 + 704)  # activations
                + 3 * 4 * 500 * 500 * 4)  # InfoNCE logits: 500 targets x 2000 candidates, 3 fp32 copies
    assert out["total"] == pytest.approx(expected)
    assert loss_bytes(setup) == 3 * 4 * 500 * 2000


def test_gpus_needed():
    big = ModelShape(num_layers=32, hidden_size=4096, num_heads=32, intermediate_size=12288, item_emb_dim=512,
                     dense_params=7_000_000_000, embedding_params=600_000_000)
    setup = TrainSetup(micro_batch_tokens=8192, activation_checkpointing=True)
    n3 = gpus_needed(big, 80 * GiB, replace(setup, zero_stage=3))
    n2 = gpus_needed(big, 80 * GiB, replace(setup, zero_stage=2))
    assert gpus_needed(big, 80 * GiB, replace(setup, zero_stage=0)) is None  # 16 B/param
    # The answer is the smallest power of two that fits: half of it must not fit.
    def fits(stage: int, k: int) -> bool:
        trial = replace(setup, zero_stage=stage, num_gpus=k)
        return per_gpu_bytes(big, trial)["total"] <= 0.9 * 80 * GiB

    for stage, n in ((3, n3), (2, n2)):
        assert n is not None and fits(stage, n) and (n == 1 or not fits(stage, n // 2))
    assert n3 <= n2
    small = ModelShape(2, 64, 4, 128, 32, 100_000, 50_000)
    assert gpus_needed(small, 80 * GiB, setup) == 1
    rows = gpus_table({"big": big, "small": small})
    assert [r["preset"] for r in rows] == ["big", "small"]
    assert rows[0]["zero3_min_gpus"] == n3 and rows[0]["zero0_min_gpus"] is None


def test_shape_from_preset_matches_param_counts():
    from lum_dist.model import load_preset, param_counts
    from lum_dist.scaling.memory import shape_from_preset

    shape = shape_from_preset("lum-1b", num_items=100_000)
    counts = param_counts(load_preset("lum-1b", num_items=100_000, cond_vocab_sizes=[1000]))
    assert (shape.dense_params, shape.embedding_params) == (counts["dense"], counts["embedding"])
    # The decoder blocks are almost all of the dense parameters (the rest: input/output projections, norms).
    assert 0.9 * shape.dense_params < shape.layer_params * shape.num_layers <= shape.dense_params
