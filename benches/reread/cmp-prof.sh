#!/usr/bin/env bash
# cmp-prof.sh BIN: profile dd re-reading the mounted file and the local order0.bin back to back (needs /tmp/rr-src from rr-bench.sh)
set -uo pipefail
BIN=$1 W=/tmp/rr-cmp SRC=/tmp/rr-src S=$(cd "$(dirname "$0")" && pwd)
rm -rf $W; mkdir -p $W/srv; ln $SRC/data.bin $W/srv/data.bin
$S/setup.sh $BIN $W >/dev/null
for i in 1 2 3; do dd if=$W/mnt/data.bin of=/dev/null bs=1M status=none; dd if=$SRC/order0.bin of=/dev/null bs=1M status=none; done
for f in $W/mnt/data.bin $SRC/order0.bin $W/mnt/data.bin $SRC/order0.bin; do
  perf record -q -o $W/c.perf -- dd if=$f of=/dev/null bs=1M 2>$W/dd.txt
  echo "$f $(tail -1 $W/dd.txt | awk '{print $(NF-1),$NF}') samples $(perf report -i $W/c.perf --stdio 2>/dev/null | grep -m1 'Samples')"
  perf report -i $W/c.perf --no-children --stdio --sort sym 2>/dev/null | grep -E "^ +[0-9]" | head -6
done
$S/teardown.sh $W; rm -rf $W
