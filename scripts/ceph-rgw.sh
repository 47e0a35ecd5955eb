#!/usr/bin/env bash
# A throwaway single-node Ceph cluster with an S3 gateway (RGW) for dagcraft's real-server tier.
#
#   apt-get install -y radosgw ceph-mon ceph-osd      # Debian/Ubuntu, as root
#   eval "$(scripts/ceph-rgw.sh start)"               # prints the DAGCRAFT_TEST_S3_* exports
#   .venv/bin/python -m pytest -q -m realserver
#   scripts/ceph-rgw.sh stop                          # stops every daemon and deletes the data
#
# One monitor, one OSD on memstore (RAM, no disk to prepare; 1 GiB), one radosgw on
# 127.0.0.1:${RGW_PORT:-7480}, replication size 1, cephx off (everything listens on loopback only).
# No systemd: the daemons are started directly, each writing its pid to $CEPH_DIR/run. An S3 user
# with the key pair below is created. `start` returns once a bucket can be created and written.
# State lives in $CEPH_DIR (default ${TMPDIR:-/tmp}/dagcraft-ceph).
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=${CEPH_DIR:-${TMPDIR:-/tmp}/dagcraft-ceph}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
RGW_PORT=${RGW_PORT:-7480}
MON_PORT=${CEPH_MON_PORT:-6789}
ACCESS_KEY=dagcraft-test
SECRET_KEY=dagcraft-test-secret
REGION=us-east-1
CONF="$DIR/ceph.conf"

die() { echo "ceph-rgw.sh: $*" >&2; exit 1; }
ceph_() { timeout 60 ceph -c "$CONF" "$@"; }

stop() {
  for f in "$DIR"/run/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
  done
  for f in "$DIR"/run/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$DIR"
}

start() {
  for bin in ceph ceph-mon ceph-osd radosgw radosgw-admin monmaptool; do
    command -v "$bin" >/dev/null || die "$bin not found: apt-get install -y radosgw ceph-mon ceph-osd"
  done
  if compgen -G "$DIR/run/*.pid" >/dev/null; then die "already running; run: $0 stop"; fi
  rm -rf "$DIR"
  mkdir -p "$DIR"/{mon,osd,run,log,rgw}
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$MON_PORT
mon initial members = a
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
ms bind msgr2 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd objectstore = memstore
memstore device bytes = 1073741824
osd memory target = 939524096
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
keyring = $DIR/keyring
[mon.a]
mon data = $DIR/mon
[osd.0]
osd data = $DIR/osd
[client.rgw.a]
rgw data = $DIR/rgw
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw dns name = 127.0.0.1
EOF
  : >"$DIR/keyring"
  monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$MON_PORT]" "$DIR/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" >"$DIR/log/mkfs-mon.log" 2>&1 \
    || { cat "$DIR/log/mkfs-mon.log" >&2; die "ceph-mon --mkfs failed"; }
  ceph-mon -c "$CONF" -i a 2>>"$DIR/log/start.log"
  ceph_ -s >/dev/null || die "the monitor does not answer (log: $DIR/log/mon.a.log)"

  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  id=$(ceph_ osd new "$osd_uuid")
  [ "$id" = 0 ] || die "unexpected OSD id $id"
  ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$DIR/log/mkfs-osd.log" 2>&1 \
    || { cat "$DIR/log/mkfs-osd.log" >&2; die "ceph-osd --mkfs failed"; }
  ceph_ osd crush add osd.0 1.0 root=default >/dev/null 2>&1
  ceph-osd -c "$CONF" -i 0 2>>"$DIR/log/start.log"
  for _ in $(seq 120); do ceph_ osd stat 2>/dev/null | grep -q "1 up" && break; sleep 0.5; done
  ceph_ osd stat | grep -q "1 up" || die "the OSD did not come up (log: $DIR/log/osd.0.log)"

  radosgw -c "$CONF" -n client.rgw.a 2>>"$DIR/log/start.log"
  radosgw-admin -c "$CONF" user create --uid=dagcraft --display-name=dagcraft \
    --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null 2>"$DIR/log/user.log" \
    || { cat "$DIR/log/user.log" >&2; die "radosgw-admin user create failed"; }
  endpoint="http://127.0.0.1:$RGW_PORT"
  if ! AWS_ACCESS_KEY_ID=$ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SECRET_KEY "$PY" - "$endpoint" <<'EOF'
import sys, time
import boto3
from botocore.config import Config
endpoint = sys.argv[1]
c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                               connect_timeout=2, read_timeout=30))
deadline = time.monotonic() + 180
last = None
while time.monotonic() < deadline:
    try:
        c.create_bucket(Bucket="dagcraft-ready")
        c.put_object(Bucket="dagcraft-ready", Key="probe", Body=b"x")
        c.delete_object(Bucket="dagcraft-ready", Key="probe")
        c.delete_bucket(Bucket="dagcraft-ready")
        sys.exit(0)
    except Exception as exc:  # not up yet: refused, or 5xx while RGW creates its pools
        last = exc
        time.sleep(1)
sys.exit(f"not ready after 180 s: {last}")
EOF
  then
    tail -20 "$DIR/log/client.rgw.a.log" >&2 || true
    stop
    die "RGW did not start (log above)"
  fi
  echo "export DAGCRAFT_TEST_S3_ENDPOINT=$endpoint"
  echo "export DAGCRAFT_TEST_S3_ACCESS_KEY=$ACCESS_KEY"
  echo "export DAGCRAFT_TEST_S3_SECRET_KEY=$SECRET_KEY"
  echo "export DAGCRAFT_TEST_S3_REGION=$REGION"
  echo "export DAGCRAFT_TEST_S3_SERVER=ceph-rgw"  # for tests/conftest.py's KNOWN_GAPS
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop   (eval \"\$($0 start)\" sets DAGCRAFT_TEST_S3_*)" >&2; exit 2 ;;
esac
