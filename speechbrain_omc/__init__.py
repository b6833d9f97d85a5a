"""speechbrain-omc: Online Model Compression for SpeechBrain.

Parameters live in low-bit formats, are decompressed only while an operation
needs them, are updated and compressed again in every step, and travel between
federated server and clients compressed (Yang et al., ICASSP 2023).
"""

from .brain import OMCBrain, OMCMixin
from .codec.compressed import CompressedTensor
from .codec.formats import FORMAT_PRESETS, FloatFormat, Format, IntFormat, get_format
from .codec.packing import pack_bits, packed_nbytes, unpack_bits
from .codec.transform import Transform, fit_transform
from .engine.accounting import parameter_bytes, peak_rss_bytes
from .engine.config import OMCConfig
from .engine.handle import OMCHandle, compress_module, handle_of
from .engine.selection import Plan, PlanEntry, make_plan, parameter_roles

__version__ = "0.1.0"

__all__ = [
    # compression core: formats, bit packing, per-variable transform, tensors
    "CompressedTensor",
    "FORMAT_PRESETS",
    "FloatFormat",
    "Format",
    "IntFormat",
    "Transform",
    "fit_transform",
    "get_format",
    "pack_bits",
    "packed_nbytes",
    "unpack_bits",
    # selection, engine, accounting and SpeechBrain integration
    "OMCBrain",
    "OMCConfig",
    "OMCHandle",
    "OMCMixin",
    "Plan",
    "PlanEntry",
    "compress_module",
    "handle_of",
    "make_plan",
    "parameter_bytes",
    "parameter_roles",
    "peak_rss_bytes",
]
