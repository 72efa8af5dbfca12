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
# "Served" is measured as a real data plane's first step: one delta ADS call
# (curl, HTTP/2 over cleartext, with a DeltaDiscoveryRequest subscribing to
# every `istio.workload.Address`), timed from connect to the end of the
# response; the client counts as served when the response carries the
# manifest's pod (`echo-1`). The call is made as soon as the port listens (polled
# every 50 ms) and again at 30 s. Time to listen is counted from the launch,
# at 50 ms resolution.
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
for tool in ss curl; do
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

# --- one delta ADS request (gRPC frame: flag, length, DeltaDiscoveryRequest) --
# DeltaDiscoveryRequest { type_url (field 2) = "type.googleapis.com/istio.workload.Address" }
type_url=type.googleapis.com/istio.workload.Address
request=$work/request.bin
{
	printf '\000\000\000\000\054' # uncompressed, 44 bytes
	printf '\022\052'             # field 2, length-delimited, 42 bytes
	printf '%s' "$type_url"
} >"$request"

# Prints "<seconds> <http status> <response bytes> <served: yes/no>".
ads_call() {
	local body=$work/response.bin out
	rm -f "$body"
	out=$(curl -sS -m 5 --http2-prior-knowledge -o "$body" \
		-w '%{time_total} %{http_code} %{size_download}' \
		-H 'content-type: application/grpc' -H 'te: trailers' \
		--data-binary @"$request" \
		"http://127.0.0.1:$port/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources" \
		2>/dev/null) || out=${out:-"- 000 0"}
	if [ -s "$body" ] && grep -aq echo-1 "$body"; then
		echo "$out yes"
	else
		echo "$out no"
	fi
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
	sleep 55
	kill -KILL "$pid" 2>/dev/null
) &
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
loops=$(grep -c 'a loop, not followed' "$work/stderr")
echo
echo "summary"
if [ -n "$listen_at" ]; then
	echo "  time to listen:          ${listen_at} s"
else
	echo "  time to listen:          never (within ${total} s)"
fi
if [ -n "$first_call" ]; then
	read -r secs code bytes served <<<"$first_call"
	echo "  first ADS call:          ${secs} s (HTTP $code, $bytes bytes, pod served: $served)"
else
	echo "  first ADS call:          not made (never listening)"
fi
if [ "$late_call" = "not listening" ]; then
	echo "  ADS call at 30 s:        not made (not listening)"
elif [ -n "$late_call" ]; then
	read -r secs code bytes served <<<"$late_call"
	echo "  ADS call at 30 s:        ${secs} s (HTTP $code, $bytes bytes, pod served: $served)"
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
