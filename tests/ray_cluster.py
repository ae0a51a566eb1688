"""A Ray cluster of three nodes on this machine for the Ray engine's tests, started and driven
from a process of its own (``python -m tests.ray_cluster``), which takes one command a line on
its stdin and answers one line on its stdout.

Ray starts each node's daemons by fork and exec with a ``preexec_fn``: a child that runs Python
before it execs. Forked from the test process, that child inherits whatever the tests before
left in it (threads, their thread-local native state), and one such state (PyAV 18.1.1's
per-thread frame scalers) once hung the child before exec, so the cluster never started. This
process has imported only Ray when it forks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


class ClusterProcess:
    """The tests' handle: the head's ``address``; a worker node removed (as if lost) and
    added; ``close`` shuts the cluster down."""

    def __init__(self, repo: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.ray_cluster"], cwd=repo,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.address = self._answer()["address"]

    def _answer(self) -> dict[str, str]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Ray cluster's process ended ({self.proc.wait()})")
        return json.loads(line)

    def _ask(self, command: str) -> dict[str, str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def remove_worker(self) -> None:
        """The last worker node killed, not drained: a node lost."""
        self._ask("remove_worker")

    def add_worker(self) -> None:
        self._ask("add_worker")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF: shut down
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address}), flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "remove_worker":
                cluster.remove_node(workers.pop(), allow_graceful=False)
            elif command == "add_worker":
                workers.append(cluster.add_node(num_cpus=1))
                cluster.wait_for_nodes()
            else:
                raise SystemExit(f"unknown command {command!r}")
            print(json.dumps({"done": command}), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
