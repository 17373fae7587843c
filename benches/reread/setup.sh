#!/usr/bin/env bash
# setup.sh BIN WORK: pair alice/bob under WORK, share WORK/srv (data.bin 1 GiB), start daemons, mount WORK/mnt.
set -euo pipefail
DEFTFS_BIN=$1 WORK=$2
BENCH=rr
source "$(dirname "$0")/../lib.sh"
mkdir -p $WORK/srv $WORK/mnt
[[ -e $WORK/srv/data.bin ]] || head -c 1073741824 /dev/urandom > $WORK/srv/data.bin
A=$WORK/alice B=$WORK/bob
deftfs_pair $A $B
d --home $B share add files $WORK/srv --partner alice --access read >/dev/null
for h in B A; do
  log=$WORK/daemon-$h.log
  DEFTFS_LOG=info setsid "$DEFTFS_BIN" --home "${!h}" daemon 2>"$log" >&2 &
  echo $! > $WORK/pid-$h
  for i in $(seq 200); do grep -q listening "$log" && break; sleep 0.05; done
done
sleep 3
d --home $A mount bob:files $WORK/mnt
stat $WORK/mnt/data.bin >/dev/null
