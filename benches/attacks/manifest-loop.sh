#!/usr/bin/env bash
# The symlink-loop attack on a watched manifest directory, measured.
#
#   bash benches/attacks/manifest-loop.sh <path to an xds-serve binary>
#
# Builds the loop from the issue's repro in a fresh temporary directory:
#
#   m/echo.yaml           a Pod and a Service (what a client should be served)
#   m/sub/up  -> ..       a relative link back to m
#   m/self    -> <abs m>  an absolute link back to m
#
# then starts `xds-serve --manifests m --listen 127.0.0.1:<free port>` (plaintext,
# loopback only) and, for 10 s, every 0.5 s, samples the server's peak and
# current resident memory (VmHWM, VmRSS from /proc/PID/status), its open file
# descriptors (/proc/PID/fd), whether the port is listening (ss, which does not
# connect), and how many lines it has logged; it samples again 30 s after the
# start. It finishes early when the server exits.
#
# "Served" is measured as a real data plane's first step: a delta ADS client (a
# small HTTP/2 cleartext client in Python's standard library, below) opens the
# DeltaAggregatedResources stream, subscribes to every `istio.workload.Address`
# and keeps the stream open; it is served when a response carrying the
# manifest's pod (`echo-1`) arrives, timed from the start of its connect().
# The client runs as soon as the port listens (polled every 50 ms) and again
# at 30 s. Time to listen is counted from the launch, at 50 ms resolution.
#
# The server is killed at the end whatever happens (and by a watchdog after
# 55 s, or as soon as its RSS passes MANIFEST_LOOP_MAX_RSS_MB, 4096 by default,
# to spare the machine); the temporary directory is removed. Only 127.0.0.1 is
# used.

set -u

usage() {
	echo "usage: $0 <xds-serve binary>" >&2
	exit 2
}
[ $# -eq 1 ] || usage
BIN=$1
[ -x "$BIN" ] || {
	echo "$0: $BIN is not an executable" >&2
	exit 2
}
MAX_RSS_MB=${MANIFEST_LOOP_MAX_RSS_MB:-4096}
for tool in ss python3 timeout; do
	command -v "$tool" >/dev/null || {
		echo "$0: needs $tool" >&2
		exit 2
	}
done

work=$(mktemp -d "${TMPDIR:-/tmp}/manifest-loop.XXXXXX")
pid=
watchdog=
cleanup() {
	if [ -n "$watchdog" ]; then
		kill "$watchdog" 2>/dev/null
		wait "$watchdog" 2>/dev/null
	fi
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null
		for _ in 1 2 3 4 5 6 7 8 9 10; do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.2
		done
		kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	fi
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the directory -----------------------------------------------------------
m=$work/m
mkdir -p "$m/sub"
cat >"$m/echo.yaml" <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: echo-1
  namespace: default
  labels: {app: echo}
spec:
  serviceAccountName: echo
  nodeName: node-a
  containers: [{name: app, image: app}]
status:
  podIP: 10.0.0.5
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
EOF
ln -s .. "$m/sub/up"
ln -s "$m" "$m/self"

# --- a free loopback port ----------------------------------------------------
port=
for _ in $(seq 1 50); do
	candidate=$((20000 + RANDOM % 40000))
	if [ -z "$(ss -Htan "( sport = :$candidate )" 2>/dev/null)" ]; then
		port=$candidate
		break
	fi
done
[ -n "$port" ] || {
	echo "$0: no free port found" >&2
	exit 1
}

# --- one delta ADS client ----------------------------------------------------
# A minimal HTTP/2 (cleartext, prior knowledge) gRPC client in Python's standard
# library, doing what a data plane does first: connect, send the preface,
# SETTINGS, the DeltaAggregatedResources call's headers and one
# DeltaDiscoveryRequest subscribing to every istio.workload.Address, keep its
# side of the stream open, and read until a response carries the pod. Prints
# "<connect s> <served s> <response bytes> <pod served: yes/no> <note>", times
# counted from the start of connect(), 5 s at most.
client=$work/ads_client.py
cat >"$client" <<'PY'
import socket, struct, sys, time

port = int(sys.argv[1])
deadline = 5.0
path = b"/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
type_url = b"type.googleapis.com/istio.workload.Address"


def frame(kind, flags, stream, payload):
    return (struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
            + struct.pack(">I", stream) + payload)


def literal(name, value):  # HPACK: literal without indexing, new name, no Huffman
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


headers = b"".join(literal(n, v) for n, v in [
    (b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
    (b":authority", b"127.0.0.1:%d" % port),
    (b"content-type", b"application/grpc"), (b"te", b"trailers")])
request = b"\x12" + bytes([len(type_url)]) + type_url  # field 2: type_url
grpc = b"\x00" + struct.pack(">I", len(request)) + request

start = time.monotonic()
connect, served, body, note = "-", "-", b"", ""
try:
    sock = socket.create_connection(("127.0.0.1", port), timeout=deadline)
    connect = "%.6f" % (time.monotonic() - start)
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
                 + frame(1, 0x4, 1, headers) + frame(0, 0, 1, grpc))
    buffer, done = b"", False
    while not done:
        sock.settimeout(max(0.01, deadline - (time.monotonic() - start)))
        chunk = sock.recv(65536)
        if not chunk:
            note = "connection closed"
            break
        buffer += chunk
        while len(buffer) >= 9 and not done:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, flags = buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            payload, buffer = buffer[9:9 + length], buffer[9 + length:]
            if kind == 4 and not flags & 0x1:
                sock.sendall(frame(4, 0x1, 0, b""))  # SETTINGS ACK
            elif kind == 0 and stream == 1:
                body += payload
                if b"echo-1" in body:
                    served = "%.6f" % (time.monotonic() - start)
                    done = True
            elif kind == 1 and stream == 1 and flags & 0x1:
                note, done = "stream ended without the pod", True
            elif kind in (3, 7):
                note, done = ("stream reset" if kind == 3 else "goaway"), True
    sock.close()
except socket.timeout:
    note = "no pod within %.0f s" % deadline
except OSError as err:
    note = err.strerror or str(err)
pod = "yes" if served != "-" else "no"
print(connect, served, len(body), pod, ", " + note if note else "-")
PY

ads_call() {
	timeout 8 python3 "$client" "$port" 2>/dev/null || echo "- - 0 no , client failed"
}

listening() {
	[ -n "$(ss -Hltn "( sport = :$port )" 2>/dev/null)" ]
}

status_kb() { # field of /proc/PID/status, in kB
	awk -v f="$1:" '$1 == f { print $2 }' "/proc/$pid/status" 2>/dev/null
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# --- the run -----------------------------------------------------------------
echo "xds-serve:  $BIN"
echo "directory:  $m (m/sub/up -> .., m/self -> $m)"
echo "listen:     127.0.0.1:$port"
start=$(now)
"$BIN" --manifests "$m" --listen "127.0.0.1:$port" >"$work/stdout" 2>"$work/stderr" &
pid=$!
(
	trap 'kill "$nap" 2>/dev/null; exit 0' TERM
	sleep 55 &
	nap=$!
	wait "$nap"
	kill -KILL "$pid" 2>/dev/null
) </dev/null >/dev/null 2>&1 &
watchdog=$!

listen_at=
first_call=
exited=
capped=
peak_hwm=0
sample() { # label
	local hwm rss fds logs up
	hwm=$(status_kb VmHWM)
	rss=$(status_kb VmRSS)
	fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
	logs=$(wc -l <"$work/stderr")
	if listening; then up=yes; else up=no; fi
	[ -n "$hwm" ] && [ "$hwm" -gt "$peak_hwm" ] && peak_hwm=$hwm
	printf '%6s  %9s  %9s  %5s  %9s  %8s\n' "$1" "${hwm:--}" "${rss:--}" "$fds" "$up" "$logs"
	if [ -n "$rss" ] && [ "$rss" -gt $((MAX_RSS_MB * 1024)) ]; then
		capped="RSS passed ${MAX_RSS_MB} MB at ${1}: killed"
		kill -KILL "$pid" 2>/dev/null
	fi
}
watch_until() { # seconds since start: poll listening every 50 ms
	while awk -v a="$start" -v b="$(now)" -v t="$1" 'BEGIN { exit !(b - a < t) }'; do
		if ! kill -0 "$pid" 2>/dev/null; then
			exited=$(since "$start")
			return 1
		fi
		if [ -z "$listen_at" ] && listening; then
			listen_at=$(since "$start")
			first_call=$(ads_call)
		fi
		sleep 0.05
	done
}

printf '%6s  %9s  %9s  %5s  %9s  %8s\n' "t (s)" "VmHWM kB" "VmRSS kB" "fds" "listening" "log lines"
for step in $(seq 1 20); do
	t=$(awk -v s="$step" 'BEGIN { printf "%.1f", s / 2 }')
	watch_until "$t" || break
	sample "$t"
	[ -n "$capped" ] && break
done
late_call=
if [ -z "$exited" ] && [ -z "$capped" ] && watch_until 30; then
	sample 30.0
	if [ -z "$capped" ] && kill -0 "$pid" 2>/dev/null; then
		if listening; then late_call=$(ads_call); else late_call="not listening"; fi
	fi
fi
[ -z "$exited" ] && ! kill -0 "$pid" 2>/dev/null && exited=$(since "$start")
total=$(since "$start")

skipped=$(grep -c 'manifest skipped' "$work/stderr")
loaded=$(grep -c 'manifest loaded' "$work/stderr")
loops=$(grep -c 'WARN.*a loop, not followed' "$work/stderr")
echo
echo "summary"
if [ -n "$listen_at" ]; then
	echo "  time to listen:          ${listen_at} s"
else
	echo "  time to listen:          never (within ${total} s)"
fi
if [ -n "$first_call" ]; then
	read -r connect secs bytes served note <<<"$first_call"
	echo "  first ADS client:        pod served: $served, in ${secs} s (connect ${connect} s, $bytes response bytes${note#-})"
else
	echo "  first ADS client:        not run (never listening)"
fi
if [ "$late_call" = "not listening" ]; then
	echo "  ADS client at 30 s:      not run (not listening)"
elif [ -n "$late_call" ]; then
	read -r connect secs bytes served note <<<"$late_call"
	echo "  ADS client at 30 s:      pod served: $served, in ${secs} s (connect ${connect} s, $bytes response bytes${note#-})"
fi
echo "  peak RSS (VmHWM):        $((peak_hwm / 1024)) MB"
echo "  log lines:               $(wc -l <"$work/stderr") (manifest loaded: $loaded, manifest skipped: $skipped, loop reports: $loops)"
[ -n "$exited" ] && echo "  server exited by itself: at ${exited} s"
[ -n "$capped" ] && echo "  safety cap:              $capped"
echo "  run time:                ${total} s"
if [ "$(wc -l <"$work/stderr")" -gt 0 ]; then
	echo "  first log lines:"
	head -c 2000 "$work/stderr" | head -n 6 | cut -c1-220 | sed 's/^/    /'
fi
