#!/usr/bin/env bash
# Make a fresh set of namespaces stand in for a separate machine, then run "$@" there.
#
# Usage (as root):
#   unshare --pid --net --mount --fork --mount-proc --kill-child -- \
#       bash tests/cluster/sandbox.sh SANDBOX_DIR COMMAND [ARGS...]
#
# Why: `ray up` and `ray down` run `ray stop`, which kills every Ray process it
# can see, and `ray start --head` writes /tmp/ray/ray_current_cluster, which
# makes any later plain `ray.init()` on the machine join that cluster. In here
# `ray stop` sees only this namespace's processes, /tmp/ray is private, Ray's
# default ports are free (the network namespace has only its own loopback) and
# everything still running when COMMAND exits is killed with the namespace.
#
# What the "machine" gets: loopback up; private /tmp/ray and SSH control sockets;
# root's home moved to SANDBOX_DIR/node_home
# (so ~/.ray/auth_token and ~/ray_bootstrap_config.yaml never touch the real
# one); an sshd on 127.0.0.1:22 that accepts only a throwaway key,
# SANDBOX_DIR/client_key, for root.
set -euo pipefail
sandbox=$1
shift

ip link set lo up

mkdir -p /tmp/ray "$sandbox/ray_tmp"
mount --bind "$sandbox/ray_tmp" /tmp/ray
# The cluster launcher's SSH control sockets (/tmp/ray_ssh_<user hash>/): private
# too, or a concurrent run in another sandbox could reuse this one's connection.
ssh_control=/tmp/ray_ssh_$(printf %s "$(id -un)" | sha256sum | cut -c1-10)
mkdir -p "$ssh_control" "$sandbox/ray_ssh"
mount --bind "$sandbox/ray_ssh" "$ssh_control"

node_home=$sandbox/node_home
mkdir -p -m 700 "$node_home"
awk -F: -v OFS=: -v home="$node_home" '$1 == "root" { $6 = home } { print }' /etc/passwd >"$sandbox/passwd"
mount --bind "$sandbox/passwd" /etc/passwd

ssh-keygen -q -t ed25519 -N '' -C raycf-test-host -f "$sandbox/host_key"
ssh-keygen -q -t ed25519 -N '' -C raycf-test-client -f "$sandbox/client_key"
cp "$sandbox/client_key.pub" "$sandbox/authorized_keys"
cat >"$sandbox/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port 22
HostKey $sandbox/host_key
AuthorizedKeysFile $sandbox/authorized_keys
PidFile $sandbox/sshd.pid
PermitRootLogin prohibit-password
AllowUsers root
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
EOF
mkdir -p /run/sshd
/usr/sbin/sshd -f "$sandbox/sshd_config" -E "$sandbox/sshd.log"

# Not exec: this shell stays PID 1 of the namespace and reaps the processes
# orphaned to it (Ray's), as init does on a real machine.
"$@" &
wait $!
