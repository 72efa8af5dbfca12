#!/usr/bin/env bash
# A flood of distinct external names towards dns-proxy with a silent upstream,
# measured.
#
#   bash benches/attacks/dns-flood.sh <path to a dns-serve binary>
#
# Starts, on 127.0.0.1 only:
#
#   - a silent upstream: a UDP socket that reads every question and never
#     answers, in Perl (perl-base is an Essential package on Debian, so it is
#     there on a fresh machine, unlike python3, nc or socat; bash's /dev/udp
#     only sends). It counts the datagrams it was sent;
#   - `dns-serve --listen 127.0.0.1:<free port> --records <one service>
#     --upstream 127.0.0.1:<the silent upstream>` (the example's defaults
#     otherwise: upstream timeout and attempts, and, where the binary has one,
#     the bound on questions waiting for the upstream).
#
# Then floods it, open loop, from one UDP socket on 127.0.0.1: FLOOD_QPS
# (10,000) questions per second for FLOOD_SECONDS (10), each for a different
# name (`r<N>.flood.example A`), sent on schedule whether answered or not, by a
# small Perl sender that also reads the answers (response codes, and answer
# times at /proc/uptime's 10 ms resolution) until 8 s after the flood. (dnsperf
# is closed loop at heart: with tens of thousands of questions outstanding its
# send rate falls to under 2,000/s, so it cannot flood a server that does not
# answer.) During the flood, every 0.5 s, it samples the server's resident
# memory (VmRSS) and peak (VmHWM) from /proc/PID/status and its open file
# descriptors (/proc/PID/fd), and a normal client (dig, UDP, 1 s timeout, one
# try) asks a cluster name (`echo.default.svc.cluster.local`, answered from
# mesh state) every 0.2 s; its latency is dig's own "Query time" (1 ms
# resolution). It samples again every 5 s after the flood and last 30 s after
# it, with five more dig questions. The summary adds the machine's UDP
# receive-buffer drops over the run (RcvbufErrors in /proc/net/snmp) and the
# server's CPU time during the flood.
#
# Bounded in time: about 45 s; a watchdog kills the server, the sender and the
# upstream after 85 s. Everything it started is killed at the end and its
# temporary directory removed.

set -u

usage() {
	echo "usage: $0 <dns-serve binary>" >&2
	exit 2
}
[ $# -eq 1 ] || usage
BIN=$1
[ -x "$BIN" ] || {
	echo "$0: $BIN is not an executable" >&2
	exit 2
}
QPS=${FLOOD_QPS:-10000}
SECONDS_OF_FLOOD=${FLOOD_SECONDS:-10}
AFTER=30

if ! command -v dig >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bind9-dnsutils >/dev/null
fi
for tool in dig perl ss awk; do
	command -v "$tool" >/dev/null || {
		echo "$0: needs $tool" >&2
		exit 2
	}
done
LINGER=8

work=$(mktemp -d "${TMPDIR:-/tmp}/dns-flood.XXXXXX")
pids=()
watchdog=
stop() { # pid: TERM, then KILL if it lingers
	kill -0 "$1" 2>/dev/null || return 0
	kill -TERM "$1" 2>/dev/null
	for _ in 1 2 3 4 5 6 7 8 9 10; do
		kill -0 "$1" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$1" 2>/dev/null
	wait "$1" 2>/dev/null
}
cleanup() {
	[ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null && wait "$watchdog" 2>/dev/null
	for p in "${pids[@]}"; do stop "$p"; done
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { # a port free for UDP and TCP on 127.0.0.1
	local candidate
	for _ in $(seq 1 50); do
		candidate=$((20000 + RANDOM % 40000))
		if [ -z "$(ss -Hanu "( sport = :$candidate )" 2>/dev/null)" ] &&
			[ -z "$(ss -Hant "( sport = :$candidate )" 2>/dev/null)" ]; then
			echo "$candidate"
			return
		fi
	done
	echo "$0: no free port found" >&2
	exit 1
}
port=$(free_port)
upstream_port=$(free_port)
[ "$port" != "$upstream_port" ] || upstream_port=$(free_port)

# --- the silent upstream -------------------------------------------------------
perl -MIO::Socket::INET -e '
	my ($port, $out) = @ARGV;
	my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => $port, Proto => "udp")
		or die "bind 127.0.0.1:$port: $!\n";
	my $n = 0;
	$SIG{TERM} = sub { open(my $f, ">", $out); print $f "$n\n"; close $f; exit 0 };
	my $buffer;
	while (1) { $n++ if defined $s->recv($buffer, 4096) }
' "$upstream_port" "$work/upstream.count" &
upstream_pid=$!
pids+=("$upstream_pid")

# --- the sender (open loop) -------------------------------------------------------
cat >"$work/flood.pl" <<'EOF'
use strict;
use warnings;
use IO::Socket::INET;

my ($port, $qps, $seconds, $linger, $out) = @ARGV;
my $socket = IO::Socket::INET->new(
	PeerAddr => "127.0.0.1", PeerPort => $port, LocalAddr => "127.0.0.1", Proto => "udp",
) or die "socket: $!\n";
$socket->blocking(0);
sub uptime { open(my $f, "<", "/proc/uptime") or die; my $line = <$f>; return (split " ", $line)[0] }
my ($sent, $answered, %codes, %times, @sent_at) = (0, 0);
my $buffer;
my $done = 0;
$SIG{TERM} = sub { $done = 1 };
sub drain {
	my $now = uptime();
	while (defined $socket->recv($buffer, 4096)) {
		next if length($buffer) < 12;
		my ($id, $flags) = unpack("n n", $buffer);
		$answered++;
		$codes{$flags & 0xf}++;
		my $ms = ($now - ($sent_at[$id] // $now)) * 1000;
		$times{$ms < 20 ? "<20ms" : $ms < 100 ? "<100ms" : $ms < 1000 ? "<1s" : $ms < 3000 ? "<3s" : ">=3s"}++;
	}
}
my $start = uptime();
while (!$done) {
	my $elapsed = uptime() - $start;
	last if $elapsed >= $seconds;
	my $due = int(($elapsed + 0.01) * $qps);
	while ($sent < $due) {
		my $id = $sent & 0xffff;
		my $packet = pack("n6", $id, 0x0100, 1, 0, 0, 0)
			. join("", map { chr(length $_) . $_ } split /\./, "r$sent.flood.example")
			. "\0" . pack("n2", 1, 1);
		$sent_at[$id] = $start + $elapsed;
		send($socket, $packet, 0);
		$sent++;
	}
	drain();
	select(undef, undef, undef, 0.002);
}
my $flood_end = uptime();
while (!$done && uptime() - $flood_end < $linger) {
	drain();
	select(undef, undef, undef, 0.01);
}
drain();
my %names = (0 => "NOERROR", 2 => "SERVFAIL", 3 => "NXDOMAIN", 5 => "REFUSED");
open(my $f, ">", $out) or die;
printf $f "sent %d in %.1f s (%.0f/s); answered %d, unanswered %d\n", $sent, $flood_end - $start,
	$sent / (($flood_end - $start) || 1), $answered, $sent - $answered;
print $f "codes " . join(", ", map { ($names{$_} // "rcode $_") . " $codes{$_}" } sort keys %codes) . "\n";
print $f "answer times " . join(", ", map { "$_ " . ($times{$_} // 0) } ("<20ms", "<100ms", "<1s", "<3s", ">=3s")) . "\n";
close $f;
EOF

# --- the server ----------------------------------------------------------------
cat >"$work/records.yaml" <<'EOF'
services:
- name: echo
  namespace: default
  vips: [10.96.0.10]
clients:
  127.0.0.1: default
EOF
"$BIN" --listen "127.0.0.1:$port" --records "$work/records.yaml" --upstream "127.0.0.1:$upstream_port" \
	>"$work/stdout" 2>"$work/stderr" &
pid=$!
pids+=("$pid")
(
	sleep 85
	kill -KILL "$pid" "$upstream_pid" $(cat "$work/flood.pid" 2>/dev/null) 2>/dev/null
) &
watchdog=$!

ask() { # one cluster-name question: prints "<ms> ok" or "- failed"
	local out ms
	out=$(dig @127.0.0.1 -p "$port" -b 127.0.0.1 +tries=1 +time=1 +noall +answer +stats \
		echo.default.svc.cluster.local A 2>/dev/null)
	ms=$(awk '/^;; Query time:/ { print $4 }' <<<"$out")
	if grep -q '10\.96\.0\.10' <<<"$out" && [ -n "$ms" ]; then
		echo "$ms ok"
	else
		echo "- failed"
	fi
}

ready=
for _ in $(seq 1 50); do
	kill -0 "$pid" 2>/dev/null || break
	if [ "$(ask)" != "- failed" ]; then
		ready=yes
		break
	fi
	sleep 0.1
done
[ -n "$ready" ] || {
	echo "$0: the server did not answer on 127.0.0.1:$port" >&2
	cat "$work/stderr" >&2
	exit 1
}

udp_drops() { awk '$1 == "Udp:" && $2 ~ /^[0-9]+$/ { print $6 }' /proc/net/snmp; }
cpu_seconds() { # the server's user + system CPU time
	awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$pid/stat" 2>/dev/null
}
status_kb() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$pid/status" 2>/dev/null; }
fds() { ls "/proc/$pid/fd" 2>/dev/null | wc -l; }
now() { date +%s.%N; }
peak_fds=0
sample() { # label
	local hwm rss n
	hwm=$(status_kb VmHWM)
	rss=$(status_kb VmRSS)
	n=$(fds)
	[ "$n" -gt "$peak_fds" ] && peak_fds=$n
	printf '%7s  %9s  %9s  %6s\n' "$1" "${hwm:--}" "${rss:--}" "$n"
}

for _ in 1 2 3 4 5; do ask; done >"$work/probe.before"
rss_start=$(status_kb VmRSS)
fds_start=$(fds)
drops_start=$(udp_drops)
cpu_start=$(cpu_seconds)

echo "dns-serve:  $BIN"
echo "listen:     127.0.0.1:$port, silent upstream 127.0.0.1:$upstream_port (Perl, reads and never answers)"
echo "flood:      $QPS distinct names/s for $SECONDS_OF_FLOOD s, open loop (Perl sender on 127.0.0.1)"
echo "start:      VmRSS $rss_start kB, $fds_start fds"
echo
printf '%7s  %9s  %9s  %6s\n' "t (s)" "VmHWM kB" "VmRSS kB" "fds"

# --- the flood -------------------------------------------------------------------
start=$(now)
perl "$work/flood.pl" "$port" "$QPS" "$SECONDS_OF_FLOOD" "$LINGER" "$work/flood.out" &
flood_pid=$!
pids+=("$flood_pid")
echo "$flood_pid" >"$work/flood.pid"
(
	while [ ! -e "$work/flood.done" ]; do
		ask
		sleep 0.2
	done >"$work/probe.during"
) &
probe_pid=$!
pids+=("$probe_pid")

elapsed() { awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
next_sample=0.5
while awk -v t="$(elapsed)" -v n="$SECONDS_OF_FLOOD" 'BEGIN { exit !(t < n) }'; do
	if awk -v t="$(elapsed)" -v n="$next_sample" 'BEGIN { exit !(t >= n) }'; then
		sample "$(elapsed)"
		next_sample=$(awk -v n="$next_sample" 'BEGIN { print n + 0.5 }')
	fi
	sleep 0.05
	kill -0 "$pid" 2>/dev/null || break
done
touch "$work/flood.done"
wait "$probe_pid" 2>/dev/null
flood_end=$(now)
sample "end"
rss_end=$(status_kb VmRSS)
hwm_end=$(status_kb VmHWM)
fds_end=$(fds)
cpu_end=$(cpu_seconds)

# --- after the flood ---------------------------------------------------------------
for after in 5 10 15 20 25 $AFTER; do
	while awk -v a="$flood_end" -v b="$(now)" -v t="$after" 'BEGIN { exit !(b - a < t) }'; do
		kill -0 "$pid" 2>/dev/null || break 2
		sleep 0.2
	done
	sample "+$after"
done
rss_after=$(status_kb VmRSS)
fds_after=$(fds)
for _ in 1 2 3 4 5; do ask; done >"$work/probe.after"
alive=yes
kill -0 "$pid" 2>/dev/null || alive="no (exited)"
stop "$flood_pid"
drops_end=$(udp_drops)
stop "$upstream_pid"
upstream_count=$(cat "$work/upstream.count" 2>/dev/null || echo "?")

# --- summary ---------------------------------------------------------------------
latency() { # probe file: "n ok, m failed; median/p90/max ms"
	awk '
		$2 == "ok" { ok++; ms[ok] = $1 } $2 == "failed" { failed++ }
		END {
			if (ok > 0) {
				for (i = 1; i <= ok; i++) for (j = i + 1; j <= ok; j++) if (ms[j] < ms[i]) { t = ms[i]; ms[i] = ms[j]; ms[j] = t }
				p90 = int(ok * 0.9 + 0.999); if (p90 < 1) p90 = 1
				printf "%d answered, %d failed; median %d ms, p90 %d ms, max %d ms\n", ok, failed, ms[int((ok + 1) / 2)], ms[p90], ms[ok]
			} else printf "0 answered, %d failed\n", failed
		}' "$1"
}
echo
echo "summary"
sed 's/^/  flood: /' "$work/flood.out" 2>/dev/null
echo "  upstream datagrams:      $upstream_count (questions the proxy sent the silent upstream)"
echo "  UDP receive drops:       $((drops_end - drops_start)) (RcvbufErrors, whole machine)"
echo "  server CPU in the flood: $(awk -v a="$cpu_start" -v b="${cpu_end:-$cpu_start}" 'BEGIN { printf "%.2f", b - a }') s"
echo "  memory (VmRSS):          start $((rss_start / 1024)) MiB, end of flood $((${rss_end:-0} / 1024)) MiB, ${AFTER} s later $((${rss_after:-0} / 1024)) MiB"
echo "  peak memory (VmHWM):     $((${hwm_end:-0} / 1024)) MiB"
echo "  open fds:                start $fds_start, peak $peak_fds, end of flood $fds_end, ${AFTER} s later $fds_after"
echo "  cluster name, before:    $(latency "$work/probe.before")"
echo "  cluster name, flood:     $(latency "$work/probe.during")"
echo "  cluster name, +${AFTER} s:     $(latency "$work/probe.after")"
echo "  server alive at the end: $alive"
echo "  run time:                $(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"
