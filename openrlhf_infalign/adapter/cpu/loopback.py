"""Loopback-only gloo groups for the CPU mode: the weight-sync group (item 4) and TCPStore masters on 127.0.0.1 (item 7).

Importable on its own (the vLLM worker extension builds its side of the group from here): stdlib at module level.
"""

from __future__ import annotations

import socket
from datetime import timedelta

__all__ = ["GlooBroadcastGroup", "LOOPBACK", "gloo_init_process_group", "loopback_tcp_store"]

#: The only address a CPU run uses (item 7).
LOOPBACK = "127.0.0.1"


class GlooBroadcastGroup:
    """A standalone gloo process group (not the default one) with pynccl's ``broadcast`` call shape.

    OpenRLHF calls ``group.broadcast(tensor, src=0, stream=torch.cuda.current_stream())`` on both sides; the
    stream is meaningless on CPU and ignored. ``broadcast`` is in place, like NCCL's.
    """

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float = 600.0):
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        # The actor (rank 0) hosts the store; the vLLM engines connect to it (and retry until it is up).
        self.store = loopback_tcp_store(master_address, int(master_port), world_size, rank == 0, timeout)
        self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        self.rank = rank
        self.world_size = world_size

    def broadcast(self, tensor, src: int = 0, stream=None):
        self.group.broadcast(tensor, src).wait()
        return tensor


def loopback_tcp_store(host: str, port: int, world_size: int, is_master: bool, timeout, multi_tenant: bool = False):
    """A ``TCPStore`` whose master listens on 127.0.0.1 only (item 7); clients connect to ``host`` as usual.

    ``TCPStore(is_master=True)`` listens on every interface whatever ``host`` says; handing it a socket already bound
    to loopback (``master_listen_fd``, which only the non-libuv server takes) is the one way to narrow it.
    """
    import torch.distributed as dist

    if not is_master:
        return dist.TCPStore(host, port, world_size, False, timeout=timeout, multi_tenant=multi_tenant)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    # The store owns the descriptor from here on (detach: Python must not close it under the server thread).
    return dist.TCPStore(
        host,
        sock.getsockname()[1],
        world_size,
        True,
        timeout=timeout,
        multi_tenant=multi_tenant,
        master_listen_fd=sock.detach(),
        use_libuv=False,
    )


def gloo_init_process_group(master_address, master_port, rank, world_size, device=None) -> GlooBroadcastGroup:
    """Drop-in for ``openrlhf.utils.distributed_util.stateless_init_process_group`` on CPU (``device`` ignored)."""
    return GlooBroadcastGroup(master_address, master_port, rank, world_size)
