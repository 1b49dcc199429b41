"""The process group of a run: started from torchrun's environment, shared by the trainer and
the sharded evaluation (gloo on CPUs, NCCL on GPUs)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Dist:
    """(rank, world) of this process; a process group is started when torchrun launched us."""

    def __init__(self, device: torch.device):
        self.owned = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owned = True
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    @staticmethod
    def device_of(name: str) -> str:
        """``cuda`` under torchrun means this rank's GPU (LOCAL_RANK)."""
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            return f"cuda:{int(os.environ['LOCAL_RANK'])}"
        return name

    def gather(self, rows: dict) -> dict:
        """Every rank's {index: row} merged (on every rank)."""
        if self.world == 1:
            return rows
        parts = [None] * self.world
        dist.all_gather_object(parts, rows)
        merged = {}
        for part in parts:
            merged.update(part)
        return merged

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.owned:
            dist.destroy_process_group()
