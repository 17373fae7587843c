#!/usr/bin/env bash
# hole-bench.sh ROUNDS N LABEL=BIN...: hole-round.sh for each build in turn, under flock -o "${BENCH_LOCK:-/work/bench.lock}"
set -uo pipefail
ROUNDS=$1 N=$2; shift 2
SRC=/tmp/rr-src
mkdir -p $SRC
[[ -e $SRC/data.bin ]] || head -c 1073741824 /dev/urandom > $SRC/data.bin
for r in $(seq $ROUNDS); do
  for lb in "$@"; do
    label=${lb%%=*} bin=${lb#*=}
    W=/tmp/rr-$label-$r; rm -rf $W; mkdir -p $W/srv; ln $SRC/data.bin $W/srv/data.bin
    echo -n "round $r "; flock -o "${BENCH_LOCK:-/work/bench.lock}" "$(dirname "$0")"/hole-round.sh $label $bin $W $N $SRC
    grep -q " $W/mnt " /proc/mounts || rm -rf $W
  done
done
