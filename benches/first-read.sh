#!/usr/bin/env bash
# The first MiB of a large file on fresh mounts, by step, for one or more
# deftfs builds alternated in one sitting (an A/B of the read path's
# latency; benches/mount.sh compares with sshfs and rclone).
#
# Two nodes on loopback; bob serves a $SIZE_MIB MiB random file (kept in
# the page cache); for each build in turn, $MOUNTS fresh mounts (the chunk
# cache deleted between them), each timed from python:
#   stat (lookup), open (DESCRIBE: the manifest), read 1 MiB, total, in ms.
#
# Usage (from the repository, release builds):
#   benches/first-read.sh /path/to/deftfs [/path/to/other/deftfs ...]
# Environment: SIZE_MIB (default 1024), MOUNTS (5), ROUNDS (2: each build
# runs this many times, alternated), SETTLE_S (0.3: between the mount and
# the first stat), TMPDIR (/tmp). Needs root and /dev/fuse, python3.
set -euo pipefail
BENCH=first-read
SIZE_MIB=${SIZE_MIB:-1024}
MOUNTS=${MOUNTS:-5}
ROUNDS=${ROUNDS:-2}
SETTLE_S=${SETTLE_S:-0.3}
(($# > 0)) || { echo "usage: $0 DEFTFS_BIN [DEFTFS_BIN ...]" >&2; exit 2; }
for b in "$@"; do [[ -x $b ]] || { echo "$BENCH: $b is not an executable" >&2; exit 2; }; done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/deftfs-first-read.XXXXXX")
cleanup() {
    grep -q " $WORK/mnt " /proc/mounts && umount -l "$WORK/mnt"
    pkill -TERM -f -- "--home $WORK/" || true
    sleep 0.5
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/files" "$WORK/mnt"
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$WORK/files/data.bin"

# One sitting of build $1: fresh nodes, daemons, $MOUNTS fresh mounts.
sitting() {
    local d=$1 a=$WORK/alice b=$WORK/bob pa pb fp i
    rm -rf "$a" "$b"
    pa=$((40000 + RANDOM % 10000)) pb=$((50000 + RANDOM % 10000))
    "$d" --home "$b" init --name bob --listen "127.0.0.1:$pb" >/dev/null
    "$d" --home "$a" init --name alice --listen "127.0.0.1:$pa" >/dev/null
    fp() { "$d" --home "$1" id | awk '/fingerprint/{print $2}'; }
    "$d" --home "$a" partner add bob --fingerprint "$(fp "$b")" --endpoint "127.0.0.1:$pb" >/dev/null
    "$d" --home "$b" partner add alice --fingerprint "$(fp "$a")" --endpoint "127.0.0.1:$pa" >/dev/null
    "$d" --home "$b" share add files "$WORK/files" --partner alice --access read >/dev/null
    DEFTFS_LOG=warn setsid "$d" --home "$b" daemon 2>>"$WORK/bob.log" &
    DEFTFS_LOG=warn setsid "$d" --home "$a" daemon 2>>"$WORK/alice.log" &
    cat "$WORK/files/data.bin" >/dev/null
    sleep 3 # both daemons up, bob's shares indexed (1 GiB: about 1 s here)
    for i in $(seq "$MOUNTS"); do
        "$d" --home "$a" mount bob:files "$WORK/mnt" >/dev/null
        sleep "$SETTLE_S"
        python3 - "$WORK/mnt/data.bin" <<'PY'
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
t3 = time.perf_counter(); os.close(fd)
print("  stat %.2f  open %.2f  read %.2f  total %.2f ms" % ((t1-t0)*1e3, (t2-t1)*1e3, (t3-t2)*1e3, (t3-t0)*1e3))
PY
        "$d" --home "$a" unmount "$WORK/mnt" >/dev/null
        rm -rf "$a/cache"
    done
    pkill -TERM -f -- "--home $WORK/" || true
    sleep 1
}

for r in $(seq "$ROUNDS"); do
    for d in "$@"; do
        echo "round $r, $d ($("$d" --version 2>/dev/null || echo '?')):"
        sitting "$d"
    done
done
