#!/usr/bin/env bash
# How long common operations on a mount take while the partner's daemon is
# down (its host up): two nodes on 127.0.0.1, bob mounts alice's share,
# reads and lists some of it, then alice's daemon stops (SIGTERM) and each
# operation below is timed; then alice starts again and the time until
# both files written meanwhile are on her side is printed.
#
#   DEFTFS_BIN=<release>/deftfs TMPDIR=/work benches/offline.sh
#
# Needs root (FUSE). Network: 127.0.0.1 only. Everything it starts is
# stopped, and its temp dir removed, on exit.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEFTFS_BIN=${DEFTFS_BIN:-$REPO/target/release/deftfs}
BENCH=offline
WORK=$(mktemp -d "${TMPDIR:-/tmp}/deftfs-offline.XXXXXX")
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"
A=$WORK/alice B=$WORK/bob SRV=$WORK/srv MNT=$WORK/mnt
PA='' PB=''
cleanup() {
    if awk -v m="$MNT" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; then
        timeout 20 "$DEFTFS_BIN" --home "$B" unmount "$MNT" >/dev/null 2>&1 || umount -l "$MNT"
    fi
    stop_pid "$PB"
    stop_pid "$PA"
    rm -rf "$WORK"
}
trap cleanup EXIT
[[ -x $DEFTFS_BIN ]] || die "$DEFTFS_BIN: not an executable (build it, or set DEFTFS_BIN)"
mkdir -p "$SRV/dir" "$MNT"
echo hello >"$SRV/a.txt"
echo x >"$SRV/dir/b.txt"
deftfs_pair "$A" "$B"
d --home "$A" share add files "$SRV" --partner bob --access read-write >/dev/null
"$DEFTFS_BIN" --home "$A" daemon 2>"$WORK/alice.log" &
PA=$!
"$DEFTFS_BIN" --home "$B" daemon 2>"$WORK/bob.log" &
PB=$!
sleep 1
timeout 60 "$DEFTFS_BIN" --home "$B" mount alice:files "$MNT" >/dev/null
ls -l "$MNT" "$MNT/dir" >/dev/null
cat "$MNT/a.txt" >/dev/null
stop_pid "$PA"
PA=''
t() { # t CMD...: its time, exit status and command line
    local s rc=0
    s=$EPOCHREALTIME
    "$@" >/dev/null 2>&1 || rc=$?
    printf '%6.2f s  rc=%d  %s\n' "$(awk -v a="$s" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')" "$rc" "${*//$WORK\//}"
}
echo "alice's daemon stopped; through bob's mount:"
t ls -l "$MNT"
t ls -l "$MNT/dir"
t stat "$MNT/a.txt"
t cat "$MNT/a.txt"
t cat "$MNT/dir/b.txt" # never read: EIO expected
t sh -c "echo new > '$MNT/new.txt'"
t python3 -c "import os, sys; f = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644); os.write(f, b'x'); os.fsync(f); os.close(f)" "$MNT/new2.txt"
t ls -l "$MNT"
t "$DEFTFS_BIN" --home "$B" status "$MNT/new.txt"
"$DEFTFS_BIN" --home "$A" daemon 2>>"$WORK/alice.log" &
PA=$!
s=$EPOCHREALTIME
for _ in $(seq 300); do [[ -e $SRV/new.txt && -e $SRV/new2.txt ]] && break; sleep 0.1; done
[[ -e $SRV/new.txt && -e $SRV/new2.txt ]] || die "the files written meanwhile never reached alice"
printf '%6.2f s  until both files written meanwhile were on alice after her restart\n' "$(awk -v a="$s" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')"
