# Sourced by rr-round.sh and hole-round.sh (arguments LABEL BIN W N SRC):
# fresh daemons and mount under W, the source file in the page cache, a
# cold read of the mounted file. Sets label bin W N SRC S load cold conn
# (the FUSE connection number of the mount, for tracepoint filters) and
# defines gibs (GiB/s from dd's last line).
label=$1 bin=$2 W=$3 N=$4 SRC=$5
S=$(cd "$(dirname "$0")" && pwd)
gibs() { awk '/copied/ { for (i=1;i<=NF;i++) if ($i=="s,") { printf "%.2f", 1/$(i-1) } }'; }
$S/setup.sh $bin $W >/dev/null || exit 1
cat $SRC/data.bin >/dev/null
load=$(cut -d' ' -f1 /proc/loadavg)
cold=$(dd if=$W/mnt/data.bin of=/dev/null bs=1M 2>&1 | gibs)
dev=$(stat -c %d $W/mnt/data.bin); conn=$(( (dev & 0xff) | ((dev >> 12) & ~0xff) ))
