"""The cluster guide's command sequence (docs/cluster.md), against a head on 127.0.0.1.

Runs inside ``tests/cluster/sandbox.sh`` (its own namespaces, an sshd on
127.0.0.1): generate the cluster token, ``ray up`` the local-provider cluster
file, forward the dashboard with ``ray dashboard``, probe the Jobs API with and
without the token, ``ray job submit`` the job, ``ray down``, list the Ray
processes left, then run the read-back command on the results. Writes what it
saw to ``--status`` (JSON) for ``tests/test_cluster_roundtrip.py`` to check.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TEMPLATE = Path(__file__).with_name("local-cluster.yaml")
DASHBOARD_PORT = 8265  # where the head's dashboard listens (Ray's default)
FORWARD_PORT = 8266  # where `ray dashboard` forwards it to (8265 is taken: same network)
# Process names and command-line fragments of a running Ray node.
RAY_PROCESS_MARKERS = ("raylet", "gcs_server", "ray::", "dashboard/dashboard.py", "monitor.py", "log_monitor.py")


def run(command: list[str], env: dict[str, str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, echoing it and its output (pytest shows them when the test fails)."""
    print(f"+ {shlex.join(command)}", flush=True)
    completed = subprocess.run(command, env=env, timeout=timeout, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(completed.stdout, flush=True)
    if check and completed.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited with {completed.returncode}")
    return completed


def http_status(url: str, token: str | None = None) -> int:
    """The HTTP status of a GET, with a bearer token or none."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def listening_addresses(port: int) -> list[str]:
    """IPv4 addresses with a TCP socket listening on ``port`` (from /proc/net/tcp)."""
    addresses = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            addresses.append(socket.inet_ntoa(bytes.fromhex(host_hex)[::-1]))
    return sorted(set(addresses))


def ray_processes() -> list[str]:
    """Command lines of the Ray node processes still running in this PID namespace."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            name = (entry / "comm").read_text().strip()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state == "Z":  # exited, not yet reaped: not running
            continue
        if any(marker in name or marker in command for marker in RAY_PROCESS_MARKERS):
            found.append(f"{entry.name}: {command[:200]}")
    return found


def wait_until_no_ray_processes(timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sandbox", type=Path, required=True, help="the folder sandbox.sh set up")
    parser.add_argument("--repo", type=Path, required=True, help="the raycf checkout (the job's working dir)")
    parser.add_argument("--job", required=True, help="the job's entrypoint")
    parser.add_argument("--read-back", default="", help="a command run here on the results after `ray down`")
    parser.add_argument("--status", type=Path, required=True, help="where to write what was seen (JSON)")
    args = parser.parse_args()

    venv_bin = str(Path(sys.executable).parent)
    client_home, client_tmp = args.sandbox / "client_home", args.sandbox / "client_tmp"
    client_home.mkdir(exist_ok=True)
    client_tmp.mkdir(exist_ok=True)
    # The user's machine: this Python environment, its own home and temporary
    # folder (the launcher caches configs there), no Ray settings inherited.
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HOME=str(client_home), TMPDIR=str(client_tmp), PATH=f"{venv_bin}:{os.environ['PATH']}")
    token_env = dict(env, RAY_AUTH_MODE="token")
    ray = str(Path(venv_bin, "ray"))

    cluster_file = args.sandbox / "cluster.yaml"
    cluster_file.write_text(
        TEMPLATE.read_text().replace("__SSH_KEY__", str(args.sandbox / "client_key")).replace("__VENV_BIN__", venv_bin)
    )
    status: dict = {"steps": {}}
    os.chdir(args.repo)

    def step(name: str, command: list[str], timeout: float, environment: dict[str, str] = env, check: bool = True):
        started = time.monotonic()
        completed = run(command, environment, timeout, check=check)
        status["steps"][name] = {"returncode": completed.returncode, "seconds": round(time.monotonic() - started, 1)}
        return completed

    forward = None
    try:
        step("generate token", [ray, "get-auth-token", "--generate"], 60)
        token = (client_home / ".ray" / "auth_token").read_text().strip()
        step("ray up", [ray, "up", "-y", "--no-config-cache", str(cluster_file)], 300)
        node_token = args.sandbox / "node_home" / ".ray" / "auth_token"
        status["token_on_head_matches"] = node_token.is_file() and node_token.read_text().strip() == token
        status["dashboard_listens_on"] = listening_addresses(DASHBOARD_PORT)

        print(f"+ {ray} dashboard --port {FORWARD_PORT} {cluster_file} &", flush=True)
        forward = subprocess.Popen([ray, "dashboard", "--port", str(FORWARD_PORT), str(cluster_file)], env=env, start_new_session=True)
        wait_for_port(FORWARD_PORT, 60)
        jobs_api = f"http://127.0.0.1:{FORWARD_PORT}/api/jobs/"
        status["jobs_api"] = {
            "no token": http_status(jobs_api),
            "wrong token": http_status(jobs_api, "0" * len(token)),
            "token": http_status(jobs_api, token),
            "no token, head port": http_status(f"http://127.0.0.1:{DASHBOARD_PORT}/api/jobs/"),
        }
        address = f"http://127.0.0.1:{FORWARD_PORT}"
        step("ray job submit without the token", [ray, "job", "submit", "--address", address, "--", "true"], 120, check=False)
        step(
            "ray job submit",
            [ray, "job", "submit", "--address", address, "--working-dir", ".", "--", *shlex.split(args.job)],
            600,
            environment=token_env,
        )
    finally:
        if forward is not None:
            os.killpg(forward.pid, signal.SIGTERM)
            forward.wait(timeout=30)
        step("ray down", [ray, "down", "-y", str(cluster_file)], 180, check=False)
        status["ray processes after ray down"] = wait_until_no_ray_processes(30)
        args.status.write_text(json.dumps(status, indent=2))
    if args.read_back:
        read_back = step("read back", shlex.split(args.read_back), 120, check=False)
        status["read back output"] = read_back.stdout
        args.status.write_text(json.dumps(status, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
