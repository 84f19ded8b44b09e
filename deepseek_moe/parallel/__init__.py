"""Scale-out on torch.distributed, applied to the single-device model from outside.

* ``mesh``: process-group start-up and the 2-D DeviceMesh ``(dp, ep)``.
* ``expert_parallel``: routed experts sharded over ``ep`` (DTensor ``Shard(0)``), tokens sent to
  the ranks that own their experts with ``all_to_all_single`` (uneven splits, autograd-aware).
* ``data_parallel``: FSDP2 ``fully_shard`` for the dense parts over all ranks, gradient
  synchronisation of the experts over ``dp``, and a global gradient-norm clip.
* ``checkpoint``: torch.distributed.checkpoint (DCP) of the sharded training state, resumable
  under any other layout, and export to the released single-directory layout.

Every rank reads ``global batch / world`` sequences of each step; the loss, the balance losses
(per sequence, ``seq_aux``) and the updates equal a single-process run over the global batch.
"""

from .mesh import ParallelPlan, destroy, init_distributed  # noqa: F401
