#!/usr/bin/env bash
# Runs one quad job as N processes on this machine (timely's cluster mode over 127.0.0.1):
# writes a hostfile of N free ports, starts `quad run -n N -p I --hostfile FILE` for each I,
# and waits for all of them (README, "Several processes and machines").
#
#   run-local-cluster.sh N JOB [quad run options, e.g. -w 2 --once]
#
# Environment:
#   QUAD     the quad binary (default: target/release/quad, then quad on PATH)
#   LOGS     folder for each process's log, process-<I>.log (default: a temporary folder)
# Process I writes <sink.path>/p<I> and keeps its own state store; the output of the job is the
# union of those folders. Exit code: 0 when every process succeeded, else the first failure's.
set -u
if [ $# -lt 2 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  [ $# -lt 2 ] && exit 2 || exit 0
fi
n=$1; job=$2; shift 2
case "$n" in ''|*[!0-9]*) echo "run-local-cluster.sh: N must be a number, got $n" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
quad=${QUAD:-}
if [ -z "$quad" ]; then
  if [ -x "$root/target/release/quad" ]; then quad="$root/target/release/quad"; else quad=quad; fi
fi
logs=${LOGS:-$(mktemp -d -t quad-cluster.XXXXXX)}
mkdir -p "$logs"
hostfile="$logs/hostfile"
# Free ports: bound together by the kernel (port 0), then released for timely.
python3 - "$n" > "$hostfile" <<'PY' || { echo "run-local-cluster.sh: no free ports" >&2; exit 1; }
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
for s in socks:
    print(f"127.0.0.1:{s.getsockname()[1]}")
PY
pids=()
for ((i = 0; i < n; i++)); do
  "$quad" run "$job" -n "$n" -p "$i" --hostfile "$hostfile" "$@" > "$logs/process-$i.log" 2>&1 &
  pids+=($!)
done
echo "run-local-cluster.sh: $n processes of $job, logs in $logs" >&2
status=0
for ((i = 0; i < n; i++)); do
  wait "${pids[$i]}"
  code=$?
  if [ "$code" -ne 0 ]; then
    echo "run-local-cluster.sh: process $i failed (exit $code), see $logs/process-$i.log" >&2
    tail -n 5 "$logs/process-$i.log" >&2
    [ "$status" -eq 0 ] && status=$code
  fi
done
exit "$status"
