"""The codec: low-bit formats, bit packing, transforms and compressed tensors.

It knows tensors and bytes only, never modules or optimizers; the engine
(:mod:`speechbrain_omc.engine`) builds on it.
"""
