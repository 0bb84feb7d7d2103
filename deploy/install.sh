#!/usr/bin/env bash
# Install edgeai-agent as a service on Raspberry Pi OS bookworm (or Debian 12). Idempotent: run it
# again after `git pull` to update. Run from a clone of the repository, as root:
#   sudo deploy/install.sh
# What it does: installs mosquitto from apt, creates the service user `edgeai`, copies the
# project to /opt/edgeai-agent with a virtual environment (torch's CPU build), prepares the
# project's broker (passwords, ACL, persistence) in /var/lib/edgeai-agent/broker, writes
# /etc/edgeai-agent/agent.env once, and enables edgeai-broker.service and edgeai-agent.service.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root: sudo $0" >&2
  exit 1
fi
source_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=/opt/edgeai-agent
state=/var/lib/edgeai-agent
config=/etc/edgeai-agent
# shellcheck source=scripts/lib.sh
source "$source_dir/scripts/lib.sh"  # install_torch: the CPU build unless there is a GPU
VENV=$prefix/.venv

echo "== packages"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  mosquitto mosquitto-clients python3-venv python3-pip rsync >/dev/null
# The project runs its own broker (edgeai-broker.service) on port 1883.
if systemctl is-enabled --quiet mosquitto 2>/dev/null; then
  systemctl disable --now mosquitto
fi

echo "== user and folders"
id -u edgeai >/dev/null 2>&1 || useradd --system --home-dir "$state" --shell /usr/sbin/nologin edgeai
install -d -o edgeai -g edgeai -m 0750 "$state"
install -d -m 0755 "$prefix" "$config"

echo "== application"
rsync -a --delete --exclude .git --exclude .venv --exclude state "$source_dir/" "$prefix/app/"
if [ ! -x "$prefix/.venv/bin/python" ]; then
  python3 -m venv "$prefix/.venv"
fi
"$prefix/.venv/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  install_torch
fi
"$prefix/.venv/bin/python" -m pip install -q --upgrade "$prefix/app"

echo "== broker"
# The agent's broker user is named after its node id (per-node access in the ACL).
node_id=$(cd "$prefix/app" && "$VENV/bin/python" -c 'from agent.settings import load_settings; print(load_settings().node_id)')
runuser -u edgeai -- "$prefix/app/mosquitto/prepare.sh" "$state/broker" 1883 0.0.0.0 "$node_id" >/dev/null

if [ ! -f "$config/agent.env" ]; then
  install -m 0640 -g edgeai /dev/null "$config/agent.env"
  cat > "$config/agent.env" <<ENV
# edgeai-agent settings (edgeai-agent --help lists them all)
EDGEAI_MQTT_HOST=127.0.0.1
EDGEAI_NODE_ID=$node_id
EDGEAI_MQTT_USERNAME=$node_id
EDGEAI_MQTT_PASSWORD_FILE=$state/broker/credentials/$node_id.password
# EDGEAI_MODEL=stabilityai/sdxl-turbo
# EDGEAI_PUBLIC_URL=http://$(hostname).local:8080
ENV
fi

echo "== services"
install -m 0644 "$prefix/app/deploy/systemd/edgeai-broker.service" /etc/systemd/system/
install -m 0644 "$prefix/app/deploy/systemd/edgeai-agent.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now edgeai-broker.service
systemctl enable edgeai-agent.service
systemctl restart edgeai-agent.service

echo "installed. logs: journalctl -u edgeai-agent -f"
echo "client password: $state/broker/credentials/edgeai-client.password"
