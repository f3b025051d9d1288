"""jaxtune: JAX-native post-training for decoder language models.

    cfg, params = jaxtune.load_hf("meta-llama/Llama-3.2-1B")
    logits = jaxtune.forward(cfg, params, tokens)            # [B, T] -> [B, T, V] float32
    jaxtune.save_hf(cfg, params, "out/")

    from jaxtune import lora, quant, losses, peft, weights
    w = jaxtune.weights.load("runs/lora")                   # any source: HF, run, PEFT dir
"""

from jaxtune import losses
from jaxtune import peft
from jaxtune import quant
from jaxtune import weights
from jaxtune.hf.io import load_hf
from jaxtune.hf.io import save_hf
from jaxtune.models.decoder import forward
from jaxtune.models.decoder import init
from jaxtune.peft import lora
from jaxtune.peft import qlora
from jaxtune.sampling import generate
