#!/usr/bin/env bash
# The agent on arm64, as a new user on a Raspberry Pi 5 runs it: a Debian bookworm arm64 root
# (debootstrap), emulated by qemu-user as a Cortex-A76 (a Pi 5's core), the README's run command
# (scripts/run) inside it with the tiny model, and an image requested over MQTT from outside.
# Prints the image's arrival, the precision the agent chose, the virtual environment's size and
# the time taken. Not part of the test suite: it takes 20 to 40 minutes (emulation is slow).
#
#   sudo tests/arm64/run.sh         (root: debootstrap, binfmt_misc, chroot)
#
# EDGEAI_ARM64_ROOT keeps the root between runs (default ~/.cache/edgeai-arm64-root); a second
# run reuses it, and its virtual environment unless EDGEAI_ARM64_FRESH=1. EDGEAI_ARM64_DTYPE
# sets the agent's EDGEAI_DTYPE (default auto: the float16 probe runs, emulated).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

root=${EDGEAI_ARM64_ROOT:-$HOME/.cache/edgeai-arm64-root}
mirror=${EDGEAI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mqtt_port=18830
http_port=18080
app=/edgeai-agent
began=$(date +%s)

say() { printf '[arm64 %4ds] %s\n' "$(($(date +%s) - began))" "$*"; }

ensure_apt qemu-user-static binfmt-support debootstrap mosquitto-clients rsync
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  as_root mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
as_root update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "qemu-aarch64 is not registered" >&2; exit 1; }

if [ ! -x "$root/usr/bin/python3" ]; then
  say "building a Debian bookworm arm64 root in $root"
  as_root rm -rf "$root"
  as_root mkdir -p "$root"
  as_root debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,ca-certificates,procps bookworm "$root" "$mirror" >/dev/null
fi
say "root ready: $(chroot "$root" /bin/uname -m), $(chroot "$root" python3 --version)"

# What a Pi's kernel provides and emulation does not: the CPU identification registers, which
# torch's oneDNN reads at its first matrix multiply (without them the worker segfaults).
cpus=$(nproc)
for ((cpu = 0; cpu < cpus; cpu++)); do
  as_root mkdir -p "$root/sys/devices/system/cpu/cpu$cpu/regs/identification"
  echo 0x00000000414fd0b1 | as_root tee "$root/sys/devices/system/cpu/cpu$cpu/regs/identification/midr_el1" >/dev/null
done
for name in possible present online; do
  echo "0-$((cpus - 1))" | as_root tee "$root/sys/devices/system/cpu/$name" >/dev/null
done
as_root cp /etc/resolv.conf "$root/etc/resolv.conf"
[ -f /etc/ssl/certs/ca-certificates.crt ] && as_root cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
[ -f /etc/pip.conf ] && as_root cp /etc/pip.conf "$root/etc/pip.conf"

say "copying the project (its tracked files) and a tiny model built here"
as_root mkdir -p "$root$app"
git ls-files -z | as_root rsync -a --from0 --files-from=- ./ "$root$app/"
if [ "${EDGEAI_ARM64_FRESH:-0}" = 1 ]; then as_root rm -rf "$root$app/.venv"; fi
if [ ! -f "$root/tiny/model_index.json" ]; then
  ensure_venv ""
  "$VENV/bin/python" -m tests.tiny_pipeline /tmp/edgeai-arm64-tiny >/dev/null
  as_root rm -rf "$root/tiny"
  as_root cp -r /tmp/edgeai-arm64-tiny "$root/tiny"
fi

# in_root CMD...: run CMD in the root as a Pi 5 (QEMU_CPU), /proc and /dev mounted in a private
# mount namespace, so that nothing is left mounted afterwards.
in_root() {
  # shellcheck disable=SC2016 # expanded by the inner shell, inside the namespace
  as_root unshare --mount --propagation private sh -c '
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    exec chroot "$root" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
      QEMU_CPU=cortex-a76 "$@"
  ' in-root "$root" "$@"
}

# The broker keeps retained messages across starts: an earlier run's "idle" state must not pass
# for this agent's.
as_root rm -rf "$root$app/state/mosquitto/data"
say "running README's command in the root: scripts/run (installs what is missing, then serves)"
log=$root$app/arm64-run.log
in_root sh -c "cd $app && EDGEAI_MODEL=/tiny EDGEAI_TINY_VAE=/tiny/taesd EDGEAI_NODE_ID=pi5 \
  EDGEAI_MQTT_PORT=$mqtt_port EDGEAI_HTTP_PORT=$http_port EDGEAI_WARMUP=false \
  EDGEAI_DTYPE=${EDGEAI_ARM64_DTYPE:-auto} exec scripts/run" >"$log" 2>&1 &
runner=$!
cleanup() {
  # Everything the root runs is an emulated arm64 process; chroot itself has exec'd away.
  as_root pkill -f "qemu-binfmt/aarch64-binfmt-P" 2>/dev/null || true
  as_root pkill -f "chroot $root" 2>/dev/null || true
  kill "$runner" 2>/dev/null || true
  wait "$runner" 2>/dev/null || true
}
trap cleanup EXIT

password_file=$root$app/state/credentials/edgeai-client.password
for _ in $(seq 3600); do
  [ -f "$password_file" ] && break
  kill -0 "$runner" 2>/dev/null || { tail -40 "$log"; exit 1; }
  sleep 1
done
say "broker up; waiting for the agent to load the model (pip installs first, under emulation)"
pass=$(cat "$password_file")
mqtt=(-h 127.0.0.1 -p "$mqtt_port" -u edgeai-client -P "$pass")
until mosquitto_sub "${mqtt[@]}" -t edgeai/pi5/state -C 1 -W 30 2>/dev/null | grep -q '"state": "idle"'; do
  kill -0 "$runner" 2>/dev/null || { tail -40 "$log"; exit 1; }
done
say "agent idle"

image=$(mktemp --suffix=.png)
requested=$(date +%s)
mosquitto_sub "${mqtt[@]}" -t edgeai/pi5/image -C 1 -W 1800 | base64 -d >"$image" &
listener=$!
sleep 1
mosquitto_pub "${mqtt[@]}" -t edgeai/pi5/generate -m '{"prompt": "a red apple", "width": 256, "height": 256}'
wait "$listener"
described=$(python3 -c '
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
width, height = struct.unpack(">II", data[16:24])
print(f"a {width}x{height} PNG, {len(data)} bytes")' "$image")
say "image received over MQTT in $(($(date +%s) - requested)) s: $described"

metrics=$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$http_port/metrics').read().decode())")
say "model info: $(grep '^edgeai_model_info' <<<"$metrics")"
say "dtype chosen: $(grep -o 'dtype="[a-z0-9]*"' <<<"$metrics")"
say "float16 probe: $(grep -o 'float16 runs the .*' "$log" || echo 'not run (dtype set)')"
say "torch in the root: $(chroot "$root" "$app/.venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
say "virtual environment: $(du -sh "$root$app/.venv" | cut -f1) ($root$app/.venv)"
say "done in $(($(date +%s) - began)) s"
