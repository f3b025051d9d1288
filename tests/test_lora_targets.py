"""LoRA target regexes (peft.targets): an alternative that selects nothing LoRA can adapt is
an error naming it, not silently dropped; a malformed regex is a ConfigError naming the key."""

import re

import jax
import pytest

from jaxtune import config as config_lib
from jaxtune import tree
from jaxtune.models import decoder
from jaxtune.peft import lora

CFG = config_lib.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                             num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base():
  return decoder.init(CFG, jax.random.PRNGKey(0))


def _init(base, targets):
  return lora.init(CFG, base, targets=targets, key=jax.random.key(0))


def test_every_alternative_that_selects_something_is_kept(base):
  ad = _init(base, r"layers/self_attn/q_proj/kernel|.*down_proj/kernel")
  assert sorted(tree.flatten(ad.params)) == [
      "layers/mlp/down_proj/a", "layers/mlp/down_proj/b",
      "layers/self_attn/q_proj/a", "layers/self_attn/q_proj/b"]


@pytest.mark.parametrize("targets,alt,why", [
    # lm_head exists but LoRA cannot adapt it: this used to adapt q_proj alone, silently.
    (r".*q_proj/kernel|lm_head/kernel", "lm_head/kernel", r"matches only \['lm_head/kernel'\]"),
    (r".*q_proj/kernel|layers/mlp/gate/kernel", "layers/mlp/gate/kernel", "matches no param"),
    (r"(?i).*Q_PROJ/kernel|NORM/scale", "(?i)NORM/scale", r"matches only \['norm/scale'\]"),
])
def test_an_alternative_selecting_nothing_adaptable_is_an_error(base, targets, alt, why):
  with pytest.raises(config_lib.ConfigError) as e:
    _init(base, targets)
  msg = str(e.value)
  assert msg.startswith("bad value for peft.targets:") and f"alternative {alt!r}" in msg, msg
  assert re.search(why, msg), msg
  assert "\n" not in msg


def test_inner_alternatives_and_escaped_bars_are_not_split(base):
  ad = _init(base, r".*(q_proj|v_proj)/kernel")
  assert len(tree.flatten(ad.params)) == 4
  assert lora._alternatives(r"a\|b|[|]c|(d|e)") == [r"a\|b", "[|]c", "(d|e)"]


@pytest.mark.parametrize("targets", [r".*(q_proj", r"[q_proj", r"*q_proj"])
def test_malformed_regex_is_a_config_error_naming_the_key(base, targets):
  with pytest.raises(config_lib.ConfigError, match=r"^bad value for peft\.targets: .* is not "
                                                   r"a valid regex \("):
    _init(base, targets)
