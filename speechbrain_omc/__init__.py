"""speechbrain-omc: Online Model Compression for SpeechBrain.

Parameters live in low-bit formats, are decompressed only while an operation
needs them, are updated and compressed again in every step, and travel between
federated server and clients compressed (Yang et al., ICASSP 2023).
"""

__version__ = "0.1.0"

# Compression core: formats, bit packing, per-variable transform, tensors.
from .compressed import CompressedTensor
from .formats import FORMAT_PRESETS, FloatFormat, Format, IntFormat, get_format
from .packing import pack_bits, packed_nbytes, unpack_bits
from .transform import Transform, fit_transform
