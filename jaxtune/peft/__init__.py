"""jaxtune.peft: parameter-efficient fine-tuning as tree operations over the base params.

    from jaxtune.peft import lora    # Adapters, init, axes, merge, save_peft, load_peft
    from jaxtune.peft import qlora   # 4-bit base: load_quantized, quantize_params

Modules, not symbols, are exported; `jaxtune.lora` is `jaxtune.peft.lora`.
"""

from jaxtune.peft import lora
from jaxtune.peft import qlora
