#!/usr/bin/env bash
# Side-by-side transfer benchmark on loopback, in one run:
#
#   deftfs  push cold, pull cold, push delta (1 MiB changed in the middle)
#   rsync   -a --whole-file over ssh (cold, then cold with --fsync),
#           -a over ssh (delta, same change)
#   scp     (cold)
#
# all with the same pseudo-random file of $SIZE_MIB MiB (default 1024).
#
# Usage (from the repository):
#   CARGO_TARGET_DIR=/work/target-release cargo build --release -p deftfs
#   DEFTFS_BIN=/work/target-release/release/deftfs benches/compare.sh
#
# Environment:
#   DEFTFS_BIN   deftfs binary (default: target/release/deftfs in the repo)
#   SIZE_MIB     file size in MiB (default 1024, at least 2)
#   TMPDIR       where the temp dir goes (default /tmp); needs ~6x SIZE_MIB
#                of free space; must not contain spaces
#   SSH_PORT     port of the throwaway sshd on 127.0.0.1 (default 2222)
#
# What it does not do: drop the page cache (that needs root and changes the
# machine for everyone). Instead every file a tool reads is read once with
# cat before the tool runs, so every tool reads from the page cache, and
# `sync` runs before each measurement so no tool pays for the previous one's
# writeback. Writes are measured as the tools do them: deftfs fsyncs the
# received file before it reports success, rsync and scp do not; one extra
# rsync row (--fsync) shows what that durability costs rsync.
#
# Needs: bash, GNU time (/usr/bin/time), ss, rsync, ssh, scp, sshd. If rsync
# or sshd is missing and we are root, installs rsync and openssh-server with
# apt-get. Network: 127.0.0.1 only. Every process started here is stopped by
# the EXIT trap, and the temp dir is removed.
#
# Chunk + hash throughput is a separate bench (needs a bench build):
#   CARGO_TARGET_DIR=/work/target-release cargo bench --bench chunk

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEFTFS_BIN=${DEFTFS_BIN:-$REPO/target/release/deftfs}
SIZE_MIB=${SIZE_MIB:-1024}
SSH_PORT=${SSH_PORT:-2222}
TMPDIR=${TMPDIR:-/tmp}
export TMPDIR

BENCH=compare.sh
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"

[[ $SIZE_MIB =~ ^[0-9]+$ ]] && ((SIZE_MIB >= 2)) || die "SIZE_MIB=$SIZE_MIB: need a whole number >= 2"
[[ -x $DEFTFS_BIN ]] || die "$DEFTFS_BIN: not an executable (build it, or set DEFTFS_BIN)"
DEFTFS_BIN=$(cd "$(dirname "$DEFTFS_BIN")" && pwd)/$(basename "$DEFTFS_BIN")
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is needed"
command -v ss >/dev/null || die "ss (iproute2) is needed to find free ports"

if ! command -v rsync >/dev/null || ! command -v ssh >/dev/null || ! command -v scp >/dev/null || ! [[ -x /usr/sbin/sshd ]]; then
    [[ $(id -u) == 0 ]] || die "rsync/ssh/sshd missing and not root: install rsync and openssh-server"
    echo "installing rsync and openssh-server (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync openssh-server >/dev/null
fi
SFTP_SERVER=
for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server /usr/libexec/sftp-server; do
    [[ -x $p ]] && { SFTP_SERVER=$p; break; }
done
[[ -n $SFTP_SERVER ]] || die "sftp-server not found (scp needs it)"

SIZE=$((SIZE_MIB * 1024 * 1024))
NPROC=$(nproc)
TCK=$(getconf CLK_TCK)
USER_NAME=$(id -un)

# --- temp dir, process bookkeeping, cleanup ---------------------------------

WORK=$(mktemp -d "$TMPDIR/deftfs-compare.XXXXXX")
[[ $WORK != *' '* ]] || die "TMPDIR must not contain spaces"
DAEMON_PID=
SSHD_PID=

cleanup() {
    local rc=$? left
    set +e
    stop_pid "$DAEMON_PID"
    stop_sshd_and_leftovers
    for pid in $DAEMON_PID $SSHD_PID; do
        kill -0 "$pid" 2>/dev/null && echo "compare.sh: process $pid is still running" >&2 && rc=1
    done
    if [[ -z $(pgrep -f -- "$WORK") ]]; then
        echo "cleanup: no deftfs daemon, sshd or other process of this run is left"
    else
        echo "compare.sh: processes of this run are still running" >&2
        rc=1
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers -------------------------------------------------------------

# Bytes through the loopback interface (counted once per packet). Includes
# every loopback user on the machine, so read it as an upper bound.
lo_bytes() { awk -F'[: ]+' '$2 == "lo" { print $3 }' /proc/net/dev; }

# Reset a process's peak RSS (Linux >= 4.0); falls back to peak since start.
HWM_RESET=yes
reset_hwm() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null || HWM_RESET=no; }

warm() { # read files into the page cache and flush dirty pages
    local f
    for f in "$@"; do cat "$f" >/dev/null; done
    sync
}

# timed NAME CMD...: run CMD under GNU time; NAME.time = "elapsed user sys maxrss_kib"
timed() {
    local name=$1; shift
    if ! /usr/bin/time -f '%e %U %S %M' -o "$WORK/$name.time" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"; then
        echo "compare.sh: $name failed:" >&2
        cat "$WORK/$name.err" "$WORK/$name.time" >&2
        exit 1
    fi
}

field() { awk -v i="$2" '{ print $i }' "$WORK/$1.time"; }

json_num() { grep -o "\"$2\":[0-9.eE+-]*" "$WORK/$1.out" | head -1 | cut -d: -f2; }

same() { cmp -s "$1" "$2" || die "$2 differs from $1"; }

# Results, one row per measurement (tab-separated):
# tool op secs client_u+s server_u+s client_rss_kib server_rss_kib payload_bytes lo_bytes note
ROWS=()
# measure TOOL OP NAME SERVER_PID SERVER_HWM_FN PAYLOAD NOTE
#   (the command itself was run with `timed NAME` by the caller between
#    measure_begin and measure_end)
measure_begin() {
    M_SRV_T0=$(proc_ticks "$1")
    M_LO0=$(lo_bytes)
}
measure_end() {
    local tool=$1 op=$2 name=$3 srv_pid=$4 srv_rss=$5 payload=$6 note=${7:-}
    sleep 0.3 # let the server reap per-connection children (sshd)
    local srv_t1 lo1 secs cli_cpu srv_cpu cli_rss
    srv_t1=$(proc_ticks "$srv_pid")
    lo1=$(lo_bytes)
    secs=$(field "$name" 1)
    cli_cpu=$(awk '{ printf "%.2f", $2 + $3 }' "$WORK/$name.time")
    srv_cpu=$(awk -v a="$M_SRV_T0" -v b="$srv_t1" -v t="$TCK" 'BEGIN { printf "%.2f", (b - a) / t }')
    cli_rss=$(field "$name" 4)
    # Every field must be non-empty: read collapses adjacent tabs.
    ROWS+=("$tool"$'\t'"$op"$'\t'"$secs"$'\t'"$cli_cpu"$'\t'"$srv_cpu"$'\t'"$cli_rss"$'\t'"${srv_rss:-0}"$'\t'"${payload:--}"$'\t'"$((lo1 - M_LO0))"$'\t'"${note:--}")
    printf '  %-8s %-22s %7.2f s\n' "$tool" "$op" "$secs"
}

# --- the file --------------------------------------------------------------

echo "deftfs compare: $SIZE_MIB MiB, temp dir $WORK"
echo "binary: $DEFTFS_BIN ($("$DEFTFS_BIN" --version 2>/dev/null || echo '?'))"
echo "machine: $NPROC cpus, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
echo "tools: $(rsync --version | head -1); $(ssh -V 2>&1)"

mkdir -p "$WORK/v1" "$WORK/v2"
SRC=$WORK/v1/data.bin # the file
MOD=$WORK/v2/data.bin # the same with 1 MiB changed in the middle
echo "writing $SIZE_MIB MiB of random data"
head -c "$SIZE" /dev/urandom >"$SRC"
cp "$SRC" "$MOD"
dd if=/dev/urandom of="$MOD" bs=1M count=1 seek=$((SIZE_MIB / 2)) conv=notrunc status=none
cmp -s "$SRC" "$MOD" && die "the modified copy is identical"
# Same size: make the new version's mtime clearly later, or rsync's quick
# check (size + mtime, whole seconds) could skip it on a small, fast run.
touch -d "@$(($(stat -c %Y "$SRC") + 60))" "$MOD"

# --- deftfs ---------------------------------------------------------------

A=$WORK/alice B=$WORK/bob
INBOX=$WORK/bob-inbox OUTBOX=$WORK/bob-outbox PULLED=$WORK/alice-pulled
mkdir -p "$INBOX" "$OUTBOX" "$PULLED"
cp "$SRC" "$OUTBOX/data.bin"
deftfs_pair "$A" "$B"
d --home "$B" share add inbox "$INBOX" --partner alice --access write >/dev/null
d --home "$B" share add outbox "$OUTBOX" --partner alice --access read >/dev/null

"$DEFTFS_BIN" --home "$B" daemon >"$WORK/bob-daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 100); do
    [[ -n $(ss -Hlun "sport = :$PORT_B") ]] && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/bob-daemon.log" >&2; die "bob's daemon exited"; }
    sleep 0.1
done
[[ -n $(ss -Hlun "sport = :$PORT_B") ]] || die "bob's daemon does not listen on UDP $PORT_B"
DAEMON_PEAK_KIB=0
DAEMON_RSS_KIB=0
daemon_rss() { # sets DAEMON_RSS_KIB (VmHWM now) and keeps the run's maximum
    DAEMON_RSS_KIB=$(vmhwm_kib "$DAEMON_PID")
    if ((DAEMON_RSS_KIB > DAEMON_PEAK_KIB)); then DAEMON_PEAK_KIB=$DAEMON_RSS_KIB; fi
}

deftfs_op() { # deftfs_op OP NAME NOTE CMD...
    local op=$1 name=$2 note=$3; shift 3
    reset_hwm "$DAEMON_PID"
    measure_begin "$DAEMON_PID"
    timed "$name" "$@"
    daemon_rss
    measure_end deftfs "$op" "$name" "$DAEMON_PID" "$DAEMON_RSS_KIB" "$(json_num "$name" bytes_sent)" "$note"
    echo "$name: $(cat "$WORK/$name.out")" >>"$WORK/deftfs.json"
}

echo "running (every input file is in the page cache; sync before each run)"

# (a) push cold: alice never indexed the file, bob's inbox is empty.
rm -f "$INBOX/data.bin" "$INBOX"/.data.bin.deftpart-*
warm "$SRC"
deftfs_op "push cold" push-cold "sender chunks+hashes first" \
    "$DEFTFS_BIN" --home "$A" send bob inbox "$SRC" --json
same "$SRC" "$INBOX/data.bin"

# (b) pull cold: alice has no copy; bob indexes its outbox file on request.
rm -f "$PULLED/data.bin" "$PULLED"/.data.bin.deftpart-*
warm "$OUTBOX/data.bin"
deftfs_op "pull cold" pull-cold "server chunks+hashes first" \
    "$DEFTFS_BIN" --home "$A" receive bob outbox data.bin "$PULLED/data.bin" --json
same "$SRC" "$PULLED/data.bin"

# (c) push delta: bob's inbox has the old version, alice sends the new one.
warm "$MOD" "$INBOX/data.bin"
deftfs_op "push delta 1 MiB" push-delta "both sides chunk the file" \
    "$DEFTFS_BIN" --home "$A" send bob inbox "$MOD" --json
same "$MOD" "$INBOX/data.bin"

daemon_rss
echo "daemon VmHWM just before stopping it (since the last reset): $DAEMON_RSS_KIB KiB"
stop_pid "$DAEMON_PID"
DAEMON_PID=
rm -rf "$INBOX" "$OUTBOX" "$PULLED"

# --- sshd, rsync, scp --------------------------------------------------------

S=$WORK/ssh
start_sshd "$S" "/usr/bin/time -f %M -o $S/sftp-server.time $SFTP_SERVER"
RSH="ssh ${SSH_OPTS[*]}"
DST=$WORK/ssh-dst
mkdir -p "$DST/rsync" "$DST/scp"

rsync_bytes() { # total bytes sent + received from --stats
    awk '/^Total bytes sent:/ { gsub(",", "", $4); s = $4 } /^Total bytes received:/ { gsub(",", "", $4); r = $4 } END { print s + r }' "$WORK/$1.out"
}
# Peak RSS (KiB) of the remote side: last field of GNU time's last line.
# (sshd drops quotes from the Subsystem line, so sftp-server's format is %M.)
remote_rss() { tail -1 "$1" 2>/dev/null | awk '{ print $NF }' || echo 0; }

# (d) rsync cold: destination absent.
warm "$SRC"
measure_begin "$SSHD_PID"
timed rsync-cold rsync -a --whole-file --stats -e "$RSH" \
    --rsync-path="/usr/bin/time -f '%e %U %S %M' -o $S/rsync-cold.remote rsync" \
    "$SRC" "$USER_NAME@127.0.0.1:$DST/rsync/"
measure_end rsync "cold --whole-file" rsync-cold "$SSHD_PID" "$(remote_rss "$S/rsync-cold.remote")" "$(rsync_bytes rsync-cold)" "no fsync"
same "$SRC" "$DST/rsync/data.bin"

# (d') the same with --fsync: as durable as deftfs, which fsyncs before it
# reports success (extra row, for a like-for-like comparison).
rm -f "$DST/rsync/data.bin"
warm "$SRC"
measure_begin "$SSHD_PID"
timed rsync-cold-fsync rsync -a --whole-file --fsync --stats -e "$RSH" \
    --rsync-path="/usr/bin/time -f '%e %U %S %M' -o $S/rsync-cold-fsync.remote rsync" \
    "$SRC" "$USER_NAME@127.0.0.1:$DST/rsync/"
measure_end rsync "cold --fsync" rsync-cold-fsync "$SSHD_PID" "$(remote_rss "$S/rsync-cold-fsync.remote")" "$(rsync_bytes rsync-cold-fsync)" "fsync, like deftfs"
same "$SRC" "$DST/rsync/data.bin"

# (e) rsync delta: destination has the old version.
warm "$MOD" "$DST/rsync/data.bin"
measure_begin "$SSHD_PID"
timed rsync-delta rsync -a --stats -e "$RSH" \
    --rsync-path="/usr/bin/time -f '%e %U %S %M' -o $S/rsync-delta.remote rsync" \
    "$MOD" "$USER_NAME@127.0.0.1:$DST/rsync/"
measure_end rsync "delta 1 MiB" rsync-delta "$SSHD_PID" "$(remote_rss "$S/rsync-delta.remote")" "$(rsync_bytes rsync-delta)" "no fsync"
same "$MOD" "$DST/rsync/data.bin"
rm -f "$DST/rsync/data.bin"

# (f) scp cold (OpenSSH >= 9 speaks SFTP underneath).
warm "$SRC"
measure_begin "$SSHD_PID"
timed scp-cold scp -q -P "$SSH_PORT" -i "$S/client_key" -o StrictHostKeyChecking=no \
    -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR \
    "$SRC" "$USER_NAME@127.0.0.1:$DST/scp/"
measure_end scp "cold" scp-cold "$SSHD_PID" "$(remote_rss "$S/sftp-server.time")" - "no fsync; SFTP protocol"
same "$SRC" "$DST/scp/data.bin"
rm -f "$DST/scp/data.bin"

stop_pid "$SSHD_PID"
SSHD_PID=

# --- report ----------------------------------------------------------------

mib() { awk -v k="$1" 'BEGIN { if (k == "" || k == 0) print "-"; else printf "%.0f", k / 1024 }'; }
bytes() { awk -v b="$1" 'BEGIN { if (b == "" || b == "-") print "-"; else if (b >= 1048576) printf "%.1f MiB", b / 1048576; else printf "%.0f KiB", b / 1024 }'; }

echo
echo "Results: $SIZE_MIB MiB file, loopback, $NPROC cpus, input in page cache"
echo
printf '%-7s %-18s %8s %8s %14s %14s %9s %9s\n' tool operation seconds MiB/s "payload bytes" "loopback bytes" "RSS cli" "RSS srv"
printf '%-7s %-18s %8s %8s %14s %14s %9s %9s\n' "" "" "" "" "(tool)" "(/proc/net/dev)" "MiB" "MiB"
for row in "${ROWS[@]}"; do
    IFS=$'\t' read -r tool op secs ccpu scpu crss srss payload lo note <<<"$row"
    printf '%-7s %-18s %8.2f %8.1f %14s %14s %9s %9s\n' "$tool" "$op" "$secs" \
        "$(awk -v s="$secs" -v m="$SIZE_MIB" 'BEGIN { print (s > 0 ? m / s : 0) }')" \
        "$(bytes "$payload")" "$(bytes "$lo")" "$(mib "$crss")" "$(mib "$srss")"
done
echo
echo "CPU: user+sys seconds of the client process (with its children) and of the"
echo "server (deftfs daemon; sshd with its session children incl. remote rsync/sftp-server)."
echo "busy = (client + server CPU) / (seconds x $NPROC cpus)."
echo
printf '%-7s %-18s %8s %9s %9s %6s  %s\n' tool operation seconds "cpu cli" "cpu srv" busy note
for row in "${ROWS[@]}"; do
    IFS=$'\t' read -r tool op secs ccpu scpu crss srss payload lo note <<<"$row"
    printf '%-7s %-18s %8.2f %9s %9s %5.0f%%  %s\n' "$tool" "$op" "$secs" "$ccpu" "$scpu" \
        "$(awk -v a="$ccpu" -v b="$scpu" -v s="$secs" -v n="$NPROC" 'BEGIN { print (s > 0 ? 100 * (a + b) / (s * n) : 0) }')" "$note"
done
echo
echo "deftfs --json reports:"
sed 's/^/  /' "$WORK/deftfs.json"
echo
echo "deftfs daemon peak RSS over the run: $(mib "$DAEMON_PEAK_KIB") MiB (per-operation reset of VmHWM: $HWM_RESET)"
echo "payload bytes: deftfs bytes_sent (chunk payload only; a pull can under-count it, see loopback bytes);"
echo "  rsync --stats total bytes sent+received; scp: not reported."
echo "loopback bytes: all bytes through lo during the run (headers, TLS/SSH, and any other loopback traffic on the machine)."
echo "RSS srv: deftfs daemon VmHWM; rsync/scp: the remote rsync / sftp-server (GNU time), sshd itself not counted."
echo "chunk+hash throughput: CARGO_TARGET_DIR=... cargo bench --bench chunk"
