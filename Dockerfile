# delf-es image: the CLI / SDK and the Celery workers (docker-compose.yml runs it as `worker`,
# `gpu-worker`, `beat` and `cli`).  CPU build by default; for the GPU worker build with
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t delf-es:gpu .
FROM python:3.11-slim

# Torch comes from PyTorch's own index (CPU wheels: ~10x smaller than PyPI's CUDA ones);
# versions as pinned in pyproject.toml.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.15.0
ARG TORCHVISION_VERSION=0.29.2

# libgl1 / libglib2.0-0: OpenCV (pydegensac's RANSAC needs cv2); curl: health checks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY pyproject.toml README.md ./
COPY delf_es ./delf_es
COPY mappings ./mappings
# A regular install: the wheel ships mappings/ inside the package (delf_es/mappings).
RUN pip install --no-cache-dir .

RUN useradd --create-home --uid 1000 delf && mkdir -p /data && chown delf /data
USER delf
ENV DELF_ES_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
ENTRYPOINT ["delf-es"]
CMD ["--help"]
