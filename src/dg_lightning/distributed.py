"""torch.distributed helpers: this process's rank and a barrier, both trivial without a process group."""

import torch.distributed as dist


def rank_and_world_size(rank=None, world_size=None):
    """(rank, number of ranks) of this process in torch.distributed's default group, (0, 1) without one; a rank or
    world_size given replaces the group's."""
    in_group = dist.is_available() and dist.is_initialized()
    group_rank, group_size = (dist.get_rank(), dist.get_world_size()) if in_group else (0, 1)
    return group_rank if rank is None else rank, group_size if world_size is None else world_size



def barrier():
    """Wait until every rank of torch.distributed's default group gets here (nothing without a group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
