"""A search resumed right after its driver was killed waits for the dead driver's actors to go first."""

import os
import signal
import subprocess
import sys
import time

from conftest import ray_address

from raycf.runtime.cluster import orphaned_actors, wait_for_orphaned_actors

DRIVER = """
import os, signal, time, ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0)
class Trial:
    def ping(self):
        return os.getpid()

import sys
trial = Trial.options(lifetime="detached", name="raycf-test-detached", namespace="raycf-tests").remote() if sys.argv[1:] == ["detached"] else Trial.remote()
print(ray.get(trial.ping.remote()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_drivers_actor_is_orphaned_until_the_cluster_reaps_it(ray_session):
    assert wait_for_orphaned_actors(timeout_s=60) >= 0  # earlier tests' killed drivers leave nothing behind for long
    done = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ray_address()}, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    actor_pid = int(done.stdout.split()[0])
    wait_for_orphaned_actors(timeout_s=60)
    assert orphaned_actors() == []
    deadline = time.monotonic() + 10
    while _alive(actor_pid) and time.monotonic() < deadline:  # the GCS marks it dead as it kills the process
        time.sleep(0.1)
    assert not _alive(actor_pid), "the dead driver's actor process still runs after the wait"


def test_a_killed_drivers_detached_actor_is_not_waited_for(ray_session):
    import ray

    done = subprocess.run([sys.executable, "-c", DRIVER, "detached"], capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ray_address()}, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    service = ray.get_actor("raycf-test-detached", namespace="raycf-tests")
    try:
        assert ray.get(service.ping.remote()) == int(done.stdout.split()[0])  # alive, its driver dead
        assert orphaned_actors() == []
        assert wait_for_orphaned_actors(timeout_s=5) == 0
    finally:
        ray.kill(service)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split()[2] == "Z"
