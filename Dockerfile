# One image for the API and the worker.
#   docker build -t toronto-ai-team-agent .
#   API instance: docker run -p 8000:8000 toronto-ai-team-agent
#   worker:       docker run toronto-ai-team-agent python -m app.worker.start

ARG PYTHON_VERSION=3.11

# Build stage: compilers are here only, for any dependency without a binary wheel.
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# sentence-transformers needs torch; its exact version selects the CPU build, as in
# scripts/bootstrap.sh, instead of a CUDA build of several gigabytes.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install .

# Runtime stage: the virtualenv and the entry points, no compilers, a non-root user.
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 toronto \
    && useradd --system --uid 10001 --gid toronto --create-home --home-dir /home/toronto toronto
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root deploy.py ./
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORONTO_AI_HOST=0.0.0.0 \
    TORONTO_AI_PORT=8000 \
    TORONTO_AI_LOG_FORMAT=json
USER toronto:toronto
EXPOSE 8000
# Liveness of an API instance; docker-compose.yml turns it off for workers, which serve no HTTP.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["python", "deploy.py"]
