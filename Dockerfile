# lum-dist for CUDA clusters: PyTorch + CUDA base, the `gpu` extra (flash-attn, triton), DeepSpeed ops prebuilt.
#   docker build -t lum-dist .
#   docker run --gpus all --ipc=host -v /data:/data lum-dist \
#       deepspeed launch/pretrain.py --config configs/pretrain/1gpu-1b.yaml
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline \
    # Build the DeepSpeed ops the trainer can use at image build time, not on the first step of every job.
    DS_BUILD_CPU_ADAM=1 \
    DS_BUILD_FUSED_ADAM=1 \
    DS_BUILD_UTILS=1 \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"

RUN apt-get update && apt-get install -y --no-install-recommends git ninja-build libaio-dev pdsh \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/lum-dist
COPY pyproject.toml README.md ./
COPY lum_dist ./lum_dist
COPY kernels ./kernels
# deepspeed with its ops compiled against this image's torch; flash-attn builds against it too.
RUN pip install --no-build-isolation deepspeed \
    && pip install --no-build-isolation flash-attn \
    && pip install -e ".[gpu]"
COPY launch ./launch
COPY configs ./configs
COPY benchmarks ./benchmarks
COPY tests ./tests
CMD ["bash"]
