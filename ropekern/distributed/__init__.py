"""Context parallelism: scaled-RoPE attention over a sequence sharded across processes.

``ring_rope_attention`` runs on every rank of a ``torch.distributed`` group with that rank's shard
of the sequence; K/V blocks travel the ring un-rotated with their positions, so every scaling type
(including the length-dependent ones) is exact across ranks. ``shard``/``unshard``/``shard_indices``
map between the global sequence and the per-rank shards of a layout.
"""

from .ring import LAYOUTS, block_backward, ring_rope_attention, shard, shard_indices, unshard

__all__ = ["LAYOUTS", "block_backward", "ring_rope_attention", "shard", "shard_indices", "unshard"]
