"""Attention kernels: CoPE (reference, blockwise XLA, Pallas) and plain masked attention."""
