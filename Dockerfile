# edgeai-agent's images; the build context is this repository.
#   The Home Assistant app (config.yaml): the last stage, "app", which the Supervisor builds from
#   BUILD_FROM's default below (it passes BUILD_ARCH and BUILD_VERSION, which nothing here needs).
#   It runs as root: the Supervisor owns the app's /data. The agent reads /data/options.json,
#   asks the Supervisor for the broker and announces itself to it (agent/home_assistant_app.py).
#   A plain container (docker/podman, deploy/compose.yaml): the stage "container",
#     podman build --target container -t edgeai-agent .      (or docker build)
#   the unprivileged user edgeai (uid 1000), all state in the volume /data, a HEALTHCHECK.
# In both the agent is PID 1: SIGTERM lets the running picture finish, keeps the queue in the
# journal, and exits 0.
ARG BUILD_FROM=debian:bookworm-slim
FROM ${BUILD_FROM} AS agent

# torch is chosen as scripts/run chooses it (scripts/lib.sh): the CPU build from PyTorch's wheel
# index; on arm64 where that index cannot be reached, the last CPU build on PyPI. PIP_FIND_LINKS
# names a folder of wheels to prefer (a local CPU wheel of torch, on a machine without the index).
ARG EDGEAI_TORCH=cpu
ARG PIP_FIND_LINKS=

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/edgeai-agent
COPY pyproject.toml README.md ./
COPY scripts/lib.sh scripts/lib.sh
COPY agent agent
RUN EDGEAI_VENV=/opt/edgeai-agent/.venv bash -c 'source scripts/lib.sh && ensure_venv ""' \
    && rm -rf /root/.cache /opt/edgeai-agent/*.egg-info

ENV PATH=/opt/edgeai-agent/.venv/bin:$PATH PYTHONUNBUFFERED=1
ENTRYPOINT ["edgeai-agent"]


FROM agent AS container
RUN useradd --system --uid 1000 --user-group --home-dir /data edgeai \
    && mkdir -p /data && chown edgeai:edgeai /data && chmod 0700 /data
ENV EDGEAI_STATE_DIR=/data HF_HOME=/data/huggingface EDGEAI_HTTP_PORT=8080
VOLUME /data
EXPOSE 8080
USER edgeai
# Model loading can take minutes on a Pi: failures count only after the start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EDGEAI_HTTP_PORT', '8080') + '/healthz', timeout=8)"]


# The Home Assistant app: the last stage, so the Supervisor's plain build makes it.
FROM agent AS app
