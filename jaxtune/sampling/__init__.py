"""jaxtune.sampling: prefill + `lax.while_loop` decode over a donated KV cache.

    gen = jaxtune.generate(cfg, params, prompts, max_new_tokens=64, temperature=0.0)
    for partial in jaxtune.sampling.stream(cfg, params, prompts, max_new_tokens=64): ...

Modules: api (generate, stream, run_rows, Generation), engine (the jitted prefill and decode
loop, bucketing, compile log), select (greedy / temperature / top-k / top-p / min-p).
"""

from jaxtune.sampling.api import Generation
from jaxtune.sampling.api import Row
from jaxtune.sampling.api import generate
from jaxtune.sampling.api import run_rows
from jaxtune.sampling.api import stream
