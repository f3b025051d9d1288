"""jaxtune.quant: 4-bit (NF4 / int4) base weights for QLoRA, as a pytree leaf type.

A quantized kernel is a `QArray` leaf in the ordinary params dict (packed uint8 codes, two
per byte, plus blockwise absmax scales), so jit, `lax.scan` over layers, shardings and
orbax all see a plain pytree:

    >>> from jaxtune import quant
    >>> qparams = quant.quantize(params, method="nf4", group_size=64)
    >>> q = qparams["layers"]["mlp"]["up_proj"]["kernel"]  # QArray [L, D, F]
    >>> w = quant.dequantize(q)                            # [L, D, F] in q.dtype
    >>> y = quant.matmul(x, layer_q)   # inside lax.scan over q: x [..., D] -> [..., F]
    >>> qaxes = quant.tree_axes(qparams, decoder.axes(cfg))  # for NamedShardings

Layouts, byte counts (0.53125 bytes/param by default) and error bounds: `nf4.py` and
`qarray.py`.
"""

from jaxtune.quant.nf4 import DOUBLE_QUANT_BLOCK
from jaxtune.quant.nf4 import INT4_CODEBOOK
from jaxtune.quant.nf4 import NF4_CODEBOOK
from jaxtune.quant.nf4 import codebook
from jaxtune.quant.nf4 import dequantize
from jaxtune.quant.nf4 import matmul
from jaxtune.quant.nf4 import quantize_array
from jaxtune.quant.nf4 import quantize_stacked
from jaxtune.quant.nf4 import unpack_codes
from jaxtune.quant.params import default_predicate
from jaxtune.quant.params import dequantize_tree
from jaxtune.quant.params import num_bytes
from jaxtune.quant.params import quantize
from jaxtune.quant.qarray import QArray
from jaxtune.quant.qarray import axes_for
from jaxtune.quant.qarray import is_qarray
from jaxtune.quant.qarray import stack
from jaxtune.quant.qarray import tree_axes
