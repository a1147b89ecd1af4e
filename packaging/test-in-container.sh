#!/bin/bash
# The operator's path, for real: install the .deb in a booted Debian bookworm container
# (systemd-nspawn, systemd as PID 1) and check what the unit promises: enable --now returns after
# READY=1, the API and the control socket answer, the watchdog keeps a healthy daemon alive,
# a crash and a hang are restarted, a bad config exits 78 and is not restarted, logrotate's
# SIGUSR1 reopens the request log, stop drains and exits 0, purge cleans up.
#
# Too slow for CI (debootstrap, a ~1 GB package): run by hand, as root, on a host with apt access.
# Usage: sudo packaging/test-in-container.sh
# Env: WORK=dir (default /tmp/llm-appliance-nspawn)  DEB=path (else built with build-deb.sh)
#      MODEL_DIR=converted default model (default ~/.cache/llm-appliance/models/SmolLM2-135M-Instruct;
#      the container has no network, so the model is copied in)  KEEP=1 keeps the rootfs.
# Built on the steering repo's shared/recipes/nspawn-systemd-toy.sh; its pitfalls are noted where they bite.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/llm-appliance-nspawn}
SUITE=bookworm
MACHINE=llmapp
NAME=llm-appliance
PORT=8000
KEY=sk-container-test
MODEL_DIR=${MODEL_DIR:-$HOME/.cache/llm-appliance/models/SmolLM2-135M-Instruct}
ROOT=$WORK/rootfs BASE=$WORK/base PKGDIR=$WORK/pkgs
mkdir -p "$WORK" "$PKGDIR"
T0=$(date +%s.%N); STAGE_T=$T0
stage() { local now; now=$(date +%s.%N)
  awk -v n="$now" -v t="$T0" -v s="$STAGE_T" -v m="$*" 'BEGIN{printf "### [%6.1fs total, prev stage %5.1fs] %s\n", n-t, n-s, m}'
  STAGE_T=$now; }
die() { echo "FAIL: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
[ -f "$MODEL_DIR/config.json" ] || die "no converted model at $MODEL_DIR (run: llm-appliance model fetch)"

stage "host tools"
export DEBIAN_FRONTEND=noninteractive
need=(); for p in systemd-container debootstrap; do
  dpkg-query -W -f='${Status}' $p 2>/dev/null | grep -q '^install ok installed' || need+=("$p"); done
if ((${#need[@]})); then apt-get update -qq; apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; fi

stage "build .deb"
if [ -z "${DEB:-}" ]; then DEB=$(bash "$REPO/packaging/build-deb.sh" "$PKGDIR" | tail -1)
else cp "$DEB" "$PKGDIR/"; DEB=$PKGDIR/$(basename "$DEB"); fi
DEBNAME=$(basename "$DEB"); ls -l "$DEB"

stage "debootstrap (cached in $BASE)"
if [ ! -e "$BASE/.complete" ]; then
  MIRROR=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' |
           awk -v s=$SUITE '$2==s{print $1; exit}')
  [ -n "$MIRROR" ] || die "no $SUITE mirror found in apt sources"
  rm -rf "$BASE"
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,python3,curl,adduser,logrotate,procps,ca-certificates \
    $SUITE "$BASE" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die debootstrap; }
  echo "$MACHINE" > "$BASE/etc/hostname"
  printf 'Acquire::Check-Valid-Until "false";\n' > "$BASE/etc/apt/apt.conf.d/99ci"
  touch "$BASE/.complete"
fi
rm -rf "$ROOT"; cp -a "$BASE" "$ROOT"

NSPID=
boot() {
  # pitfall: --register=no AND --keep-unit, or nspawn wants the host's system bus.
  setsid systemd-nspawn -D "$ROOT" -b -M $MACHINE --register=no --keep-unit --console=read-only \
      --bind-ro="$PKGDIR":/mnt/pkgs --bind-ro="$MODEL_DIR":/mnt/model --private-network \
      </dev/null >>"$WORK/console.log" 2>&1 &
  NSPID=$!
  for _ in $(seq 300); do
    LEADER=$(pgrep -P $NSPID -x systemd || true)
    if [ -n "$LEADER" ]; then
      st=$(C timeout 90 systemctl is-system-running --wait 2>/dev/null || true)
      case $st in running) return 0;; degraded) C systemctl --failed --no-pager; return 0;; esac
    fi
    kill -0 $NSPID 2>/dev/null || { cat "$WORK/console.log"; die "nspawn exited"; }
    sleep 0.2
  done; die "container did not boot"
}
C() { nsenter -t "$LEADER" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb SYSTEMD_COLORS=0 "$@"; }
halt_container() {
  [ -n "$NSPID" ] || return 0
  kill -TERM $NSPID 2>/dev/null || true
  for _ in $(seq 300); do kill -0 $NSPID 2>/dev/null || break; sleep 0.1; done
  kill -KILL $NSPID 2>/dev/null || true; wait $NSPID 2>/dev/null || true; NSPID=
  rm -rf /run/systemd/nspawn/propagate/$MACHINE   # pitfall: host /run is not tmpfs
}
cleanup() { local rc=$?
  if [ $rc != 0 ] && [ -n "$NSPID" ] && [ -n "${LEADER:-}" ]; then
    echo "=== FAILED (rc=$rc): status + journal of $NAME ==="
    C systemctl status --no-pager --lines=0 $NAME || true; C journalctl -u $NAME --no-pager -n 60 || true
  fi
  halt_container; [ -n "${KEEP:-}" ] || rm -rf "$ROOT"; }
trap cleanup EXIT
: > "$WORK/console.log"
stage "boot container"; boot

# pitfall: never 'journalctl | grep -q' under pipefail (SIGPIPE -> 141): grep a here-string.
J() { C journalctl -u $NAME --no-pager -q; }
api() { C curl -sS -m 120 -o /dev/null -w '%{http_code}' "$@"; }
restarts() { C systemctl show -P NRestarts $NAME; }
wait_restarts() { for _ in $(seq 600); do
    [ "$(restarts)" = "$1" ] && C systemctl is-active -q $NAME && return 0; sleep 0.2; done
  die "no restart #$1"; }

stage "dpkg -i: user, files, nothing enabled"
C dpkg -i /mnt/pkgs/"$DEBNAME"
C id $NAME
[ "$(C systemctl is-enabled $NAME || true)" = disabled ] || die "enabled by the package"
! C systemctl is-active -q $NAME || die "started by the package"
[ "$(C stat -c '%a %U:%G' /etc/$NAME/appliance.toml)" = "640 root:$NAME" ] || die "config readable by all"
out=$(C systemd-analyze verify --man=no /lib/systemd/system/$NAME.service 2>&1) || die "verify: $out"
[ -z "$out" ] || die "systemd-analyze verify: $out"
C /usr/bin/llm-appliance config check /etc/$NAME/appliance.toml

stage "configure: model cache, a client key as a systemd credential, short watchdog"
C mkdir -p /var/cache/$NAME/models
C cp -r /mnt/model /var/cache/$NAME/models/SmolLM2-135M-Instruct
C chown -R $NAME:$NAME /var/cache/$NAME
C sh -c "umask 077; echo $KEY > /etc/$NAME/app.key"
cat >> "$ROOT/etc/$NAME/appliance.toml" <<'EOF'

[[clients]]
name = "app"
api_key_file = "app.key"
EOF
sed -i 's/^cpu_kv_cache_bytes = .*/cpu_kv_cache_bytes = 67108864/; s/^# max_model_len = 4096/max_model_len = 512/' \
  "$ROOT/etc/$NAME/appliance.toml"
mkdir -p "$ROOT/etc/systemd/system/$NAME.service.d"
cat > "$ROOT/etc/systemd/system/$NAME.service.d/test.conf" <<EOF
[Service]
LoadCredential=app.key:/etc/$NAME/app.key
WatchdogSec=10
RestartSec=1
EOF
C systemctl daemon-reload

stage "systemctl enable --now (returns after READY=1)"
C systemctl enable --now $NAME.service
C systemctl is-active $NAME
MP=$(C systemctl show -P MainPID $NAME)
[ "$(C ps -o user= -p "$MP" | tr -d ' ')" = $NAME ] || die "not running as $NAME"
C systemctl show -P StatusText $NAME

stage "API, auth, control socket"
[ "$(api http://127.0.0.1:$PORT/health)" = 200 ] || die "health"
[ "$(api http://127.0.0.1:$PORT/v1/models)" = 401 ] || die "no key must be refused"
chat() { api -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
  -d '{"model":"SmolLM2-135M-Instruct","max_tokens":4,"messages":[{"role":"user","content":"Hi"}]}' \
  http://127.0.0.1:$PORT/v1/chat/completions; }
[ "$(chat)" = 200 ] || die "chat with the credential key"
[ "$(C stat -c '%a %G' /run/$NAME/control.sock)" = "660 $NAME" ] || die "control socket mode/group"
C llm-appliance ctl status

stage "watchdog keep-alive (12 s > WatchdogSec=10)"
sleep 12
[ "$(restarts)" = 0 ] || die "restarted although healthy"

stage "crash -> Restart=on-failure"
C systemctl kill --signal=SIGKILL --kill-who=main $NAME
wait_restarts 1
[ "$(chat)" = 200 ] || die "chat after restart"

stage "hang (SIGSTOP) -> watchdog -> restart"
C systemctl kill --signal=SIGSTOP --kill-who=main $NAME
wait_restarts 2
grep -E "Watchdog timeout|Failed with result 'watchdog'" <<<"$(J)" || die "no watchdog kill in the journal"

stage "reload (SIGHUP)"
C systemctl reload $NAME
for _ in $(seq 50); do grep -q "reloaded /etc/$NAME/appliance.toml" <<<"$(J)" && break; sleep 0.2; done
grep -q "reloaded /etc/$NAME/appliance.toml" <<<"$(J)" || die "reload not logged"

stage "logrotate -> SIGUSR1 -> request log reopened"
C test -s /var/log/$NAME/requests.log
lr=$(C logrotate -d /etc/logrotate.d/$NAME 2>&1); ! grep -q '^error' <<<"$lr" || die "logrotate -d: $lr"
C logrotate -f /etc/logrotate.d/$NAME
C test -s /var/log/$NAME/requests.log.1
[ "$(chat)" = 200 ] || die "chat after rotation"
for _ in $(seq 50); do C test -s /var/log/$NAME/requests.log && break; sleep 0.1; done
C test -s /var/log/$NAME/requests.log || die "request log not reopened after rotation"
C ls -l /var/log/$NAME

stage "bad config -> exit 78, not restarted"
cp "$ROOT/etc/$NAME/appliance.toml" "$WORK/good.toml"
printf '\n[engine2]\n' >> "$ROOT/etc/$NAME/appliance.toml"
# NOTE: NRestarts also counts a manual restart: count systemd's automatic restarts in the journal.
n=$(grep -c 'Scheduled restart job' <<<"$(J)" || true)
! C systemctl restart $NAME 2>/dev/null || die "restart with a bad config succeeded"
sleep 3   # > RestartSec=1
[ "$(C systemctl show -P ExecMainStatus $NAME)" = 78 ] || die "exit status is not 78"
[ "$(grep -c 'Scheduled restart job' <<<"$(J)" || true)" = "$n" ] || die "restarted after exit 78"
[ "$(C systemctl is-failed $NAME || true)" = failed ] || die "not failed after exit 78"
grep -q "engine2: unknown section" <<<"$(J)" || die "config error not in the journal"
cp "$WORK/good.toml" "$ROOT/etc/$NAME/appliance.toml"
C systemctl restart $NAME

stage "stop: drain, exit 0"
C systemctl stop $NAME
! C systemctl is-active -q $NAME || die "still active"
grep -q "exiting with status 0" <<<"$(J)" || die "no clean exit"

stage "purge"
C dpkg --purge $NAME
C test ! -e /lib/systemd/system/$NAME.service
C test ! -e /var/cache/$NAME
halt_container
stage "ALL OK"
