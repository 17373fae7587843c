#!/usr/bin/env bash
# Side-by-side mount (write path) benchmark on loopback, in one run:
#
#   local   the floor: the same commands straight into a directory on the
#           serving side's disk, no network and no mount (what the machine
#           itself takes to write, fsync and untar the same bytes)
#   deftfs  node bob mounts alice's share (`deftfs mount alice:files MNT`),
#           granted to bob `--access $SHARE_ACCESS` (default read-write);
#           writes stage on bob and are pushed back to alice on close and
#           fsync (QUIC)
#   sshfs   sshfs over a throwaway sshd (SFTP), default options (read-write)
#   rclone  `rclone mount` of an sftp remote, --vfs-cache-mode writes
#           (upload after close, after --vfs-write-back, default 5 s)
#   rsync   reference rows for the re-saves only: `rsync -a -I` over ssh
#           of the edited local file onto the server's copy (delta
#           transfer; -I because two versions can share size and mtime)
#
# For each tool, on one mount, in this order:
#
#   write     `dd bs=1M conv=fsync` of a new $SIZE_MIB MiB (default 1024)
#             random file into the mount, from a source in the page cache
#   edit      `dd conv=notrunc,fsync` of 1 MiB of new random bytes at the
#             middle of that file, through the mount
#   insert    the way an application re-saves: `cat INS OLD > MNT/FILE`
#             (100 new bytes, then the edited content, through O_TRUNC),
#             then `sync MNT/FILE` (fsync)
#   ins-1fd   the same kind of re-save (100 other new bytes + the edited
#             content) written by python3 through one file descriptor:
#             open(O_WRONLY|O_TRUNC), write 1 MiB at a time, fsync, close.
#             The shell's `>` (and dd) open the file, dup2 it and close
#             the first descriptor, which sends the file system a FLUSH
#             right after the truncation; this variant does not.
#   tar x     `tar -x --no-same-owner` of a tar of $NFILES (default 10,000)
#             files of 1-8 KiB in $NDIRS (default 100) directories
#
# Each step is timed twice, from the start of the command:
#
#   cmd s      until the command (dd / cat + sync / tar) returns;
#   server s   until the SERVING side holds the complete result: for the
#              big file, the server's copy has the right size and content
#              hash; for tar, the server has all $NFILES files and the
#              tree's hash matches. Polled (every 20 ms) on a cheap signal
#              first: deftfs: `deftfs mounts --json` shows no pending
#              write-back and the size (files) is right (the partner
#              renames a complete, verified file into place); sshfs: the
#              size (files) is right; rclone: its log has one more
#              "Copied (" line per file (upload done) and the size (files)
#              is right. Then the content hash is checked (b3sum, else
#              sha256sum; not counted). If it does not match yet, the
#              script polls the hash until it does and the time includes
#              the last hash (marked "hash-polled").
#
# Bytes on the wire: per-port iptables counters on the loopback interface
# (a chain hooked into INPUT -i lo: every loopback packet passes INPUT
# exactly once). "to srv" counts packets to the server's port (deftfs:
# alice's UDP port; sshfs, rclone, rsync: the sshd's TCP port), "from srv"
# packets from it. The bytes are IP packet lengths: payload + QUIC/TLS or
# SSH framing + UDP/TCP + IP headers, ACKs included, counted from the start
# of the command until the server side is complete. Without iptables the
# script falls back to the rx bytes of `lo` in /proc/net/dev (all loopback
# traffic of the machine, both directions, each packet once) in "to srv".
# Tool-reported payload: deftfs `bytes_sent` summed over the push rows its
# history (`deftfs history --json`, client side, node bob) gained during
# the step, and how many pushes that was; plus `bytes_fetched` of the mount
# (chunks fetched from alice, `deftfs mounts --json`). rsync: --stats total
# bytes sent + received.
#
# CPU: user+sys of the mount process (deftfs: bob's daemon; sshfs: sshfs +
# its ssh; rclone: rclone) and of the server side (deftfs: alice's daemon;
# others: the sshd listener and its session children, sftp-server), from
# /proc/PID/stat, over the same window; the command's own CPU from GNU time;
# "rest" = the machine's busy CPU (/proc/stat) minus all of these: kernel
# threads (page cache writeback), irq/softirq time and anything else
# running on the machine; the details split out the first two.
# Memory: VmHWM (peak RSS) of the mount process and of the server process
# over the tool's whole run.
#
# Usage (from the repository):
#   CARGO_TARGET_DIR=/work/target-release cargo build --release -p deftfs -p deftfs-mountd
#   DEFTFS_BIN=/work/target-release/release/deftfs benches/write.sh
#   SIZE_MIB=64 NFILES=500 DEFTFS_BIN=... benches/write.sh    # a quick trial
#
# Environment:
#   DEFTFS_BIN   deftfs binary (default: target/release/deftfs in the repo)
#   MOUNTD_BIN   daemon of the mounting node bob (default: deftfs-mountd
#                beside DEFTFS_BIN if it is there, else `DEFTFS_BIN daemon`);
#                the serving node alice runs `DEFTFS_BIN daemon`
#   SIZE_MIB     size of the big file in MiB (default 1024, at least 4)
#   NFILES       files in the tar (default 10000); NDIRS directories (100)
#   TOOLS        which tools, in order (default "local deftfs sshfs rclone rsync")
#   STEPS        which steps, in order (default "write edit insert ins-1fd
#                tar"); edit, insert and ins-1fd start from the result of the
#                steps before them, tar from nothing (STEPS=tar: only tar x)
#   SHARE_ACCESS what alice grants bob: read-write (default) or write. With
#                write only (a drop box), new files can be written through
#                the mount, but opening an existing file, for any purpose,
#                fails with EACCES (the mount needs its manifest, a pull),
#                so the edit and insert steps fail
#   RCLONE_WRITE_BACK  rclone --vfs-write-back (default 5s, rclone's default)
#   WAIT_S       bound of each big-file step, command and server side (300)
#   TAR_WAIT_S   bound of the tar step, command and server side (900)
#   HASH_WAIT_S  how long the content hash is polled after the cheap signal
#                said complete, before the step counts as failed (30)
#   TMPDIR       where the temp dir goes (default /tmp); needs ~12x SIZE_MIB
#   SSH_PORT     port of the throwaway sshd on 127.0.0.1 (default 2222)
#   KEEP_LOGS    where the daemon/rclone/sshfs logs are copied at exit
#                (default /tmp/deftfs-write-logs.PID)
#   DEFTFS_LOG   log filter of both deftfs daemons (default info)
#
# A step that fails or times out is reported as such (with the tail of
# the daemon logs); the tool's later steps are skipped, since each starts
# from the previous one's result, and the run goes on with the next tool.
# A command that exits non-zero (tar: "Cannot utime") is reported, and the
# server side is still waited for and checked, so the row shows what
# arrived. deftfs steps also get a timeline (timeline-STEP.txt in
# KEEP_LOGS): the daemons' log events (lease, push accepted with the
# chunks needed and bytes reused, push complete) as seconds after the start
# of the command, and a per-second sample of both daemons' CPU and I/O
# (/proc/PID/stat, /proc/PID/io rchar/wchar).
# A mount that does not unmount is detached with `umount -l` and, for
# FUSE, its connection (only ours, found in /proc/self/mountinfo) aborted.
#
# Needs: root (FUSE, sshd, iptables), bash >= 5, GNU time, python3, ss,
# fusermount3, sshfs, rclone, rsync, ssh, sshd; installs the missing ones
# (and iptables, b3sum) with apt-get. Network: 127.0.0.1 only. The EXIT
# trap unmounts everything under the temp dir, stops every process it
# started, removes its iptables chain, checks /proc/mounts and removes the
# temp dir.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEFTFS_BIN=${DEFTFS_BIN:-$REPO/target/release/deftfs}
SIZE_MIB=${SIZE_MIB:-1024}
NFILES=${NFILES:-10000}
NDIRS=${NDIRS:-100}
TOOLS=${TOOLS:-local deftfs sshfs rclone rsync}
STEPS=${STEPS:-write edit insert ins-1fd tar}
SHARE_ACCESS=${SHARE_ACCESS:-read-write}
RCLONE_WRITE_BACK=${RCLONE_WRITE_BACK:-5s}
WAIT_S=${WAIT_S:-300}
TAR_WAIT_S=${TAR_WAIT_S:-900}
HASH_WAIT_S=${HASH_WAIT_S:-30}
SSH_PORT=${SSH_PORT:-2222}
TMPDIR=${TMPDIR:-/tmp}
KEEP_LOGS=${KEEP_LOGS:-/tmp/deftfs-write-logs.$$}
export TMPDIR

BENCH=write.sh
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"

for v in SIZE_MIB NFILES NDIRS WAIT_S TAR_WAIT_S HASH_WAIT_S; do
    # shellcheck disable=SC2015 # die exits
    [[ ${!v} =~ ^[0-9]+$ ]] && ((${!v} >= 1)) || die "$v=${!v}: need a whole number >= 1"
done
for st in $STEPS; do
    case $st in
    write | edit | insert | ins-1fd | tar) ;;
    *) die "STEPS: no step $st (write edit insert ins-1fd tar)" ;;
    esac
done
((SIZE_MIB >= 4)) || die "SIZE_MIB=$SIZE_MIB: need at least 4"
[[ $(id -u) == 0 ]] || die "needs root (FUSE mounts, a throwaway sshd, iptables counters)"
[[ -n ${EPOCHREALTIME:-} ]] || die "needs bash >= 5 (EPOCHREALTIME)"
for t in $TOOLS; do
    case $t in local | deftfs | sshfs | rclone | rsync) ;; *) die "TOOLS: unknown tool $t" ;; esac
done
case $SHARE_ACCESS in write | read-write) ;; *) die "SHARE_ACCESS=$SHARE_ACCESS: write or read-write" ;; esac
want() { [[ " $TOOLS " == *" $1 "* ]]; }
if want deftfs; then
    [[ -x $DEFTFS_BIN ]] || die "$DEFTFS_BIN: not an executable (build it, or set DEFTFS_BIN)"
    DEFTFS_BIN=$(cd "$(dirname "$DEFTFS_BIN")" && pwd)/$(basename "$DEFTFS_BIN")
    if [[ -z ${MOUNTD_BIN:-} && -x $(dirname "$DEFTFS_BIN")/deftfs-mountd ]]; then
        MOUNTD_BIN=$(dirname "$DEFTFS_BIN")/deftfs-mountd
    fi
    MOUNTD_BIN=${MOUNTD_BIN:-}
fi
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is needed"
command -v python3 >/dev/null || die "python3 is needed (tree generation, JSON)"
command -v ss >/dev/null || die "ss (iproute2) is needed to find free ports"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing"

missing=()
command -v sshfs >/dev/null || missing+=(sshfs)
command -v rclone >/dev/null || missing+=(rclone)
command -v rsync >/dev/null || missing+=(rsync)
command -v fusermount3 >/dev/null || missing+=(fuse3)
{ command -v ssh >/dev/null && [[ -x /usr/sbin/sshd ]]; } || missing+=(openssh-server openssh-client)
command -v iptables >/dev/null || missing+=(iptables)
command -v b3sum >/dev/null || missing+=(b3sum)
if ((${#missing[@]})); then
    echo "installing ${missing[*]} (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
        echo "$BENCH: apt-get install failed; going on with what is there" >&2
fi
for c in sshfs rclone rsync fusermount3 ssh; do command -v "$c" >/dev/null || die "$c is missing"; done
SFTP_SERVER=
for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server /usr/libexec/sftp-server; do
    [[ -x $p ]] && { SFTP_SERVER=$p; break; }
done
[[ -n $SFTP_SERVER ]] || die "sftp-server not found (sshfs and rclone need it)"
if command -v b3sum >/dev/null; then HASH=b3sum; else HASH=sha256sum; fi

SIZE=$((SIZE_MIB * 1024 * 1024))
EDIT_MIB=$((SIZE_MIB / 2))
NPROC=$(nproc)
TCK=$(getconf CLK_TCK)
USER_NAME=$(id -un)

# --- temp dir, process bookkeeping, cleanup ---------------------------------

WORK=$(mktemp -d "$TMPDIR/deftfs-write.XXXXXX")
[[ $WORK != *' '* ]] || die "TMPDIR must not contain spaces"
SRC=$WORK/src # sources, on the client side
MNT=$WORK/mnt # the one mount point, reused
mkdir -p "$SRC" "$MNT"
DAEMON_A='' DAEMON_B='' SSHD_PID='' MOUNT_PID='' CHAIN='' SAMPLER=''

our_mounts() { awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts; }

# Abort the FUSE connection of mount point $1 (only that one): its
# connection directory is named after the minor device number of the
# mount (major 0), which /proc/self/mountinfo gives without touching it.
fuse_abort() {
    local dev minor
    dev=$(awk -v m="$1" '$5 == m { print $3 }' /proc/self/mountinfo | tail -1)
    [[ $dev == 0:* ]] || return 0
    minor=${dev#0:}
    [[ -d /sys/fs/fuse/connections ]] && [[ -n $(ls -A /sys/fs/fuse/connections 2>/dev/null) ]] ||
        mount -t fusectl none /sys/fs/fuse/connections 2>/dev/null || true
    if [[ -e /sys/fs/fuse/connections/$minor/abort ]]; then
        echo "$BENCH: aborting the FUSE connection $minor of $1" >&2
        echo 1 >"/sys/fs/fuse/connections/$minor/abort" || true
    fi
}

force_unmount() { # force_unmount MOUNTPOINT: never blocks for long
    local m=$1
    timeout 20 fusermount3 -u "$m" 2>/dev/null || timeout 20 umount "$m" 2>/dev/null || {
        fuse_abort "$m"
        timeout 20 umount -l "$m" 2>/dev/null || true
    }
}

keep_logs() {
    local f
    mkdir -p "$KEEP_LOGS"
    for f in "$WORK"/*.log "$WORK"/*.out "$WORK"/timeline-*.txt; do [[ -e $f ]] && cp "$f" "$KEEP_LOGS/"; done
    return 0
}

exec 3>&1 4>&2
cleanup() {
    local rc=$? m left
    set +e
    exec 1>&3 2>&4
    for m in $(our_mounts); do
        if [[ -n $DAEMON_B && $m == "$MNT" ]] && kill -0 "$DAEMON_B" 2>/dev/null; then
            timeout 20 "$DEFTFS_BIN" --home "$B" unmount "$m" >/dev/null 2>&1
        fi
        awk -v m="$m" '$2 == m { f = 1 } END { exit !f }' /proc/mounts && force_unmount "$m"
    done
    stop_pid "$SAMPLER"
    stop_pid "$MOUNT_PID"
    stop_pid "$DAEMON_B"
    stop_pid "$DAEMON_A"
    stop_sshd_and_leftovers
    for m in $(our_mounts); do
        echo "$BENCH: $m still mounted: abort + umount -l" >&2
        fuse_abort "$m"
        umount -l "$m"
    done
    if [[ -n $CHAIN ]]; then
        iptables -w -D INPUT -i lo -j "$CHAIN" 2>/dev/null
        iptables -w -F "$CHAIN" 2>/dev/null
        iptables -w -X "$CHAIN" 2>/dev/null
    fi
    keep_logs
    echo "logs of this run: $KEEP_LOGS"
    if [[ -n $(our_mounts) ]]; then
        echo "$BENCH: still mounted, temp dir $WORK kept:" >&2
        our_mounts >&2
        exit 1
    fi
    if [[ -n $(pgrep -f -- "$WORK") ]]; then
        echo "$BENCH: processes of this run are still running" >&2
        rc=1
    else
        echo "cleanup: nothing of this run is mounted (/proc/mounts) or running; iptables chain removed"
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers (more in benches/lib.sh) ----------------------------------------

tree_ticks() { # CPU ticks of a process and its live descendants
    local total c
    total=$(proc_ticks "$1")
    for c in $(pgrep -P "$1"); do total=$((total + $(tree_ticks "$c"))); done
    echo "$total"
}
machine_busy() { awk '/^cpu / { printf "%.0f\n", $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
machine_irq() { awk '/^cpu / { printf "%.0f\n", $7 + $8 }' /proc/stat; } # irq + softirq ticks
# CPU ticks of all kernel threads (kthreadd and its children): page cache
# writeback, block I/O completion, ...
kthread_ticks() {
    awk '{ sub(/^.*\) /, ""); if ($2 == 2 || FILENAME == "/proc/2/stat") t += $12 + $13 } END { printf "%.0f\n", t }' /proc/[0-9]*/stat 2>/dev/null
}
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
mb() { awk -v b="$1" 'BEGIN { printf (b >= 100e6 ? "%.0f" : (b >= 10e6 ? "%.1f" : "%.2f")), b / 1e6 }'; }
cpus() { awk -v a="$1" -v b="$2" -v t="$TCK" 'BEGIN { printf "%.2f", (b - a) / t }'; }
now_ns() { echo "${EPOCHREALTIME/./}000"; }
fsize() { stat -c %s "$1" 2>/dev/null || echo -1; }
hash_of() { "$HASH" <"$1" | cut -d' ' -f1; }
# Hash of a tree: relative path + content hash of every file, sorted.
tree_hash() {
    (cd "$1" && find . -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 -r "$HASH" | "$HASH" | cut -d' ' -f1)
}
# tree_diff: which files of the source tree the server lacks or has different.
tree_diff() {
    python3 - "$SRC/tree" "$SRV/tree" <<'PY'
import hashlib, os, sys
src, dst = sys.argv[1], sys.argv[2]
def files(root):
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out
a, b = files(src), files(dst) if os.path.isdir(dst) else {}
missing = sorted(set(a) - set(b)); extra = sorted(set(b) - set(a))
diff = sorted(k for k in set(a) & set(b) if a[k] != b[k])
print("%d missing, %d different, %d extra on the server; missing %s, different %s, extra %s" % (
    len(missing), len(diff), len(extra), missing[:3], diff[:3], extra[:3]))
PY
}
nfiles() { if [[ -d $1 ]]; then find "$1" -type f | wc -l; else echo 0; fi; }

# --- loopback byte counters ----------------------------------------------------

if command -v iptables >/dev/null && iptables -w -L INPUT -n >/dev/null 2>&1; then
    CHAIN=DEFTFS_WB_$$
    iptables -w -N "$CHAIN"
    iptables -w -I INPUT 1 -i lo -j "$CHAIN"
    WIRE=iptables
else
    echo "$BENCH: no usable iptables: bytes on the wire are lo rx bytes (/proc/net/dev, all loopback traffic)" >&2
    WIRE=lo
fi
count_port() { # count_port udp|tcp PORT: rules that count to/from the port
    [[ $WIRE == iptables ]] || return 0
    iptables -w -A "$CHAIN" -p "$1" --dport "$2"
    iptables -w -A "$CHAIN" -p "$1" --sport "$2"
}
wire() { # wire PROTO PORT: "bytes_to bytes_from" (cumulative)
    if [[ $WIRE == iptables ]]; then
        iptables -w -nvx -L "$CHAIN" | awk -v p="$1" -v d="dpt:$2" -v s="spt:$2" '
            $0 ~ p && $NF == d { to += $2 } $0 ~ p && $NF == s { from += $2 } END { printf "%.0f %.0f\n", to, from }'
    else
        awk '$1 == "lo:" { print $2, 0 }' /proc/net/dev
    fi
}

# --- results -------------------------------------------------------------------

declare -A R=()
put() { R["$1|$2|$3"]=$4; }
rget() { echo "${R["$1|$2|$3"]:--}"; }
DETAILS=()
detail() { DETAILS+=("$*"); echo "  $*"; }
FAILS=()

# --- the sources -----------------------------------------------------------------

echo "deftfs write bench: $SIZE_MIB MiB file, tar of $NFILES files in $NDIRS dirs, temp dir $WORK"
echo "tools: $TOOLS; deftfs share access $SHARE_ACCESS; rclone --vfs-write-back $RCLONE_WRITE_BACK; bytes on the wire: $WIRE; content hash: $HASH"
if want deftfs; then
    echo "binary: $DEFTFS_BIN ($("$DEFTFS_BIN" --version 2>/dev/null || echo '?')); bob's daemon: ${MOUNTD_BIN:-$DEFTFS_BIN daemon}; repo at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
fi
echo "machine: $NPROC cpus, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "temp dir filesystem: $(findmnt -no SOURCE,FSTYPE,OPTIONS -T "$WORK" 2>/dev/null | tr -s ' ' || stat -f -c %T "$WORK")"
echo "versions: $(sshfs --version 2>&1 | grep -i '^sshfs version' || echo 'sshfs ?'); $(rclone version 2>/dev/null | head -1); $(rsync --version | head -1); $(ssh -V 2>&1)"

echo "writing the sources: $SIZE_MIB MiB random file, its two edited versions, $NFILES small files"
V1=$SRC/v1.bin V2=$SRC/v2.bin V3=$SRC/v3.bin V4=$SRC/v4.bin EDIT=$SRC/edit.bin INS=$SRC/ins.bin INS2=$SRC/ins2.bin
head -c "$SIZE" /dev/urandom >"$V1"
head -c $((1024 * 1024)) /dev/urandom >"$EDIT"
head -c 100 /dev/urandom >"$INS"
head -c 100 /dev/urandom >"$INS2"
cp "$V1" "$V2"
dd if="$EDIT" of="$V2" bs=1M seek="$EDIT_MIB" conv=notrunc status=none
cat "$INS" "$V2" >"$V3"
cat "$INS2" "$V2" >"$V4"
H1=$(hash_of "$V1") H2=$(hash_of "$V2") H3=$(hash_of "$V3") H4=$(hash_of "$V4")
python3 - "$SRC/tree" "$NFILES" "$NDIRS" <<'PY'
import os, random, sys
root, n, ndirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(42)
per = -(-n // ndirs)
for i in range(n):
    d = os.path.join(root, "d%03d" % (i // per))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%04d.dat" % i), "wb") as f:
        f.write(os.urandom(rng.randint(1024, 8192)))
PY
tar -cf "$SRC/tree.tar" -C "$SRC" tree
TREE_H=$(tree_hash "$SRC/tree")
TREE_BYTES=$(find "$SRC/tree" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }')
[[ $(nfiles "$SRC/tree") == "$NFILES" ]] || die "could not create $NFILES files"
echo "tree: $NFILES files, $(mb "$TREE_BYTES") MB of content, tar $(mb "$(fsize "$SRC/tree.tar")") MB"
warm() { cat "$V1" "$V2" "$V3" "$V4" "$EDIT" "$INS" "$INS2" "$SRC/tree.tar" >/dev/null; }

# --- the tools ---------------------------------------------------------------------

A=$WORK/alice B=$WORK/bob
S=$WORK/ssh RCONF=$WORK/rclone.conf RCACHE=$WORK/rclone-cache

is_mounted() { awk -v m="$MNT" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; }
wait_mounted() { # wait_mounted PID LOG
    for _ in $(seq 300); do
        is_mounted && return 0
        kill -0 "$1" 2>/dev/null || { cat "$2" >&2; die "the mount process exited"; }
        sleep 0.05
    done
    cat "$2" >&2
    die "$MNT not mounted after 15 s"
}

start_daemon() { # start_daemon HOME LOG BIN...: sets DPID
    local home=$1 log=$2
    shift 2
    DEFTFS_LOG=${DEFTFS_LOG:-info} "$@" --home "$home" 2>"$log" >&2 &
    DPID=$!
    for _ in $(seq 200); do
        grep -q listening "$log" && return 0
        kill -0 "$DPID" 2>/dev/null || { cat "$log" >&2; die "daemon $home exited"; }
        sleep 0.05
    done
    cat "$log" >&2
    die "daemon $home does not say listening"
}

start_deftfs() {
    mkdir -p "$SRV"
    deftfs_pair "$A" "$B"
    d --home "$A" share add files "$SRV" --partner bob --access "$SHARE_ACCESS" >/dev/null
    count_port udp "$PORT_A"
    start_daemon "$A" "$WORK/daemon-alice.log" "$DEFTFS_BIN" daemon
    DAEMON_A=$DPID
    if [[ -n $MOUNTD_BIN ]]; then
        start_daemon "$B" "$WORK/daemon-bob.log" "$MOUNTD_BIN"
    else
        start_daemon "$B" "$WORK/daemon-bob.log" "$DEFTFS_BIN" daemon
    fi
    DAEMON_B=$DPID
    timeout 60 "$DEFTFS_BIN" --home "$B" mount alice:files "$MNT" >"$WORK/mount.out" 2>&1 ||
        { cat "$WORK/mount.out" >&2; die "deftfs mount failed"; }
    is_mounted || die "deftfs mount returned but $MNT is not in /proc/mounts"
    stat "$MNT" >/dev/null
    MOUNT_PID=$DAEMON_B SERVER_PID=$DAEMON_A PROTO=udp PORT=$PORT_A
}

start_ssh() {
    [[ -n $SSHD_PID ]] && return 0
    start_sshd "$S" "$SFTP_SERVER"
    count_port tcp "$SSH_PORT"
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

start_tool() {
    SRV=$WORK/srv-$1 # the serving side's directory for this tool
    mkdir -p "$SRV"
    case $1 in
    local)
        # The commands write into the serving side's directory itself.
        MOUNT_AT=$MNT MNT=$SRV
        MOUNT_PID='' SERVER_PID='' PROTO=udp PORT=0
        ;;
    deftfs) start_deftfs ;;
    sshfs)
        start_ssh
        sshfs -f -p "$SSH_PORT" -o IdentityFile="$S/client_key" -o StrictHostKeyChecking=no \
            -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR \
            "$USER_NAME@127.0.0.1:$SRV" "$MNT" >"$WORK/sshfs.log" 2>&1 &
        MOUNT_PID=$!
        wait_mounted "$MOUNT_PID" "$WORK/sshfs.log"
        stat "$MNT" >/dev/null
        SERVER_PID=$SSHD_PID PROTO=tcp PORT=$SSH_PORT
        ;;
    rclone)
        start_ssh
        rclone --config "$RCONF" mount "bench:$SRV" "$MNT" --vfs-cache-mode writes \
            --vfs-write-back "$RCLONE_WRITE_BACK" --cache-dir "$RCACHE" \
            --log-file "$WORK/rclone.log" --log-level INFO &
        MOUNT_PID=$!
        wait_mounted "$MOUNT_PID" "$WORK/rclone.log"
        stat "$MNT" >/dev/null
        SERVER_PID=$SSHD_PID PROTO=tcp PORT=$SSH_PORT
        ;;
    rsync)
        start_ssh
        MOUNT_PID='' SERVER_PID=$SSHD_PID PROTO=tcp PORT=$SSH_PORT
        ;;
    esac
}

sshfs_ssh() { pgrep -f -- "-oIdentityFile=$S/client_key" || true; }
client_ticks() {
    local t=0 c
    [[ -n $MOUNT_PID ]] && t=$(tree_ticks "$MOUNT_PID")
    if [[ $1 == sshfs ]]; then
        for c in $(sshfs_ssh); do t=$((t + $(proc_ticks "$c"))); done
    fi
    echo "$t"
}
server_ticks() { if [[ -n $SERVER_PID ]]; then tree_ticks "$SERVER_PID"; else echo 0; fi; }

stop_tool() {
    local tool=$1 k c
    if [[ $tool == local ]]; then
        MNT=$MOUNT_AT
        sync
        return 0
    fi
    if [[ $tool == deftfs ]]; then
        put deftfs all rss_cli "$(($(vmhwm_kib "$DAEMON_B") / 1024))"
        put deftfs all rss_srv "$(($(vmhwm_kib "$DAEMON_A") / 1024))"
        if is_mounted; then
            timeout 60 "$DEFTFS_BIN" --home "$B" unmount "$MNT" >/dev/null 2>&1 || {
                echo "$BENCH: deftfs unmount failed or hung: forcing" >&2
                force_unmount "$MNT"
            }
        fi
        stop_pid "$DAEMON_B"
        stop_pid "$DAEMON_A"
        DAEMON_A='' DAEMON_B='' MOUNT_PID=''
    elif [[ $tool == sshfs || $tool == rclone ]]; then
        k=$(vmhwm_kib "$MOUNT_PID")
        if [[ $tool == sshfs ]]; then
            for c in $(sshfs_ssh); do k="$((k / 1024))+$(($(vmhwm_kib "$c") / 1024))"; done
            put "$tool" all rss_cli "$k"
        else
            put "$tool" all rss_cli "$((k / 1024))"
        fi
        force_unmount "$MNT"
        stop_pid "$MOUNT_PID"
        MOUNT_PID=
    fi
    for _ in $(seq 100); do is_mounted || break; sleep 0.05; done
    is_mounted && { echo "$BENCH: $MNT still mounted, umount -l" >&2; fuse_abort "$MNT"; umount -l "$MNT"; }
    sync
}

# deftfs state
pending() { # pending write-backs over all of bob's mounts, or "?" if the daemon does not answer
    local j
    j=$(timeout 10 "$DEFTFS_BIN" --home "$B" mounts --json 2>/dev/null) || { echo "?"; return; }
    grep -o '"pending_writebacks":[0-9]*' <<<"$j" | awk -F: '{ s += $2 } END { printf "%.0f\n", s }'
}
fetched() {
    timeout 10 "$DEFTFS_BIN" --home "$B" mounts --json 2>/dev/null | grep -o '"bytes_fetched":[0-9]*' |
        awk -F: '{ s += $2 } END { printf "%.0f\n", s }'
}
pushes_since() { # pushes_since NS: "count bytes_sent bytes_total" of bob's pushes finished since NS
    timeout 30 "$DEFTFS_BIN" --home "$B" history --json --limit $((NFILES * 3 + 100)) 2>/dev/null | python3 -c '
import json, sys
since = int(sys.argv[1]); n = sent = total = 0
for r in json.load(sys.stdin):
    if r.get("direction") == "push" and r.get("role") == "client" and int(r.get("finished_ns", 0)) >= since:
        n += 1; sent += int(r.get("bytes_sent", 0)); total += int(r.get("bytes_total", 0))
print(n, sent, total)' "$1" 2>/dev/null || echo "? ? ?"
}
copied() { if [[ -f $WORK/rclone.log ]]; then grep -c 'Copied (' "$WORK/rclone.log" || true; else echo 0; fi; }

deftfs_state() { # what the deftfs nodes say, for a failure report
    echo "--- deftfs mounts (bob):"
    timeout 10 "$DEFTFS_BIN" --home "$B" mounts 2>&1 | sed 's/^/    /'
    echo "--- deftfs status $MNT/$BIGNAME (bob):"
    timeout 10 "$DEFTFS_BIN" --home "$B" status "$MNT/$BIGNAME" 2>&1 | sed 's/^/    /'
    echo "--- bob's history (last 5):"
    timeout 10 "$DEFTFS_BIN" --home "$B" history --limit 5 2>&1 | sed 's/^/    /'
    echo "--- bob's daemon log, last 30 lines:"
    tail -30 "$WORK/daemon-bob.log" | sed 's/^/    /'
    echo "--- alice's daemon log, last 30 lines:"
    tail -30 "$WORK/daemon-alice.log" | sed 's/^/    /'
}

fail_step() { # fail_step TOOL STEP MESSAGE
    local msg="$1 $2: $3"
    FAILS+=("$msg")
    put "$1" "$2" note "FAILED: $3"
    echo "$BENCH: $msg" >&2
    if [[ $1 == deftfs ]]; then
        deftfs_state >"$WORK/failure-$2.out" 2>&1
        cat "$WORK/failure-$2.out" >&2
    elif [[ $1 == rclone ]]; then
        tail -20 "$WORK/rclone.log" >&2
    fi
    return 1
}

# The cheap "server side is complete" signal of each tool for the big file.
big_done() { # big_done TOOL EXPECTED_SIZE COPIED_BEFORE
    [[ $(fsize "$SRV/$BIGNAME") == "$2" ]] || return 1
    case $1 in
    deftfs) [[ $(pending) == 0 ]] ;;
    rclone) (($(copied) > $3)) ;;
    *) return 0 ;;
    esac
}
tree_done() { # tree_done TOOL COPIED_BEFORE
    [[ $(nfiles "$SRV/tree") == "$NFILES" ]] || return 1
    case $1 in
    deftfs) [[ $(pending) == 0 ]] ;;
    rclone) (($(copied) - $2 >= NFILES)) ;;
    *) return 0 ;;
    esac
}

BIGNAME=big.bin

# sampler OUT PID...: every 0.25 s a line "time ticks rchar wchar ..." per pid.
sampler() {
    local out=$1 line p
    shift
    while :; do
        line=$EPOCHREALTIME
        for p in "$@"; do
            line+=" $(proc_ticks "$p") $(awk '/^rchar/ { r = $2 } /^wchar/ { w = $2 } END { printf "%.0f %.0f", r, w }' "/proc/$p/io" 2>/dev/null || echo '0 0')"
        done
        echo "$line" >>"$out"
        sleep 0.25
    done
}
# timeline STEP T0 T_CMD T_SRV: deftfs log events and per-second samples, into timeline-STEP.txt;
# prints the one-line summary of the log events.
timeline() {
    python3 - "$WORK/daemon-alice.log" "$WORK/daemon-bob.log" "$WORK/samples-$1.txt" "$2" "$3" "$4" "$TCK" \
        "$WORK/timeline-$1.txt" "$1" "$BIGNAME" <<'PY'
import datetime, re, sys
alog, blog, samples, t0, tcmd, tsrv, tck, out, step, big = sys.argv[1:11]
t0, tcmd, tsrv, tck = float(t0), float(tcmd), float(tsrv), float(tck)
ansi = re.compile(r"\x1b\[[0-9;]*m")
def events(path, who):
    ev = []
    for line in open(path, errors="replace"):
        line = ansi.sub("", line).strip()
        m = re.match(r"(\S+Z)\s+\S+\s+(\S+): (.*)", line)
        if not m:
            continue
        ts = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
        if ts < t0 - 0.05 or ts > tsrv + 1:
            continue
        msg = m.group(3)
        if step != "tar" and ("path=" + big) not in msg:
            continue
        ev.append((ts - t0, who, msg))
    return ev
ev = sorted(events(alog, "alice") + events(blog, "bob"))
lines = ["%s: command returned at %.2f s, server side complete at %.2f s" % (step, tcmd - t0, tsrv - t0)]
def short(msg):
    msg = re.sub(r" (transfer_id|file|fingerprint|partner|share)=\S+", "", msg)
    return msg[:160]
summary = []
if step == "tar":
    n = {}
    for t, who, msg in ev:
        k = who + ":" + msg.split(" ")[0]
        n[k] = n.get(k, 0) + 1
    first = ev[0][0] if ev else 0
    last = ev[-1][0] if ev else 0
    lines.append("log events %.2f .. %.2f s: %s" % (first, last, ", ".join("%s x%d" % kv for kv in sorted(n.items()))))
    queued = [e for e in ev if "write-back queued" in e[2]]
    lines += ["%7.2f s %-5s %s" % (t, w, short(m)) for t, w, m in queued[:20]]
    summary.append("%d log lines; 'write-back queued' %d times" % (len(ev), len(queued)))
else:
    for t, who, msg in ev:
        lines.append("%7.2f s %-5s %s" % (t, who, short(msg)))
        key = None
        if "push accepted" in msg:
            need = re.search(r"need=(\d+)", msg); reused = re.search(r"reused=(\d+)", msg); ch = re.search(r"chunks=(\d+)", msg)
            key = "accepted (chunks %s, need %s, reused %.0f MB)" % (ch.group(1) if ch else "?", need.group(1) if need else "?", int(reused.group(1)) / 1e6 if reused else 0)
        elif "push complete" in msg:
            key = "complete"
        elif "lease taken" in msg:
            key = "lease"
        elif "write-back queued" in msg:
            key = "QUEUED (" + msg + ")"
        if key:
            summary.append("%s %.2f s" % (key, t))
lines.append("")
lines.append("per second: t (s after start)  bob: cpu%  read MB/s  write MB/s | alice: cpu%  read MB/s  write MB/s")
try:
    rows = [list(map(float, l.split())) for l in open(samples) if len(l.split()) == 7]
except FileNotFoundError:
    rows = []
prev = None
for r in rows:
    if prev is None or r[0] - prev[0] >= 1.0 or r is rows[-1]:
        if prev is not None and r[0] > prev[0]:
            dt = r[0] - prev[0]
            f = lambda i: (r[i] - prev[i])
            lines.append("%6.1f  bob %4.0f%% %7.0f %7.0f | alice %4.0f%% %7.0f %7.0f" % (
                r[0] - t0, f(1) / tck / dt * 100, f(2) / dt / 1e6, f(3) / dt / 1e6,
                f(4) / tck / dt * 100, f(5) / dt / 1e6, f(6) / dt / 1e6))
        prev = r
open(out, "w").write("\n".join(lines) + "\n")
print("; ".join(summary))
PY
}

# step TOOL STEP LABEL: runs the step's command, waits for the server side,
# records cmd_s, srv_s, wire, payload and CPU.
step() {
    local tool=$1 st=$2 t0 t1 t2 w0 w1 w0to w0from w1to w1from c0 c1 s0 s1 m0 m1 rc=0 size hash bound ns0 cp0 note='' f0=0 ok p
    local pn psent ptotal
    case $st in
    write) size=$SIZE hash=$H1 bound=$WAIT_S ;;
    edit) size=$SIZE hash=$H2 bound=$WAIT_S ;;
    insert) size=$((SIZE + 100)) hash=$H3 bound=$WAIT_S ;;
    ins-1fd) size=$((SIZE + 100)) hash=$H4 bound=$WAIT_S ;;
    tar) size=- hash=$TREE_H bound=$TAR_WAIT_S ;;
    esac
    warm
    sync
    cp0=$(copied)
    [[ $tool == deftfs ]] && f0=$(fetched)
    ns0=$(now_ns)
    w0=$(wire "$PROTO" "$PORT")
    c0=$(client_ticks "$tool") s0=$(server_ticks) m0=$(machine_busy)
    local k0 k1 q0 q1
    k0=$(kthread_ticks) q0=$(machine_irq)
    if [[ $tool == deftfs ]]; then
        rm -f "$WORK/samples-$st.txt"
        sampler "$WORK/samples-$st.txt" "$DAEMON_B" "$DAEMON_A" &
        SAMPLER=$!
    fi
    : >"$WORK/cmd.err"
    t0=$EPOCHREALTIME
    case $tool:$st in
    rsync:write | rsync:tar) return 0 ;;
    rsync:edit | rsync:insert | rsync:ins-1fd)
        case $st in edit) p=$V2 ;; insert) p=$V3 ;; *) p=$V4 ;; esac
        /usr/bin/time -f '%U %S' -o "$WORK/cmd.time" timeout -k 5 "$bound" \
            rsync -a -I --stats -e "ssh ${SSH_OPTS[*]}" "$p" "$USER_NAME@127.0.0.1:$SRV/$BIGNAME" >"$WORK/rsync.out" 2>&1 || rc=$?
        ;;
    *:write)
        /usr/bin/time -f '%U %S' -o "$WORK/cmd.time" timeout -k 5 "$bound" \
            dd if="$V1" of="$MNT/$BIGNAME" bs=1M conv=fsync status=none 2>"$WORK/cmd.err" || rc=$?
        ;;
    *:edit)
        /usr/bin/time -f '%U %S' -o "$WORK/cmd.time" timeout -k 5 "$bound" \
            dd if="$EDIT" of="$MNT/$BIGNAME" bs=1M seek="$EDIT_MIB" count=1 conv=notrunc,fsync status=none 2>"$WORK/cmd.err" || rc=$?
        ;;
    *:insert)
        # shellcheck disable=SC2016 # expanded by sh
        /usr/bin/time -f '%U %S' -o "$WORK/cmd.time" timeout -k 5 "$bound" \
            sh -c 'cat "$1" "$2" >"$3" && sync "$3"' sh "$INS" "$V2" "$MNT/$BIGNAME" 2>"$WORK/cmd.err" || rc=$?
        ;;
    *:ins-1fd)
        /usr/bin/time -f '%U %S' -o "$WORK/cmd.time" timeout -k 5 "$bound" python3 -c '
import os, sys
fd = os.open(sys.argv[3], os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o644)
for src in sys.argv[1:3]:
    with open(src, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            while b:
                b = b[os.write(fd, b):]
os.fsync(fd)
os.close(fd)' "$INS2" "$V2" "$MNT/$BIGNAME" 2>"$WORK/cmd.err" || rc=$?
        ;;
    *:tar)
        /usr/bin/time -f '%U %S' -o "$WORK/cmd.time" timeout -k 5 "$bound" \
            tar -x --no-same-owner -f "$SRC/tree.tar" -C "$MNT" 2>"$WORK/cmd.err" || rc=$?
        ;;
    esac
    t1=$EPOCHREALTIME
    local failed=''
    if ((rc == 124 || rc == 137)); then
        stop_pid "$SAMPLER"
        SAMPLER=''
        fail_step "$tool" "$st" "the command did not return within $bound s (killed by timeout)"
        return 1
    elif ((rc != 0)); then
        [[ $tool == rsync ]] && cat "$WORK/rsync.out" >&2
        # Report it, and still look at what reached the server.
        failed="exit $rc after $(secs "$t0" "$t1") s: $(grep -v 'Exiting with failure' "$WORK/cmd.err" | head -3 | tr '\n' ' ')"
        FAILS+=("$tool $st: the command failed ($failed)")
        note="FAILED: $failed"
        detail "$tool $st: the command failed: $failed($(grep -c . "$WORK/cmd.err") lines on stderr)"
    fi
    # The cheap signal, bounded.
    ok=
    while :; do
        if [[ $st == tar ]]; then tree_done "$tool" "$cp0" && ok=1; else big_done "$tool" "$size" "$cp0" && ok=1; fi
        [[ -n $ok ]] && break
        if (($(secs "$t0" "$EPOCHREALTIME" | cut -d. -f1) >= bound)); then break; fi
        sleep 0.02
    done
    t2=$EPOCHREALTIME
    if [[ -z $ok ]]; then
        stop_pid "$SAMPLER"
        SAMPLER=''
        if [[ $st == tar ]]; then
            fail_step "$tool" "$st" "the server side was not complete $bound s after the start ($(nfiles "$SRV/tree") of $NFILES files on the server$([[ $tool == deftfs ]] && echo ", pending write-backs: $(pending)")$([[ $tool == rclone ]] && echo ", uploads logged: $(($(copied) - cp0))"))"
        else
            fail_step "$tool" "$st" "the server side was not complete $bound s after the start (server file size $(fsize "$SRV/$BIGNAME"), want $size$([[ $tool == deftfs ]] && echo ", pending write-backs: $(pending)"))"
        fi
        return 1
    fi
    # Counters right when the server side was complete.
    w1=$(wire "$PROTO" "$PORT")
    c1=$(client_ticks "$tool") s1=$(server_ticks) m1=$(machine_busy)
    k1=$(kthread_ticks) q1=$(machine_irq)
    # Content check (not timed); poll it if it does not match yet.
    local tcheap=$t2
    while :; do
        if [[ $st == tar ]]; then
            [[ $(tree_hash "$SRV/tree") == "$hash" ]] && break
        else
            [[ $(hash_of "$SRV/$BIGNAME") == "$hash" ]] && break
        fi
        if [[ $note != *hash-polled* ]]; then
            detail "$tool $st: the server's content did not match at the cheap signal; polling its hash"
            note="${note:+$note; }hash-polled"
        fi
        # A failed big-file command will not get there: no need to wait.
        if [[ -n $failed && $st != tar ]] || (($(secs "$tcheap" "$EPOCHREALTIME" | cut -d. -f1) >= HASH_WAIT_S)); then
            stop_pid "$SAMPLER"
            SAMPLER=''
            if [[ $st == tar ]]; then
                tree_diff >"$WORK/tree-diff-$tool.out"
                fail_step "$tool" "$st" "${failed:+command $failed; }the server's tree never matched the source within $HASH_WAIT_S s of having $NFILES files: $(head -1 "$WORK/tree-diff-$tool.out")"
            else
                fail_step "$tool" "$st" "${failed:+command $failed; }the server's content is not the expected one$([[ -z $failed ]] && echo " within $HASH_WAIT_S s of having the right size")"
            fi
            return 1
        fi
        sleep 0.2
        t2=$EPOCHREALTIME
        w1=$(wire "$PROTO" "$PORT")
        c1=$(client_ticks "$tool") s1=$(server_ticks) m1=$(machine_busy)
    done
    stop_pid "$SAMPLER"
    SAMPLER=''
    if [[ $tool == deftfs ]]; then
        detail "deftfs $st timeline (s after the start; details in timeline-$st.txt): $(timeline "$st" "$t0" "$t1" "$t2")"
    fi
    read -r w0to w0from <<<"$w0"
    read -r w1to w1from <<<"$w1"
    put "$tool" "$st" cmd_s "$(secs "$t0" "$t1")"
    put "$tool" "$st" srv_s "$(secs "$t0" "$t2")"
    put "$tool" "$st" to "$((w1to - w0to))"
    put "$tool" "$st" from "$((w1from - w0from))"
    # GNU time puts "Command exited with non-zero status N" first if it did
    put "$tool" "$st" cpu_cmd "$(tail -1 "$WORK/cmd.time" | awk '{ printf "%.2f", $1 + $2 }')"
    put "$tool" "$st" cpu_cli "$(cpus "$c0" "$c1")"
    put "$tool" "$st" cpu_srv "$(cpus "$s0" "$s1")"
    # busy: the machine's CPU over the window, of all cpus (not shown below 0.3 s: tick granularity)
    put "$tool" "$st" busy "$(awk -v a="$m0" -v b="$m1" -v t="$TCK" -v n="$NPROC" -v s="$(secs "$t0" "$t2")" 'BEGIN { if (s < 0.3) print "-"; else printf "%.0f%%", (b - a) / t / n / s * 100 }')"
    put "$tool" "$st" kthreads "$(cpus "$k0" "$k1")"
    put "$tool" "$st" irq "$(cpus "$q0" "$q1")"
    # rest: CPU of everything else on the machine over the window (other users' jobs show here)
    put "$tool" "$st" rest "$(awk -v a="$m0" -v b="$m1" -v t="$TCK" -v c="$(rget "$tool" "$st" cpu_cmd)" -v k="$(rget "$tool" "$st" cpu_cli)" -v v="$(rget "$tool" "$st" cpu_srv)" 'BEGIN { printf "%.2f", (b - a) / t - c - k - v }')"
    [[ -n $note ]] && put "$tool" "$st" note "$note"
    local extra=
    case $tool in
    deftfs)
        read -r pn psent ptotal <<<"$(pushes_since "$ns0")"
        local f1
        f1=$(fetched)
        put deftfs "$st" reported "$psent"
        put deftfs "$st" pushes "$pn"
        put deftfs "$st" fetched "$((f1 - f0))"
        extra="; history: $pn push(es), bytes_sent $psent of bytes_total $ptotal; bytes_fetched +$((f1 - f0))"
        ;;
    rsync)
        local rs
        rs=$(awk -F': ' '/^Total bytes sent/ { gsub(/,/, "", $2); s = $2 } /^Total bytes received/ { gsub(/,/, "", $2); r = $2 } END { printf "%.0f\n", s + r }' "$WORK/rsync.out")
        put rsync "$st" reported "$rs"
        extra="; rsync --stats sent+received $rs"
        ;;
    rclone) extra="; uploads logged: $(($(copied) - cp0))" ;;
    esac
    detail "$tool $st: command $(rget "$tool" "$st" cmd_s) s, server complete $(rget "$tool" "$st" srv_s) s; wire to srv $(mb "$((w1to - w0to))") MB, from srv $(mb "$((w1from - w0from))") MB$extra; CPU cmd $(rget "$tool" "$st" cpu_cmd) s, mount process $(rget "$tool" "$st" cpu_cli) s, server $(rget "$tool" "$st" cpu_srv) s, rest of machine $(rget "$tool" "$st" rest) s (of which kernel threads $(rget "$tool" "$st" kthreads) s, irq+softirq $(rget "$tool" "$st" irq) s), machine busy $(rget "$tool" "$st" busy)${note:+ ($note)}"
    return 0
}

run_tool() {
    local tool=$1 st
    echo "== $tool"
    start_tool "$tool"
    if [[ $tool == rsync ]]; then
        # rsync only re-saves: the server starts with the first version.
        cp "$V1" "$SRV/$BIGNAME"
        sync
    fi
    for st in $STEPS; do
        [[ $tool == rsync && ($st == write || $st == tar) ]] && continue
        if ! step "$tool" "$st"; then
            detail "$tool: $st failed; its later steps are skipped"
            break
        fi
        [[ $tool == deftfs ]] && detail "deftfs after $st: daemon bob (mounts) VmHWM $(($(vmhwm_kib "$DAEMON_B") / 1024)) MiB, alice (serves) $(($(vmhwm_kib "$DAEMON_A") / 1024)) MiB"
    done
    stop_tool "$tool"
}

for tool in $TOOLS; do run_tool "$tool"; done
if [[ -n $SSHD_PID ]]; then
    for c in $(pgrep -P "$SSHD_PID"); do kill -TERM "$c" 2>/dev/null; done
    stop_pid "$SSHD_PID"
    SSHD_PID=
fi

# --- report --------------------------------------------------------------------------

fmt_b() { if [[ $1 == - || $1 == '?' ]]; then echo "$1"; else mb "$1"; fi; }
echo
echo "Results: $SIZE_MIB MiB file (edit: 1 MiB at $EDIT_MIB MiB; insert, ins-1fd: 100 B at 0), tar of $NFILES files"
echo "($(mb "$TREE_BYTES") MB), loopback, $NPROC cpus; times from the start of the command, s; wire MB = 10^6 bytes"
echo
printf '%-7s %-7s %7s %9s %9s %9s %11s %7s %7s %7s %6s %5s  %s\n' step tool "cmd s" "server s" "to srv" "from srv" "reported" "cpu cmd" "cpu cli" "cpu srv" "rest" busy note
printf '%-7s %-7s %7s %9s %9s %9s %11s %7s %7s %7s %6s %5s\n' "" "" "" "complete" "MB" "MB" "payload MB" s s s s ""
for st in $STEPS; do
    for tool in $TOOLS; do
        [[ $tool == rsync && ($st == write || $st == tar) ]] && continue
        rep=$(rget "$tool" "$st" reported)
        [[ $rep != - ]] && rep=$(fmt_b "$rep")
        [[ $tool == deftfs && $(rget deftfs "$st" pushes) != - ]] && rep="$rep/$(rget deftfs "$st" pushes)p"
        n=$(rget "$tool" "$st" note)
        [[ $n == - ]] && n=''
        if [[ $tool == deftfs && $(rget deftfs "$st" fetched) != - && $(rget deftfs "$st" fetched) != 0 ]]; then
            n="fetched $(fmt_b "$(rget deftfs "$st" fetched)") MB${n:+; $n}"
        fi
        printf '%-7s %-7s %7s %9s %9s %9s %11s %7s %7s %7s %6s %5s  %s\n' "$st" "$tool" \
            "$(rget "$tool" "$st" cmd_s)" "$(rget "$tool" "$st" srv_s)" \
            "$(fmt_b "$(rget "$tool" "$st" to)")" "$(fmt_b "$(rget "$tool" "$st" from)")" "$rep" \
            "$(rget "$tool" "$st" cpu_cmd)" "$(rget "$tool" "$st" cpu_cli)" "$(rget "$tool" "$st" cpu_srv)" \
            "$(rget "$tool" "$st" rest)" "$(rget "$tool" "$st" busy)" "$n"
    done
done
echo
echo "to srv / from srv: IP bytes of the packets to / from the server's port ($WIRE), from the start"
echo "  of the command until the server side was complete. reported: deftfs bytes_sent summed over the"
echo "  pushes in bob's history during the step (/Np = N pushes; 'fetched' = bytes_fetched from alice);"
echo "  rsync --stats bytes sent + received. cpu cli = the mount process (deftfs: bob's daemon; sshfs:"
echo "  sshfs + ssh), cpu srv = alice's daemon or sshd + sftp-server; rest = the rest of the machine"
echo "  (kernel threads, other users' jobs); busy = all cpus over the window (- below 0.3 s)."
for tool in $TOOLS; do
    case $tool in
    deftfs) echo "peak RSS (VmHWM): deftfs bob (mounts) $(rget deftfs all rss_cli) MiB, alice (serves) $(rget deftfs all rss_srv) MiB" ;;
    sshfs) echo "peak RSS (VmHWM): sshfs + its ssh $(rget sshfs all rss_cli) MiB" ;;
    rclone) echo "peak RSS (VmHWM): rclone $(rget rclone all rss_cli) MiB" ;;
    esac
done
if ((${#FAILS[@]})); then
    echo
    echo "FAILURES:"
    printf '  %s\n' "${FAILS[@]}"
fi
echo
echo "All steps:"
printf '  %s\n' "${DETAILS[@]}"
