"""Data for training: records -> checked, tokenized, packed, resumable batches.

Entry points:

  tokenizer_lib.load(path_or_hub_id="", *, chat_template="") -> transformers tokenizer
      "" = the bundled tokenizer (jaxtune/assets/tokenizer); also tokenizer_lib.from_config(
      train_cfg): data.tokenizer, else model.hf_path, else bundled, with data.chat_template.
  pipeline.build(data_cfg, tokenizer, *, kind="sft"|"preference"|"prompt",
                 process_index=0, process_count=1) -> Datasets(train, eval, stats,
                 fingerprint, source_names, eval_source_names, provenance)
      train: Loader (next(loader) -> batch; loader.state() -> dict; loader.restore(dict))
      eval: list of batches (every eval example once, last batch padded)
  global_batch.to_global(batch, sharding) -> dict of global jax.Arrays
  global_batch.digest(batch) -> sha256 hex of a batch
  stats.summary(stats) -> printable report
  DataError(ValueError): bad data or data setup; names file, line/record, field, expected.

Batches (numpy, this process's batch_size / process_count rows; see packing.py):
  sft:        tokens, targets, segment_ids, positions, source_ids int32 [B, T];
              loss_mask float32 [B, T]
  preference: the same keys, [B, 2, T] (0 = chosen, 1 = rejected), one pair per row
  prompt:     prompt_tokens, prompt_mask int32 [B, T] (left-padded), answers: list | None

Streamed (data.streaming=true, or a data.cache_dir): the same Datasets, with each source
encoded share by share into the tokenized cache and read back lazily (stream.py, store.py,
cache.py): memory independent of the corpus, the in-memory path's batches exactly.
Loader.steps_for_epochs(E) is the run length of train.epochs=E.

Modules: sources (files, dirs, hf:; through files.py, so fsspec URLs too), formats (record
formats, Bedrock content blocks), encode (chat rendering, loss masks, template check, rendering turn by turn), length
(splitting documents into windows, truncation), packing, mixture (weights, epochs), loader
(resumable iteration), provenance (fingerprint), stats (counts, truncation and end-of-turn
warnings), tokenizer_lib (the model's tokenizer, a run's tokenizer, export), make_assets
(bundled data), files (open / list local paths and fsspec URLs), stream (counting,
shares, pieces, grain workers), store (encoded examples on disk), cache (the tokenized
cache's keys and entries).
"""

from jaxtune.data.errors import DataError
from jaxtune.data.global_batch import digest
from jaxtune.data.global_batch import to_global
from jaxtune.data.loader import Loader
from jaxtune.data.pipeline import Datasets
from jaxtune.data.pipeline import build
from jaxtune.data.stats import summary
from jaxtune.data.tokenizer_lib import bundled_dir
from jaxtune.data.tokenizer_lib import from_config as tokenizer_from_config
from jaxtune.data.tokenizer_lib import load as load_tokenizer
