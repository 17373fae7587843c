#!/usr/bin/env bash
# hole-bench.sh ROUNDS N LABEL=BIN...: rr-bench.sh with hole-round.sh as its round.
ROUND=hole-round.sh exec "$(dirname "$0")/rr-bench.sh" "$@"
