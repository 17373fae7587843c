# Helpers shared by the benchmark scripts (sourced, not run). The caller
# sets BENCH (its name, for messages), WORK (its temp dir), DEFTFS_BIN,
# SSH_PORT, USER_NAME and SFTP_SERVER before using them.

die() { echo "$BENCH: $*" >&2; exit 1; }

stop_pid() { # stop_pid PID: TERM, wait up to 5 s, then KILL
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# stop_sshd_and_leftovers: stop the throwaway sshd (its per-connection
# children first) and KILL anything still running with $WORK on its
# command line: it is ours.
stop_sshd_and_leftovers() {
    local c left
    if [[ -n ${SSHD_PID:-} ]]; then
        for c in $(pgrep -P "$SSHD_PID"); do kill -TERM "$c" 2>/dev/null; done
        stop_pid "$SSHD_PID"
    fi
    left=$(pgrep -f -- "$WORK")
    if [[ -n $left ]]; then
        echo "$BENCH: killing leftover processes: $left" >&2
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null
        sleep 0.2
    fi
}

free_udp_port() {
    local p
    for _ in $(seq 100); do
        p=$((40000 + RANDOM % 20000))
        [[ -z $(ss -Hlun "sport = :$p") ]] && { echo "$p"; return; }
    done
    die "no free UDP port found"
}

# CPU ticks of a process (all its threads) and of its waited-for children.
proc_ticks() {
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    rest=${stat##*) }
    # fields after "comm)": state=3 ... utime=14 stime=15 cutime=16 cstime=17
    awk '{ print $12 + $13 + $14 + $15 }' <<<"$rest"
}

vmhwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

d() { "$DEFTFS_BIN" "$@"; }

# deftfs_pair HOME_A HOME_B: nodes alice and bob on free loopback ports,
# each trusting the other. Sets PORT_A and PORT_B.
deftfs_pair() {
    local fp_a fp_b
    PORT_A=$(free_udp_port)
    PORT_B=$(free_udp_port)
    while [[ $PORT_B == "$PORT_A" ]]; do PORT_B=$(free_udp_port); done
    d --home "$1" init --name alice --listen "127.0.0.1:$PORT_A" >/dev/null
    d --home "$2" init --name bob --listen "127.0.0.1:$PORT_B" >/dev/null
    fp_a=$(d --home "$1" id | awk '$1 == "fingerprint" { print $2 }')
    fp_b=$(d --home "$2" id | awk '$1 == "fingerprint" { print $2 }')
    [[ $fp_a == sha256:* && $fp_b == sha256:* ]] || die "could not read fingerprints"
    d --home "$1" partner add bob --fingerprint "$fp_b" --endpoint "127.0.0.1:$PORT_B" >/dev/null
    d --home "$2" partner add alice --fingerprint "$fp_a" --endpoint "127.0.0.1:$PORT_A" >/dev/null
}

# start_sshd DIR SFTP_COMMAND: a throwaway sshd on 127.0.0.1:$SSH_PORT with
# its keys in DIR, serving SFTP with SFTP_COMMAND. Sets SSHD_PID, SSH_OPTS
# (for ssh as $USER_NAME with the client key DIR/client_key) and CIPHER.
start_sshd() {
    local s=$1
    [[ -z $(ss -Hltn "sport = :$SSH_PORT") ]] || die "TCP port $SSH_PORT is in use (set SSH_PORT)"
    mkdir -p "$s"
    chmod 700 "$s"
    ssh-keygen -q -t ed25519 -N '' -f "$s/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$s/client_key"
    cp "$s/client_key.pub" "$s/authorized_keys"
    cat >"$s/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $SSH_PORT
HostKey $s/host_key
AuthorizedKeysFile $s/authorized_keys
PidFile $s/sshd.pid
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
PrintMotd no
LogLevel ERROR
Subsystem sftp $2
EOF
    # sshd refuses to start without its privilege separation directory.
    [[ -d /run/sshd ]] || mkdir -p /run/sshd
    /usr/sbin/sshd -t -f "$s/sshd_config" || die "sshd config test failed"
    /usr/sbin/sshd -f "$s/sshd_config" -D -E "$s/sshd.log" &
    SSHD_PID=$!
    SSH_OPTS=(-p "$SSH_PORT" -i "$s/client_key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR)
    for _ in $(seq 100); do
        ssh "${SSH_OPTS[@]}" "$USER_NAME@127.0.0.1" true 2>/dev/null && break
        kill -0 "$SSHD_PID" 2>/dev/null || { cat "$s/sshd.log" >&2; die "sshd exited"; }
        sleep 0.1
    done
    ssh "${SSH_OPTS[@]}" "$USER_NAME@127.0.0.1" true || die "cannot log in to the test sshd"
    CIPHER=$(ssh -v "${SSH_OPTS[@]}" "$USER_NAME@127.0.0.1" true 2>&1 | sed -n 's/.*kex: client->server cipher: \([^ ]*\).*/\1/p' | head -1)
    echo "ssh cipher: ${CIPHER:-unknown}"
}
