"""Per-GPU memory model of LUM pretraining under DeepSpeed ZeRO, and how many GPUs each preset needs.

Model states (ZeRO paper, Rajbhandari et al. 2020, sec. 3 and fig. 1), mixed-precision Adam over psi
parameters on N data-parallel GPUs: 2 psi bf16 params + 2 psi bf16 grads + K psi optimizer states with
K = 12 (fp32 master params, Adam m and v: 4 + 4 + 4 bytes), i.e. 16 bytes per parameter:

    stage 0:  2 psi + 2 psi + K psi          stage 2:  2 psi + (2 + K) psi / N
    stage 1:  2 psi + 2 psi + K psi / N      stage 3:  (2 + 2 + K) psi / N

Optimizer offload moves the K psi (/N) term to CPU memory; parameter offload (stage 3 only) moves the
2 psi / N parameter shard too. Under stage 3 each GPU also holds the parameters it has gathered for the
current computation: the layer being computed plus one prefetched (2 x 2 bytes x layer params) and the
embedding tables, which the token encoder and the InfoNCE item lookups gather whole (2 bytes x params).

Activations, bytes per token per decoder layer, bf16, FlashAttention (no seq^2 scores kept), hidden h,
SwiGLU width I, heads a:
    2h  RMSNorm-1 input            2h  QKV projection input       6h  q, k, v (attention inputs)
    2h  attention output (= output projection input)              4a  softmax log-sum-exp (fp32)
    2h  RMSNorm-2 input            2h  gate/up projection input
    8I  gate and up outputs, silu(gate), silu(gate) * up (down projection input)
  = 16h + 8I + 4a.  With activation checkpointing each layer keeps only its input (2h) and one layer's
  activations are live again during its recomputation in the backward pass.
Outside the layers, per token: encoder output, final-norm input and output-projection input (3 x 2h), the
projection output in bf16 (2E) and its fp32 and normalised fp32 copies for the loss (2 x 4E), E = item_emb_dim.
InfoNCE logits: every target (one per behaviour: tokens / 2) scores the targets of all N ranks; three fp32
matrices of that size live at once (logits, softmax saved for backward, its gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lum_dist.model import load_preset, param_counts

GiB = 2**30
H100_80GB = 80 * GiB
ADAM_STATE_BYTES = 12  # K: fp32 master copy + Adam m + Adam v
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    item_emb_dim: int
    dense_params: int
    embedding_params: int

    @property
    def params(self) -> int:
        return self.dense_params + self.embedding_params

    @property
    def layer_params(self) -> int:
        """Matmul parameters of one decoder block: q, k, v, o (4 h^2) and SwiGLU gate, up, down (3 h I)."""
        h = self.hidden_size
        return 4 * h * h + 3 * h * self.intermediate_size


@dataclass(frozen=True)
class TrainSetup:
    num_gpus: int = 8
    zero_stage: int = 3
    micro_batch_tokens: int = 8192  # tokens per GPU per micro-step (token_budget x rows_per_batch)
    activation_checkpointing: bool = True
    offload_optimizer: bool = False
    offload_params: bool = False
    reserved_bytes: int = 2 * GiB  # CUDA context, NCCL buffers, allocator fragmentation

    def __post_init__(self) -> None:
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage={self.zero_stage}: expected one of {ZERO_STAGES}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage=3 (as in DeepSpeed)")
        if self.num_gpus < 1 or self.micro_batch_tokens < 1:
            raise ValueError(f"num_gpus and micro_batch_tokens must be >= 1, got {self.num_gpus}, "
                             f"{self.micro_batch_tokens}")


def model_state_bytes(params: int, setup: TrainSetup) -> dict[str, float]:
    """GPU bytes of bf16 params, bf16 grads and fp32 optimizer states (ZeRO paper formulas)."""
    n, s = setup.num_gpus, setup.zero_stage
    p = 2 * params / (n if s >= 3 else 1)
    g = 2 * params / (n if s >= 2 else 1)
    o = ADAM_STATE_BYTES * params / (n if s >= 1 else 1)
    return {"params": 0.0 if setup.offload_params else p, "grads": g,
            "optimizer": 0.0 if setup.offload_optimizer else o}


def activation_bytes_per_token_layer(shape: ModelShape) -> int:
    """Saved activations of one decoder layer per token (see the module docstring): 16h + 8I + 4a."""
    return 16 * shape.hidden_size + 8 * shape.intermediate_size + 4 * shape.num_heads


def activation_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    """Activations of one micro-batch, layers plus the encoder/head, with or without checkpointing."""
    t, layer = setup.micro_batch_tokens, activation_bytes_per_token_layer(shape)
    if setup.activation_checkpointing:
        layers = t * (2 * shape.hidden_size * shape.num_layers + layer)
    else:
        layers = t * layer * shape.num_layers
    head = t * (6 * shape.hidden_size + 10 * shape.item_emb_dim)
    return float(layers + head)


def loss_bytes(setup: TrainSetup) -> float:
    """InfoNCE logits: (tokens/2) targets x (N x tokens/2) candidates, three fp32 copies."""
    targets = setup.micro_batch_tokens / 2
    return 3 * 4 * targets * targets * setup.num_gpus


def gathered_param_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    """ZeRO-3 working set: current + prefetched layer and the embedding tables, gathered in bf16."""
    if setup.zero_stage != 3:
        return 0.0
    return 2.0 * (2 * shape.layer_params + shape.embedding_params)


def per_gpu_bytes(shape: ModelShape, setup: TrainSetup) -> dict[str, float]:
    """Breakdown of the peak GPU memory of one rank, with the sum under "total"."""
    out = model_state_bytes(shape.params, setup)
    out.update(gathered=gathered_param_bytes(shape, setup), activations=activation_bytes(shape, setup),
               loss=loss_bytes(setup), reserved=float(setup.reserved_bytes))
    out["total"] = sum(out.values())
    return out


def gpus_needed(shape: ModelShape, gpu_bytes: float, setup: TrainSetup, max_gpus: int = 4096,
                usable_fraction: float = 0.9) -> int | None:
    """Fewest GPUs (a power of two) on which ``setup`` fits in ``usable_fraction`` of ``gpu_bytes``.

    None if no count up to ``max_gpus`` fits (stages 0-2 keep full bf16 params on every GPU, and the
    gathered-negatives logits grow with N)."""
    n = 1
    while n <= max_gpus:
        if per_gpu_bytes(shape, replace(setup, num_gpus=n))["total"] <= usable_fraction * gpu_bytes:
            return n
        n *= 2
    return None


def shape_from_preset(name: str, num_items: int, cond_vocab_sizes: list[int] = (1000,),
                      **overrides: Any) -> ModelShape:
    """The ModelShape of a preset from configs/model/ (via lum_dist.model.load_preset/param_counts)."""
    cfg = load_preset(name, num_items=num_items, cond_vocab_sizes=list(cond_vocab_sizes), **overrides)
    counts = param_counts(cfg)
    return ModelShape(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.item_emb_dim,
                      int(counts["dense"]), int(counts["embedding"]))


def gpus_table(shapes: dict[str, ModelShape], gpu_bytes: float = H100_80GB,
               setup: TrainSetup = TrainSetup()) -> list[dict[str, Any]]:
    """One row per preset: parameters, GiB per GPU at ``setup.num_gpus`` and fewest GPUs per ZeRO stage."""
    rows = []
    for name, shape in shapes.items():
        row: dict[str, Any] = {"preset": name, "dense_params": shape.dense_params,
                               "embedding_params": shape.embedding_params}
        for stage in ZERO_STAGES:
            s = replace(setup, zero_stage=stage, offload_params=setup.offload_params and stage == 3)
            row[f"zero{stage}_gib_at_{setup.num_gpus}"] = per_gpu_bytes(shape, s)["total"] / GiB
            row[f"zero{stage}_min_gpus"] = gpus_needed(shape, gpu_bytes, s)
        rows.append(row)
    return rows
