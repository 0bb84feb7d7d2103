# The project's mosquitto for compose (deploy/compose.yaml): Debian's mosquitto with this
# repository's policy (passwords, per-node ACL, no anonymous access, persistence). At each start
# mosquitto/prepare.sh makes the credentials it lacks in the volume /broker (kept across starts:
# /broker/credentials/<user>.password) and the config, for the node EDGEAI_NODE_ID.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 1000 --user-group --home-dir /broker edgeai \
    && mkdir -p /broker && chown edgeai:edgeai /broker && chmod 0700 /broker
COPY mosquitto /opt/edgeai-broker/mosquitto
# The agent's image runs as the same uid: it reads its password from this volume.
USER edgeai
VOLUME /broker
ENV EDGEAI_NODE_ID=edgeai EDGEAI_MQTT_PORT=1883
# Log to the container's output as well as to the file the policy names.
ENTRYPOINT ["bash", "-c", "/opt/edgeai-broker/mosquitto/prepare.sh /broker \"$EDGEAI_MQTT_PORT\" 0.0.0.0 \"$EDGEAI_NODE_ID\" >/dev/null && exec /usr/sbin/mosquitto -c /broker/mosquitto/mosquitto.conf"]
