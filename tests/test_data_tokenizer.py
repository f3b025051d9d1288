"""Exported tokenizers load in every transformers version pyproject.toml allows (>= 4.56).

transformers 5 saves `"tokenizer_class": "TokenizersBackend"`, a class 4.x does not have
("Tokenizer class TokenizersBackend does not exist"); `hf.io.save_tokenizer` (used by every
export) writes a class name both know. The fields are checked here in any environment;
with JAXTUNE_OLDEST_TRANSFORMERS_PYTHON set (.ci/run builds that interpreter with
transformers==4.56.0, the lower bound) the export is also loaded there and must encode and
render chats exactly as the current transformers does. Also: the tokenizer a run uses when
model.hf_path is a run's workdir, and the one-line errors naming the setting.
"""

import json
import os
import subprocess

import numpy as np
import pytest
import transformers

from jaxtune import config
from jaxtune.data import errors
from jaxtune.data import tokenizer_lib
from jaxtune.hf import io as hf_io

OLDEST = os.environ.get("JAXTUNE_OLDEST_TRANSFORMERS_PYTHON", "")
TEXT = "Hello world, héllo wörld! 123"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]

PROBE = """
import json, sys, transformers
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
chat = json.loads(sys.argv[3])
print(json.dumps({"version": transformers.__version__, "ids": tok(sys.argv[2])["input_ids"],
                  "chat": tok.apply_chat_template(chat, add_generation_prompt=True,
                                                  tokenize=False),
                  "eos": tok.eos_token, "pad": tok.pad_token, "bos": tok.bos_token}))
"""


def _probe(python: str, path) -> dict:
  out = subprocess.run([python, "-c", PROBE, str(path), TEXT, json.dumps(CHAT)],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  hf_io.save_tokenizer(tokenizer_lib.load(""), str(out))
  return out


def test_saved_config_names_a_class_every_allowed_version_has(exported):
  cfg = json.loads((exported / "tokenizer_config.json").read_text())
  assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.x and 5.x both have it
  assert not {"is_local", "local_files_only"} & set(cfg)  # load-time state, not config
  assert (exported / "tokenizer.json").is_file() and (exported / "chat_template.jinja").is_file()
  tok = transformers.AutoTokenizer.from_pretrained(str(exported))
  ref = tokenizer_lib.load("")
  assert tok(TEXT)["input_ids"] == ref(TEXT)["input_ids"]
  assert tok.chat_template == ref.chat_template
  assert (tok.eos_token, tok.pad_token, tok.bos_token) == (ref.eos_token, ref.pad_token,
                                                          ref.bos_token)


@pytest.mark.skipif(not OLDEST, reason="set JAXTUNE_OLDEST_TRANSFORMERS_PYTHON (.ci/run does)")
def test_export_loads_in_the_oldest_allowed_transformers(exported):
  import sys
  old, new = _probe(OLDEST, exported), _probe(sys.executable, exported)
  assert old["version"].startswith("4.56.")
  assert {k: v for k, v in old.items() if k != "version"} == {
      k: v for k, v in new.items() if k != "version"}


def test_a_run_dir_stands_for_the_tokenizer_it_trained_with(tmp_path, monkeypatch):
  from jaxtune import checkpoint
  template = tmp_path / "t.jinja"
  template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                      "{% endfor %}")
  run_cfg = config.resolve_paths(config.override(config.TrainConfig(), [
      f"data.chat_template={template}"]))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), keep=1, async_save=False)
  ckpt.save(0, {"x": np.zeros(2)}, {}, {"config": config.to_dict(run_cfg)})
  ckpt.close()
  cfg = config.override(config.TrainConfig(), [f"model.hf_path={tmp_path / 'run'}"])
  tok = tokenizer_lib.from_config(cfg)
  assert tok.chat_template == template.read_text()
  assert tok(TEXT)["input_ids"] == tokenizer_lib.load("")(TEXT)["input_ids"]


def test_tokenizer_errors_name_the_setting(tmp_path):
  cfg = config.override(config.TrainConfig(), [f"model.hf_path={tmp_path}/no/such/dir"])
  with pytest.raises(errors.DataError, match=r"^model.hf_path: no such directory"):
    tokenizer_lib.from_config(cfg)
  (tmp_path / "empty").mkdir()
  cfg = config.override(config.TrainConfig(), [f"data.tokenizer={tmp_path}/empty"])
  with pytest.raises(errors.DataError) as e:
    tokenizer_lib.from_config(cfg)
  assert str(e.value).startswith(f"data.tokenizer: cannot load a tokenizer from "
                                 f"'{tmp_path}/empty'") and "\n" not in str(e.value)
