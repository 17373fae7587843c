#!/usr/bin/env bash
# hole-round.sh LABEL BIN W N SRC: cold read, then N times: a clean re-read
# (right after the previous one) and a re-read after dropping 1000 scattered
# pages (fadvise DONTNEED); GiB/s of each, READ requests and their mean latency.
set -uo pipefail
source "$(dirname "$0")/round-start.sh"
clean='' holed=''
for i in $(seq $N); do
  dd if=$W/mnt/data.bin of=/dev/null bs=1M status=none
  clean+="$(dd if=$W/mnt/data.bin of=/dev/null bs=1M 2>&1 | gibs) "
  python3 $S/punch.py $W/mnt/data.bin 1000
  perf record -q -o $W/h.perf -e fuse:fuse_request_send -e fuse:fuse_request_end -a -- dd if=$W/mnt/data.bin of=/dev/null bs=1M 2>$W/dd.txt
  g=$(gibs < $W/dd.txt)
  st=$(perf script -i $W/h.perf -F time,event,trace 2>/dev/null | awk -v c="connection $conn " 'index($0, c) {
      t = $1 + 0; for (i=1;i<=NF;i++) if ($i == "req") r = $(i+1)
      if ($0 ~ /FUSE_READ/) s[r] = t; else if ($0 ~ /request_end/ && (r in s)) { n++; sum += t - s[r]; delete s[r] } }
      END { printf "%d READs %.0f us", n, n ? sum / n * 1e6 : 0 }')
  holed+="$g ($st) "
done
echo "$label load $load cold $cold | clean re-read GiB/s: $clean| after dropping 1000 pages: $holed"
$S/teardown.sh $W
