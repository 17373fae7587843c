#!/usr/bin/env bash
# rr-round.sh LABEL BIN W N SRC: one build, one round (see rr-bench.sh)
set -uo pipefail
source "$(dirname "$0")/round-start.sh"
sleep ${GAP:-2}
reread() { for i in $(seq $N); do dd if=$W/mnt/data.bin of=/dev/null bs=1M 2>&1 | gibs; echo -n " "; done; }
perf record -q -o $W/req.perf -e fuse:fuse_request_send -a -- bash -c "$(declare -f gibs reread); W=$W N=$N reread" > $W/re.txt 2>/dev/null
reqs=$(perf script -i $W/req.perf 2>/dev/null | awk -v c="connection $conn " 'index($0, c) { for (i=1;i<=NF;i++) if ($i ~ /^\(FUSE_/) n[$i]++ } END { for (k in n) printf "%s=%d ", k, n[k] }')
loc=''
for f in order0 large; do loc+="$f: "; for i in $(seq $N); do loc+="$(dd if=$SRC/$f.bin of=/dev/null bs=1M 2>&1 | gibs) "; done; done
echo "$label load $load cold $cold | re-read GiB/s: $(cat $W/re.txt)| reqs: $reqs| local $loc"
$S/teardown.sh $W
