# Image for every llm-twin process of the compose stack: primary, twins and
# alert sink. docker-compose.yml picks the role with the command after the
# `llm-twin` entrypoint (`primary`, `twin`, `alert-sink`) and configures it
# through LLM_TWIN_* environment variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build reads is copied (see .dockerignore), so edits to
# tests, docs or deploy configuration do not invalidate this layer.
WORKDIR /build
COPY pyproject.toml README.md ./
COPY monitor ./monitor
RUN pip install . \
    && rm -rf /build

RUN useradd --system --create-home --uid 10001 llmtwin
USER llmtwin
WORKDIR /home/llmtwin

# /metrics (and the alert sink's webhook) listen on every interface of the
# container, so Prometheus and Alertmanager reach them over the compose network.
ENV LLM_TWIN_METRICS_HOST=0.0.0.0 \
    LLM_TWIN_METRICS_PORT=9400
EXPOSE 9400

ENTRYPOINT ["llm-twin"]
CMD ["--help"]
