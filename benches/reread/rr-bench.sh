#!/usr/bin/env bash
# rr-bench.sh ROUNDS N LABEL=BIN...: for each round, for each build in turn
# (under flock -o "${BENCH_LOCK:-/work/bench.lock}"), one round of
# ${ROUND:-rr-round.sh} on fresh daemons and a fresh mount on /tmp.
# rr-round.sh: cold dd of a 1 GiB file, then N re-reads (dd bs=1M) in GiB/s
# and the FUSE requests the mount got during them (tracepoint
# fuse:fuse_request_send); then N reads of two local 1 GiB files on /tmp
# (ext4, page cache): "order0" written with 4 KiB writes, "large" with
# 4 MiB writes (large folios). hole-bench.sh runs hole-round.sh instead.
set -uo pipefail
ROUNDS=$1 N=$2; shift 2
ROUND=${ROUND:-rr-round.sh}
SRC=/tmp/rr-src
mkdir -p $SRC
[[ -e $SRC/data.bin ]] || head -c 1073741824 /dev/urandom > $SRC/data.bin
if [[ $ROUND == rr-round.sh ]]; then
  [[ -e $SRC/order0.bin ]] || dd if=$SRC/data.bin of=$SRC/order0.bin bs=4k status=none
  [[ -e $SRC/large.bin ]] || dd if=$SRC/data.bin of=$SRC/large.bin bs=4M status=none
fi
for r in $(seq $ROUNDS); do
  for lb in "$@"; do
    label=${lb%%=*} bin=${lb#*=}
    W=/tmp/rr-$label-$r; rm -rf $W; mkdir -p $W/srv; ln $SRC/data.bin $W/srv/data.bin
    echo -n "round $r "; flock -o "${BENCH_LOCK:-/work/bench.lock}" "$(dirname "$0")/$ROUND" $label $bin $W $N $SRC
    grep -q " $W/mnt " /proc/mounts || rm -rf $W
  done
done
