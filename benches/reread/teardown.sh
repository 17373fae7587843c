#!/usr/bin/env bash
WORK=$1
fusermount3 -u $WORK/mnt 2>/dev/null || umount -l $WORK/mnt
for h in A B; do [[ -e $WORK/pid-$h ]] && kill $(cat $WORK/pid-$h) 2>/dev/null; done
sleep 1
