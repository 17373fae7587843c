#!/usr/bin/env bash
# Side-by-side mount (read path) benchmark on loopback, in one run:
#
#   deftfs  `deftfs mount bob:files MNT` (QUIC, chunk cache in A/cache)
#   sshfs   sshfs over a throwaway sshd (SFTP), default options, -o ro
#   rclone  `rclone mount` of an sftp remote, --vfs-cache-mode full, --read-only
#   local   the same files read directly (page cache): the floor of each figure
#
# on one pseudo-random file of $SIZE_MIB MiB (default 1024) and a directory of
# $NFILES (default 10,000) small files. For each tool it measures
#
#   first MiB   `head -c 1M MNT/data.bin` on a fresh mount, in ms: once on the
#               very first mount, right after the server started (for deftfs
#               the open may wait for the server to chunk + hash the file),
#               then, once the deftfs server is idle (done indexing), on
#               $HEADS (default 3) more fresh mounts; deftfs also reports
#               bytes_fetched after it (`deftfs mounts --json`); and one
#               more fresh mount split into stat / open / read (python3);
#   ls -l       `ls -l MNT/small` on a fresh mount (cold), then again (warm);
#   read        `dd bs=1M` of the whole file on a fresh mount (cold), then
#               again on the same mount (warm re-read), MiB/s, with the CPU
#               seconds of dd, the mount process, the server side and the
#               whole machine during each (deftfs: per thread name too);
#   memory      peak RSS (VmHWM) of the mount process: the deftfs daemon of
#               node A (over all its mounts, since it started); sshfs (its ssh
#               child shown beside it); rclone (the max over its mounts).
#
# ls -l and read are done $REPEAT times (default 2), each on a fresh mount;
# the table shows the best, the details every run. "Fresh mount" means: no
# client-side state left: deftfs unmounts, moves A/cache (chunks and the
# saved metadata) aside and mounts again; rclone also moves its --cache-dir;
# sshfs keeps nothing between mounts. Each mount is a new connection (QUIC
# or SSH) to a server that keeps running. A mount is "ready" when `stat` of
# its root answers (sshfs appears in /proc/mounts before its ssh connection
# is up); every timing starts after that, and the mount times are printed.
#
# Usage (from the repository):
#   CARGO_TARGET_DIR=/work/target-release cargo build --release -p deftfs
#   DEFTFS_BIN=/work/target-release/release/deftfs benches/mount.sh
#   SIZE_MIB=64 DEFTFS_BIN=... benches/mount.sh      # a quick trial
#
# Environment:
#   DEFTFS_BIN   deftfs binary (default: target/release/deftfs in the repo)
#   SIZE_MIB     size of the big file in MiB (default 1024, at least 2)
#   NFILES       number of small files (default 10000)
#   SMALL_BYTES  size of each small file (default 1024)
#   REPEAT       runs of ls -l and of the read, best is reported (default 2)
#   HEADS        fresh mounts for the first-MiB latency (default 3)
#   HEAD_SLEEP   seconds to wait between mount and head (default 0: at once)
#   TOOLS        which tools, in order (default "local deftfs sshfs rclone")
#   TMPDIR       where the temp dir goes (default /tmp); needs ~7x SIZE_MIB
#                of free space; must not contain spaces. The deftfs chunk
#                cache (one file per chunk) and rclone's cache live there, so
#                its filesystem shows in their cold reads (TMPDIR=/dev/shm
#                for tmpfs; see docs/PERFORMANCE.md)
#   SSH_PORT     port of the throwaway sshd on 127.0.0.1 (default 2222)
#
# What it does not do: drop the page cache (that needs root and changes the
# machine for everyone). The server side's files are read once with cat
# before each tool's runs and before each cold read, so every server reads
# from the page cache; "cold" is about the client: a fresh mount has no
# page cache, no attribute cache and no chunk/VFS cache. It does not tune
# sshfs or rclone beyond the flags above (their defaults are what people
# get), does not profile (see docs/PERFORMANCE.md for how to read the CPU
# figures), and does not measure writes (deftfs mounts are read-only).
#
# Needs: root (FUSE mounts, sshd), bash >= 5 (EPOCHREALTIME), GNU time, ss,
# fusermount3, sshfs, rclone, ssh, sshd. If sshfs, rclone, sshd or
# fusermount3 is missing, installs sshfs rclone openssh-server fuse3 with
# apt-get. Network: 127.0.0.1 only. The EXIT trap unmounts everything under
# the temp dir (`umount -l` if a normal unmount fails), stops every process
# it started, checks /proc/mounts and removes the temp dir.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEFTFS_BIN=${DEFTFS_BIN:-$REPO/target/release/deftfs}
SIZE_MIB=${SIZE_MIB:-1024}
NFILES=${NFILES:-10000}
SMALL_BYTES=${SMALL_BYTES:-1024}
REPEAT=${REPEAT:-2}
HEADS=${HEADS:-3}
HEAD_SLEEP=${HEAD_SLEEP:-0}
TOOLS=${TOOLS:-local deftfs sshfs rclone}
SSH_PORT=${SSH_PORT:-2222}
TMPDIR=${TMPDIR:-/tmp}
export TMPDIR

BENCH=mount.sh
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"

for v in SIZE_MIB NFILES SMALL_BYTES REPEAT HEADS; do
    [[ ${!v} =~ ^[0-9]+$ ]] && ((${!v} >= 1)) || die "$v=${!v}: need a whole number >= 1"
done
[[ $HEAD_SLEEP =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "HEAD_SLEEP=$HEAD_SLEEP: need seconds, e.g. 0.5"
((SIZE_MIB >= 2)) || die "SIZE_MIB=$SIZE_MIB: need at least 2"
[[ $(id -u) == 0 ]] || die "needs root (FUSE mounts, a throwaway sshd)"
[[ -n ${EPOCHREALTIME:-} ]] || die "needs bash >= 5 (EPOCHREALTIME)"
for t in $TOOLS; do
    case $t in local | deftfs | sshfs | rclone) ;; *) die "TOOLS: unknown tool $t" ;; esac
done
want() { [[ " $TOOLS " == *" $1 "* ]]; }
if want deftfs; then
    [[ -x $DEFTFS_BIN ]] || die "$DEFTFS_BIN: not an executable (build it, or set DEFTFS_BIN)"
    DEFTFS_BIN=$(cd "$(dirname "$DEFTFS_BIN")" && pwd)/$(basename "$DEFTFS_BIN")
fi
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is needed"
command -v ss >/dev/null || die "ss (iproute2) is needed to find free ports"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing"

if ! command -v sshfs >/dev/null || ! command -v rclone >/dev/null || ! command -v fusermount3 >/dev/null ||
    ! command -v ssh >/dev/null || ! [[ -x /usr/sbin/sshd ]]; then
    echo "installing sshfs rclone openssh-server fuse3 (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sshfs rclone openssh-server fuse3 >/dev/null
fi
SFTP_SERVER=
for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server /usr/libexec/sftp-server; do
    [[ -x $p ]] && { SFTP_SERVER=$p; break; }
done
[[ -n $SFTP_SERVER ]] || die "sftp-server not found (sshfs and rclone need it)"

SIZE=$((SIZE_MIB * 1024 * 1024))
NPROC=$(nproc)
TCK=$(getconf CLK_TCK)
USER_NAME=$(id -un)

# --- temp dir, process bookkeeping, cleanup ---------------------------------

WORK=$(mktemp -d "$TMPDIR/deftfs-mount.XXXXXX")
[[ $WORK != *' '* ]] || die "TMPDIR must not contain spaces"
SRV=$WORK/srv        # what every server shares
MNT=$WORK/mnt        # the one mount point, reused
mkdir -p "$SRV/small" "$MNT"
DAEMON_A= DAEMON_B= SSHD_PID= MOUNT_PID=

# Mount points under the temp dir, as /proc/mounts shows them.
our_mounts() { awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts; }

exec 3>&1 4>&2 # the script's own stdout/stderr, for the cleanup
cleanup() {
    local rc=$? m left
    set +e
    # A signal can land while a function's output goes to a file.
    exec 1>&3 2>&4
    for m in $(our_mounts); do
        fusermount3 -u "$m" 2>/dev/null || umount "$m" 2>/dev/null || umount -l "$m"
    done
    stop_pid "$MOUNT_PID"
    stop_pid "$DAEMON_A"
    stop_pid "$DAEMON_B"
    stop_sshd_and_leftovers
    for m in $(our_mounts); do
        echo "mount.sh: $m still mounted: umount -l" >&2
        umount -l "$m"
    done
    if [[ -n $(our_mounts) ]]; then
        echo "mount.sh: still mounted, temp dir $WORK kept:" >&2
        our_mounts >&2
        exit 1
    fi
    if [[ -n $(pgrep -f -- "$WORK") ]]; then
        echo "mount.sh: processes of this run are still running" >&2
        rc=1
    else
        echo "cleanup: nothing of this run is mounted (/proc/mounts) or running"
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers (more in benches/lib.sh) ------------------------------------

# CPU ticks of a process and of all its live descendants (sshd -> session sshd -> sftp-server).
tree_ticks() {
    local total c
    total=$(proc_ticks "$1")
    for c in $(pgrep -P "$1"); do total=$((total + $(tree_ticks "$c"))); done
    echo "$total"
}
# "busy total" ticks of the whole machine (all CPUs).
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
# Per thread: "tid comm ticks" (to see which thread of a daemon is busy).
thread_ticks() {
    local t s comm
    for t in /proc/"$1"/task/*; do
        s=$(cat "$t/stat" 2>/dev/null) || continue
        comm=$(cat "$t/comm" 2>/dev/null) || continue
        s=${s##*) }
        echo "${t##*/} ${comm// /_} $(awk '{ print $12 + $13 }' <<<"$s")"
    done
}
# thread_delta BEFORE AFTER: CPU seconds per thread name (summed over tids), busiest first.
thread_delta() {
    awk -v t="$TCK" 'NR == FNR { b[$1] = $3; next }
        { d[$2] += $3 - ($1 in b ? b[$1] : 0); n[$2]++ }
        END { for (k in d) if (d[k] > 0) printf "%.2f %s x%d\n", d[k] / t, k, n[k] }' "$1" "$2" | sort -rn | head -6 |
        awk '{ printf "%s%s %s s (%s)", (NR > 1 ? ", " : ""), $2, $1, $3 } END { print "" }'
}


secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b - a }'; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) * 1000 }'; }
mibps() { awk -v s="$1" -v m="$SIZE_MIB" 'BEGIN { printf "%.0f", (s > 0 ? m / s : 0) }'; }

warm_server() { # the server side's files into the page cache
    cat "$SRV/data.bin" >/dev/null
    find "$SRV/small" -type f -exec cat {} + >/dev/null
    ls -l "$SRV/small" >/dev/null
}

is_mounted() { awk -v m="$MNT" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; }
wait_mounted() { # wait_mounted PID LOG: until MNT is in /proc/mounts
    local i
    for i in $(seq 300); do
        is_mounted && return 0
        kill -0 "$1" 2>/dev/null || { cat "$2" >&2; die "the mount process exited"; }
        sleep 0.05
    done
    cat "$2" >&2
    die "$MNT not mounted after 15 s"
}
wait_unmounted() {
    local i
    for i in $(seq 100); do is_mounted || return 0; sleep 0.05; done
    echo "mount.sh: $MNT still mounted, umount -l" >&2
    umount -l "$MNT"
}

# Results, tab-separated: tool key value
RES=()
put() { RES+=("$1"$'\t'"$2"$'\t'"$3"); }
get() { # get TOOL KEY: every value, space-separated
    local r out=()
    for r in "${RES[@]}"; do
        local t k v
        IFS=$'\t' read -r t k v <<<"$r"
        [[ $t == "$1" && $k == "$2" ]] && out+=("$v")
    done
    echo "${out[*]:-}"
}
best_max() { tr ' ' '\n' <<<"$1" | awk 'NF { if (m == "" || $1 > m) m = $1 } END { print (m == "" ? "-" : m) }'; }
best_min() { tr ' ' '\n' <<<"$1" | awk 'NF { if (m == "" || $1 < m) m = $1 } END { print (m == "" ? "-" : m) }'; }

# --- the files -------------------------------------------------------------

echo "deftfs mount bench: $SIZE_MIB MiB file, $NFILES files of $SMALL_BYTES bytes, temp dir $WORK"
echo "tools: $TOOLS; repeat $REPEAT, heads $HEADS, head sleep $HEAD_SLEEP s"
want deftfs && echo "binary: $DEFTFS_BIN ($("$DEFTFS_BIN" --version 2>/dev/null || echo '?')), repo at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "machine: $NPROC cpus, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "temp dir filesystem: $(findmnt -no SOURCE,FSTYPE,OPTIONS -T "$WORK" 2>/dev/null | tr -s ' ' || stat -f -c %T "$WORK")"
echo "versions: $(sshfs --version 2>&1 | grep -i '^sshfs version' || echo 'sshfs ?'); $(rclone version 2>/dev/null | head -1); $(ssh -V 2>&1)"

echo "writing $SIZE_MIB MiB of random data and $NFILES small files"
head -c "$SIZE" /dev/urandom >"$SRV/data.bin"
head -c $((NFILES * SMALL_BYTES)) /dev/urandom | (cd "$SRV/small" && split -b "$SMALL_BYTES" -a 6 -d - f)
[[ $(find "$SRV/small" -type f | wc -l) == "$NFILES" ]] || die "could not create $NFILES small files"

# --- the tools: mount, unmount, which process is the mount ------------------
# mount_fresh TOOL sets DIR (where the files are), MOUNT_PID (the mount
# process: for deftfs the daemon of A) and SERVER_PID (deftfs daemon of B;
# the sshd listener, whose descendants serve SFTP).

A=$WORK/alice B=$WORK/bob
RCACHE=$WORK/rclone-cache
RCONF=$WORK/rclone.conf
S=$WORK/ssh

start_deftfs() {
    local h log pid i
    deftfs_pair "$A" "$B"
    d --home "$B" share add files "$SRV" --partner alice --access read >/dev/null
    for h in B A; do
        log=$WORK/daemon-$h.log
        # debug for deftfs::node: its "shares indexed in" line, if it has one
        DEFTFS_LOG=${DEFTFS_LOG:-info,deftfs::node=debug} "$DEFTFS_BIN" --home "${!h}" daemon 2>"$log" >&2 &
        pid=$!
        if [[ $h == A ]]; then DAEMON_A=$pid; else DAEMON_B=$pid; fi
        for i in $(seq 200); do
            grep -q listening "$log" && break
            kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "daemon $h exited"; }
            sleep 0.05
        done
        grep -q listening "$log" || { cat "$log" >&2; die "daemon $h does not say listening"; }
        if [[ $h == B ]]; then DEFTFS_STARTED=$EPOCHREALTIME; fi
    done
}

start_ssh() {
    start_sshd "$S" "$SFTP_SERVER"
    # rclone's own SFTP client (golang.org/x/crypto/ssh), same key. No hash
    # commands: rclone would otherwise run md5sum/sha1sum over ssh.
    cat >"$RCONF" <<EOF
[bench]
type = sftp
host = 127.0.0.1
port = $SSH_PORT
user = $USER_NAME
key_file = $S/client_key
shell_type = unix
md5sum_command = none
sha1sum_command = none
EOF
}

mount_fresh() {
    local tool=$1 t0
    # The last mount's cache is moved aside, not deleted: on ext4 without a
    # journal, deleting thousands of chunk files makes creating files in the
    # next 30 s slower (the allocator skips recently deleted inodes), which
    # the next cold read would pay. The temp dir goes at exit.
    OLD_N=$((${OLD_N:-0} + 1))
    mkdir -p "$WORK/old"
    case $tool in
    deftfs) [[ ! -e $A/cache ]] || mv "$A/cache" "$WORK/old/deftfs-$OLD_N" ;;
    rclone) [[ ! -e $RCACHE ]] || mv "$RCACHE" "$WORK/old/rclone-$OLD_N" ;;
    esac
    t0=$EPOCHREALTIME
    case $tool in
    local)
        DIR=$SRV MOUNT_PID= SERVER_PID=
        ;;
    deftfs)
        d --home "$A" mount bob:files "$MNT" >"$WORK/mount.out" 2>&1 || { cat "$WORK/mount.out" >&2; die "deftfs mount failed"; }
        is_mounted || die "deftfs mount returned but $MNT is not in /proc/mounts"
        DIR=$MNT MOUNT_PID=$DAEMON_A SERVER_PID=$DAEMON_B
        ;;
    sshfs)
        sshfs -f -o ro -p "$SSH_PORT" -o IdentityFile="$S/client_key" -o StrictHostKeyChecking=no \
            -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR \
            "$USER_NAME@127.0.0.1:$SRV" "$MNT" >"$WORK/sshfs.log" 2>&1 &
        MOUNT_PID=$!
        wait_mounted "$MOUNT_PID" "$WORK/sshfs.log"
        DIR=$MNT SERVER_PID=$SSHD_PID
        ;;
    rclone)
        rclone --config "$RCONF" mount "bench:$SRV" "$MNT" --vfs-cache-mode full --read-only \
            --cache-dir "$RCACHE" --log-file "$WORK/rclone.log" &
        MOUNT_PID=$!
        wait_mounted "$MOUNT_PID" "$WORK/rclone.log"
        DIR=$MNT SERVER_PID=$SSHD_PID
        ;;
    esac
    # Ready = the root answers stat. sshfs shows up in /proc/mounts before
    # its ssh connection is up (~0.3 s here); without this, its first read
    # would pay for the SSH handshake, which deftfs's mount has done before
    # it returns.
    stat "$DIR" >/dev/null
    [[ $tool == local ]] || put "$tool" mount_ms "$(ms "$t0" "$EPOCHREALTIME")"
}

# The ssh process sshfs started (sshfs detaches it; it has our key on its command line).
sshfs_ssh() { pgrep -f -- "-oIdentityFile=$S/client_key" || true; }

# CPU ticks of the client side: the mount process and, for sshfs, its ssh.
client_ticks() {
    local t c
    t=$(tree_ticks "$MOUNT_PID")
    if [[ $1 == sshfs ]]; then
        for c in $(sshfs_ssh); do t=$((t + $(proc_ticks "$c"))); done
    fi
    echo "$t"
}

# wait_idle PID: until the process uses < 3% of a cpu for 0.5 s (max 120 s).
wait_idle() {
    local a b i
    for i in $(seq 240); do
        a=$(proc_ticks "$1")
        sleep 0.5
        b=$(proc_ticks "$1")
        (((b - a) * 100 < 3 * TCK / 2)) && return 0
    done
    echo "mount.sh: process $1 still busy after 120 s" >&2
}

# Peak RSS of this tool's mount processes (KiB), kept over its mounts.
declare -A PEAK_KIB=() PEAK2_KIB=()
note_peak() {
    local tool=$1 k c
    [[ -n $MOUNT_PID ]] || return 0
    k=$(vmhwm_kib "$MOUNT_PID")
    ((k > ${PEAK_KIB[$tool]:-0})) && PEAK_KIB[$tool]=$k
    if [[ $tool == sshfs ]]; then # its ssh (detached: parent is init) does the crypto
        for c in $(sshfs_ssh); do
            k=$(vmhwm_kib "$c")
            ((k > ${PEAK2_KIB[$tool]:-0})) && PEAK2_KIB[$tool]=$k
        done
    fi
    return 0
}

unmount_tool() {
    local tool=$1
    note_peak "$tool"
    case $tool in
    local) return 0 ;;
    deftfs)
        d --home "$A" unmount "$MNT" >/dev/null || die "deftfs unmount failed"
        wait_unmounted
        ;;
    sshfs | rclone)
        fusermount3 -u "$MNT" || umount -l "$MNT"
        stop_pid "$MOUNT_PID"
        MOUNT_PID=
        wait_unmounted
        ;;
    esac
    sync # the next run does not pay for this one's cache writes
}

fetched() { # deftfs: bytes_fetched of the (only) mount
    d --home "$A" mounts --json | grep -o '"bytes_fetched":[0-9]*' | head -1 | cut -d: -f2
}
mount_field() { # deftfs: a numeric field of the (only) mount
    d --home "$A" mounts --json | grep -o "\"$1\":[0-9]*" | head -1 | cut -d: -f2
}

# --- the measurements --------------------------------------------------------

DETAILS=()
detail() { DETAILS+=("$*"); echo "  $*"; }

head_once() { # head_once TOOL LABEL
    local tool=$1 label=$2 t0 t1 v extra=
    mount_fresh "$tool"
    [[ $HEAD_SLEEP == 0 ]] || sleep "$HEAD_SLEEP"
    t0=$EPOCHREALTIME
    head -c 1M "$DIR/data.bin" >/dev/null
    t1=$EPOCHREALTIME
    v=$(ms "$t0" "$t1")
    if [[ $tool == deftfs ]]; then
        extra=" (bytes_fetched $(fetched))"
        put "$tool" fetched_after_head "$(fetched)"
    fi
    put "$tool" "$label" "$v"
    detail "$tool first MiB, $label: $v ms$extra"
    unmount_tool "$tool"
}

# Where the first MiB's time goes, on one more fresh mount: stat (lookup),
# open (deftfs: DESCRIBE, the manifest), read of 1 MiB. Needs python3.
head_breakdown() {
    local tool=$1 out
    command -v python3 >/dev/null || return 0
    mount_fresh "$tool"
    out=$(python3 - "$DIR/data.bin" <<'PY'
import os, sys, time
p = sys.argv[1]
t0 = time.perf_counter(); os.stat(p)
t1 = time.perf_counter(); fd = os.open(p, os.O_RDONLY)
t2 = time.perf_counter(); n = 0
while n < 1 << 20:
    b = os.read(fd, (1 << 20) - n)
    if not b:
        break
    n += len(b)
t3 = time.perf_counter()
# 1 MiB from the middle, not read ahead: same mount, connection up
mid = os.fstat(fd).st_size // 2 // 4096 * 4096
m = 0
while m < 1 << 20:
    b = os.pread(fd, (1 << 20) - m, mid + m)
    if not b:
        break
    m += len(b)
t4 = time.perf_counter(); os.close(fd)
print("stat %.1f ms, open %.1f ms, read 1 MiB %.1f ms; then 1 MiB from the middle %.1f ms"
      % ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3))
PY
    )
    detail "$tool first MiB, by step (python, one more fresh mount): $out"
    unmount_tool "$tool"
}

ls_once() {
    local tool=$1 i=$2 t0 t1 t2 cold warm n
    mount_fresh "$tool"
    t0=$EPOCHREALTIME
    ls -l "$DIR/small" >"$WORK/ls.out"
    t1=$EPOCHREALTIME
    ls -l "$DIR/small" >"$WORK/ls2.out"
    t2=$EPOCHREALTIME
    n=$(grep -c '^-' "$WORK/ls.out" || true)
    [[ $n == "$NFILES" ]] || die "$tool: ls -l shows $n files, not $NFILES"
    cmp -s "$WORK/ls.out" "$WORK/ls2.out" || detail "$tool: the two ls -l outputs differ"
    cold=$(secs "$t0" "$t1") warm=$(secs "$t1" "$t2")
    put "$tool" ls_cold "$cold"
    put "$tool" ls_warm "$warm"
    detail "$tool ls -l $NFILES files, run $i: cold $cold s, warm $warm s"
    unmount_tool "$tool"
}

# CPU bookkeeping around one command: snap_begin; CMD; snap_end NAME
# sets SNAP: "busy X s, reader Y s, mount process Z s, server W s, rest R s".
snap_begin() { # the machine's ticks last, so its window is just the command's
    SN_C0=0 SN_S0=0
    [[ -n $MOUNT_PID ]] && { thread_ticks "$MOUNT_PID" >"$WORK/thr-m0"; SN_C0=$(client_ticks "$tool"); }
    [[ -n $SERVER_PID ]] && { thread_ticks "$SERVER_PID" >"$WORK/thr-s0"; SN_S0=$(tree_ticks "$SERVER_PID"); }
    read -r SN_M0 _ <<<"$(machine_ticks)"
}
snap_end() { # snap_end TIMEFILE (GNU time of the reader: "user sys")
    local m1 c1=0 s1=0 rd
    read -r m1 _ <<<"$(machine_ticks)"
    [[ -n $MOUNT_PID ]] && { c1=$(client_ticks "$tool"); thread_ticks "$MOUNT_PID" >"$WORK/thr-m1"; }
    [[ -n $SERVER_PID ]] && { s1=$(tree_ticks "$SERVER_PID"); thread_ticks "$SERVER_PID" >"$WORK/thr-s1"; }
    rd=$(awk '{ printf "%.2f", $1 + $2 }' "$1")
    SNAP=$(awk -v t="$TCK" -v m0="$SN_M0" -v m1="$m1" -v c0="$SN_C0" -v c1="$c1" -v s0="$SN_S0" -v s1="$s1" -v rd="$rd" \
        -v mp="$([[ $tool == sshfs ]] && echo 'sshfs + ssh' || echo 'mount process')" 'BEGIN {
        b = (m1 - m0) / t; c = (c1 - c0) / t; s = (s1 - s0) / t
        printf "busy (all cpus) %.2f s = reader (dd) %.2f + %s %.2f + server %.2f + rest of machine %.2f", b, rd, mp, c, s, b - rd - c - s }')
}

read_once() {
    local tool=$1 i=$2 t0 t1 t2 cold warm cold_cpu
    warm_server
    mount_fresh "$tool"
    snap_begin
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%U %S' -o "$WORK/dd.time" dd if="$DIR/data.bin" of=/dev/null bs=1M status=none
    t1=$EPOCHREALTIME
    snap_end "$WORK/dd.time"
    cold=$(secs "$t0" "$t1") cold_cpu=$SNAP
    if [[ $tool == deftfs ]]; then
        detail "$tool   busiest threads during the cold read, daemon A (mount): $(thread_delta "$WORK/thr-m0" "$WORK/thr-m1")"
        detail "$tool   busiest threads during the cold read, daemon B (server): $(thread_delta "$WORK/thr-s0" "$WORK/thr-s1")"
    fi
    snap_begin
    t1=$EPOCHREALTIME
    /usr/bin/time -f '%U %S' -o "$WORK/dd.time" dd if="$DIR/data.bin" of=/dev/null bs=1M status=none
    t2=$EPOCHREALTIME
    snap_end "$WORK/dd.time"
    warm=$(secs "$t1" "$t2")
    put "$tool" read_cold_s "$cold"
    put "$tool" read_warm_s "$warm"
    put "$tool" read_cold "$(mibps "$cold")"
    put "$tool" read_warm "$(mibps "$warm")"
    detail "$tool read $SIZE_MIB MiB, run $i: cold $cold s = $(mibps "$cold") MiB/s, warm $warm s = $(mibps "$warm") MiB/s"
    detail "$tool   CPU s during the cold read: $cold_cpu"
    detail "$tool   CPU s during the re-read:   $SNAP"
    [[ $tool == deftfs ]] && detail "$tool   bytes_fetched after both reads: $(fetched)"
    if [[ $tool == deftfs ]]; then
        # Once the reads closed the file, mountd writes a whole copy of it
        # that later opens read through the kernel (FUSE passthrough).
        local waited=0 t3 t4 copied
        while [[ $(mount_field whole_copies) != 1 ]] && ((waited < 600)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        if [[ $(mount_field whole_copies) == 1 ]]; then
            local each=() k
            for k in 1 2 3; do
                t3=$EPOCHREALTIME
                dd if="$DIR/data.bin" of=/dev/null bs=1M status=none
                t4=$EPOCHREALTIME
                copied=$(secs "$t3" "$t4")
                put "$tool" read_copy "$(mibps "$copied")"
                each+=("$(mibps "$copied")")
            done
            detail "$tool   three re-reads from the whole copy (ready $((waited / 10)).$((waited % 10)) s after the re-read), MiB/s: ${each[*]}; passthrough opens $(mount_field passthrough_opens)"
        else
            detail "$tool   no whole copy within 60 s (passthrough off or unavailable)"
        fi
    fi
    if ((i == 1)) && [[ $tool != local ]]; then
        cmp "$SRV/data.bin" "$DIR/data.bin" || die "$tool: $DIR/data.bin differs from the source"
    fi
    unmount_tool "$tool"
}

run_tool() {
    local tool=$1 i
    echo "== $tool"
    case $tool in
    deftfs) start_deftfs ;;
    sshfs | rclone) [[ -n $SSHD_PID ]] || start_ssh ;;
    esac
    warm_server
    head_once "$tool" head_first_ever
    if [[ $tool == deftfs ]]; then
        # A daemon may index its shares when it starts: the measurements
        # below are for a server that has done so (the first-ever open above
        # is the one that may wait for it).
        wait_idle "$DAEMON_B"
        detail "deftfs server idle $(ms "$DEFTFS_STARTED" "$EPOCHREALTIME") ms after it started$(sed -n 's/.*shares indexed in \([0-9.]* s\).*/ (its log: shares indexed in \1)/p' "$WORK/daemon-B.log" | head -1)"
    fi
    for i in $(seq "$HEADS"); do head_once "$tool" head; done
    head_breakdown "$tool"
    warm_server
    for i in $(seq "$REPEAT"); do ls_once "$tool" "$i"; done
    for i in $(seq "$REPEAT"); do read_once "$tool" "$i"; done
    if [[ $tool == deftfs ]]; then
        PEAK_KIB[deftfs]=$(vmhwm_kib "$DAEMON_A")
        PEAK2_KIB[deftfs]=$(vmhwm_kib "$DAEMON_B")
        detail "deftfs daemon A (mounts) VmHWM since start: $((PEAK_KIB[deftfs] / 1024)) MiB; daemon B (server) $((PEAK2_KIB[deftfs] / 1024)) MiB"
        stop_pid "$DAEMON_A"
        DAEMON_A=
        stop_pid "$DAEMON_B"
        DAEMON_B=
    fi
}

for tool in $TOOLS; do run_tool "$tool"; done
if [[ -n $SSHD_PID ]]; then
    for c in $(pgrep -P "$SSHD_PID"); do kill -TERM "$c" 2>/dev/null; done
    stop_pid "$SSHD_PID"
    SSHD_PID=
fi

# --- report ----------------------------------------------------------------

echo
echo "Results: $SIZE_MIB MiB file, $NFILES files of $SMALL_BYTES B, loopback, $NPROC cpus,"
echo "server files in the page cache; best of $REPEAT fresh mounts (first MiB: each mount)"
echo
printf '%-7s %10s %10s %28s %9s %9s %9s\n' tool "cold read" "re-read" "first MiB, fresh mount" "ls -l" "ls -l" "peak RSS"
printf '%-7s %10s %10s %28s %9s %9s %9s\n' "" "MiB/s" "MiB/s" "ms: first ever | then" "cold s" "warm s" "MiB"
for tool in $TOOLS; do
    rss=-
    [[ -n ${PEAK_KIB[$tool]:-} ]] && rss=$((PEAK_KIB[$tool] / 1024))
    [[ $tool == sshfs && -n ${PEAK2_KIB[$tool]:-} ]] && rss="$rss+$((PEAK2_KIB[$tool] / 1024))"
    printf '%-7s %10s %10s %28s %9s %9s %9s\n' "$tool" \
        "$(best_max "$(get "$tool" read_cold)")" "$(best_max "$(get "$tool" read_warm)")" \
        "$(get "$tool" head_first_ever) | $(get "$tool" head)" \
        "$(awk -v v="$(best_min "$(get "$tool" ls_cold)")" 'BEGIN { printf "%.3f", v }')" \
        "$(awk -v v="$(best_min "$(get "$tool" ls_warm)")" 'BEGIN { printf "%.3f", v }')" "$rss"
done
echo
echo "peak RSS: deftfs = VmHWM of node A's daemon (holds the mounts) since it started"
echo "  (node B, the server: $((${PEAK2_KIB[deftfs]:-0} / 1024)) MiB); sshfs = sshfs + its ssh child; rclone = rclone."
echo "mount command until the root answers stat, ms (every mount of the run):"
for tool in $TOOLS; do
    [[ $tool == local ]] || echo "  $tool: $(get "$tool" mount_ms)"
done
if want deftfs; then
    echo "deftfs bytes_fetched after head -c 1M on a fresh mount: $(get deftfs fetched_after_head)"
    echo "deftfs re-read once its whole copy is made (FUSE passthrough), MiB/s: $(get deftfs read_copy) (best $(best_max "$(get deftfs read_copy)"))"
fi
echo
echo "All runs:"
printf '  %s\n' "${DETAILS[@]}"
