#!/usr/bin/env bash
# Prepare a broker for edgeai-agent in a state folder, without prompting:
#   - credentials for the user edgeai-client and for each agent NODE (a user named after its node
#     id), generated once and kept in STATE_DIR/credentials/<user>.password (mode 600), and
#     mosquitto's password file;
#   - STATE_DIR/mosquitto/acl: acl, then acl-agent for each NODE (per-node access);
#   - STATE_DIR/mosquitto/mosquitto.conf, this folder's policy with the paths filled in.
# Usage: mosquitto/prepare.sh STATE_DIR [PORT] [BIND_ADDRESS] [NODE...]
# Then:  mosquitto -c STATE_DIR/mosquitto/mosquitto.conf  (run again with more nodes, then send
#        the broker SIGHUP: it reloads the passwords and the ACL)
# A TLS listener is added when BROKER_TLS_PORT is set, with BROKER_TLS_CA, BROKER_TLS_CERT and
# BROKER_TLS_KEY naming the CA, the server certificate and its key (PEM files).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${1:?usage: prepare.sh STATE_DIR [PORT] [BIND_ADDRESS] [NODE...]}
port=${2:-1883}
bind=${3:-0.0.0.0}
shift $(($# < 3 ? $# : 3))
nodes=("$@")
for node in "${nodes[@]}"; do
  if [[ ! "$node" =~ ^[a-z0-9_-]{1,64}$ || "$node" == edgeai-client ]]; then
    echo "not a node id: $node" >&2
    exit 2
  fi
done
mkdir -p "$state"
state=$(cd "$state" && pwd)

umask 077
mkdir -p "$state/credentials" "$state/mosquitto/data"
passwd_file="$state/mosquitto/passwd"
new_passwd="$passwd_file.new"
: > "$new_passwd"
for user in edgeai-client "${nodes[@]}"; do
  secret="$state/credentials/$user.password"
  if [ ! -s "$secret" ]; then
    # 24 random bytes, base64 without characters that need quoting in a shell or a URL.
    head -c 24 /dev/urandom | base64 | tr -d '/+=\n' > "$secret"
  fi
  mosquitto_passwd -b "$new_passwd" "$user" "$(cat "$secret")"
done
mv "$new_passwd" "$passwd_file"

acl="$state/mosquitto/acl"
cp "$here/acl" "$acl.new"
for node in "${nodes[@]}"; do
  sed -e "s|@NODE@|$node|g" "$here/acl-agent" >> "$acl.new"
done
mv "$acl.new" "$acl"

sed -e "s|@STATE_DIR@|$state|g" \
    -e "s|@ACL_FILE@|$acl|g" \
    -e "s|@PORT@|$port|g" \
    -e "s|@BIND@|$bind|g" \
    -e "s|@USER@|$(id -un)|g" \
    "$here/mosquitto.conf" > "$state/mosquitto/mosquitto.conf"
if [ -n "${BROKER_TLS_PORT:-}" ]; then
  sed -e "s|@TLS_PORT@|$BROKER_TLS_PORT|g" \
      -e "s|@BIND@|$bind|g" \
      -e "s|@TLS_CA@|${BROKER_TLS_CA:?BROKER_TLS_CA is needed with BROKER_TLS_PORT}|g" \
      -e "s|@TLS_CERT@|${BROKER_TLS_CERT:?BROKER_TLS_CERT is needed with BROKER_TLS_PORT}|g" \
      -e "s|@TLS_KEY@|${BROKER_TLS_KEY:?BROKER_TLS_KEY is needed with BROKER_TLS_PORT}|g" \
      "$here/tls.conf" >> "$state/mosquitto/mosquitto.conf"
fi
echo "$state/mosquitto/mosquitto.conf"
