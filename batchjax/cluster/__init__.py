"""Data-parallel replicas of the engine: in one process (`local`), or as Ray actors (`ray`).

`Engine` is the user-facing engine of any number of chips: `data_parallel` replicas, each a
`batchjax.engine.Engine` on its own `[1, tensor_parallel]` sub-mesh with its own KV pool and
batcher. The whole job is planned once; whole prefix groups go to replicas (`queues`), so each
group's prefix is still computed once, and a replica that runs dry takes an unstarted group
from the longest queue.
"""

from batchjax.cluster.engine import Engine, generate

__all__ = ["Engine", "generate"]
