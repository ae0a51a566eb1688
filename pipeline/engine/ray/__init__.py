"""The Ray engine: the local engine's streams on the driver, with the two CPU- and call-heavy
stages on a Ray cluster.

    driver: listing ─▶ [validation tasks on the cluster's CPUs] ─▶ packing ─▶ [embed actors] ─▶ writing
                                                                         │
                                                             one limiter actor (the quota)

- **Validation** runs as Ray tasks, one CPU each: small files in groups, large ones alone (the
  same :func:`~pipeline.stages.validation.groups` as the local engine). Each task is a streaming
  generator that says when it starts a file and hands back the file's entries when it is done,
  so the driver holds each file to its own deadline: past it the task is killed
  (``ray.cancel(force=True)``, which ends its worker process: a parser stuck in C code cannot
  outlive it), the file becomes a ``timeout`` reject and the files after it are sent again. A
  worker or node that dies is not the file's fault: its files are sent again, and only a file
  on which workers died :data:`CRASHES_TO_REJECT` times is rejected (``corrupt``).
- **Embedding calls** go from a pool of async actors. The quota (requests/min, tokens/min,
  requests/day) and the AIMD limit on calls in flight live in **one** :class:`Limiter` actor
  that every call asks first: however many actors and nodes, the cluster sends what one machine
  would. An actor that dies mid-call is restarted by Ray; its batch is sent again, to the next
  actor, after a growing pause while actors are unreachable (the calls in flight when it died
  are the only ones that can be paid twice).
- **Writing stays on the driver**, in the local engine's :class:`~pipeline.stages.writing.Writer`:
  deterministic ids merged, a file's manifest row only after all its rows are committed, stale
  rows removed with a file's last rows, the deletions, the run history and tags. Workers return
  vectors (3 KB each at 768 dimensions), so the driver's share is the Lance commit; see the
  docs/ray.md for where that becomes the bottleneck.

By role: :mod:`.cluster` joins or starts the cluster and makes the actors; :mod:`.limiter` is
the one quota actor; :mod:`.workers` holds the embed actors and the validation tasks;
:mod:`.driver` is the engine on the driver, which wires them into the local engine's streams.

Ray is an optional extra (``pip install 'embedpipe[ray]'``); it is imported when a run asks
for ``engine: ray``.
"""

from pipeline.engine.ray.cluster import Cluster, cluster, import_ray, reachable
from pipeline.engine.ray.driver import RayEngine
from pipeline.engine.ray.limiter import Limiter

__all__ = ["Cluster", "Limiter", "RayEngine", "cluster", "import_ray", "reachable"]
