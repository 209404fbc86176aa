"""Tokenizer and chat template, read from a checkpoint directory.

Text goes through the Hugging Face ``tokenizers`` library reading
``tokenizer.json``; the chat template comes from ``tokenizer_config.json`` and
is rendered with jinja2's sandboxed environment (templates arrive with
downloaded checkpoints and are treated as untrusted code).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

# LLaDA-2.0's chat format (the template shipped in its tokenizer_config.json
# renders the same strings for a system-less conversation).
LLADA2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<role>SYSTEM</role>"
    "{% elif message['role'] == 'user' %}<role>HUMAN</role>"
    "{% else %}<role>ASSISTANT</role>{% endif %}"
    "{{ message['content'] }}<|role_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)
ROLE_TOKENS = ("<role>", "</role>", "<|role_end|>")
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
MATH_SUFFIX = "\nLet's think step by step\n"


class TokenizerError(ValueError):
  """A tokenizer directory that cannot be used; the message names the file."""


class ChatTemplateError(TokenizerError):
  """A chat template that cannot be used for any prompt: it does not compile, or the sandbox stopped it."""


class TemplateRaised(ValueError):
  """A chat template's own ``raise_exception(message)`` (e.g. roles that do not alternate)."""


def _raise_exception(message):
  raise TemplateRaised(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  """Hugging Face's ``tojson`` filter (json.dumps, non-ASCII kept, unescaped for the template)."""
  from markupsafe import Markup  # pylint: disable=import-outside-toplevel

  return Markup(json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                           sort_keys=sort_keys))


def _strftime_now(fmt: str) -> str:
  import datetime  # pylint: disable=import-outside-toplevel

  return datetime.datetime.now().strftime(fmt)


def compile_chat_template(template: str):
  """A chat template compiled in a sandboxed Jinja environment with what transformers gives templates: its
  whitespace settings, loop controls, ``raise_exception``, the ``tojson`` filter and ``strftime_now``."""
  from jinja2.ext import loopcontrols  # pylint: disable=import-outside-toplevel
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(template)


class ChatTokenizer:
  """``tokenizer.json`` plus the chat template of ``tokenizer_config.json``."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_path):
      raise TokenizerError(f"{tok_path}: no such file (a checkpoint needs its tokenizer.json)")
    try:
      self._tok = Tokenizer.from_file(tok_path)
    except Exception as e:  # tokenizers raises plain Exceptions for bad files
      raise TokenizerError(f"{tok_path}: cannot be read ({e})") from None
    cfg_path = os.path.join(path, "tokenizer_config.json")
    self.config = {}
    if os.path.exists(cfg_path):
      try:
        with open(cfg_path) as f:
          self.config = json.load(f)
      except json.JSONDecodeError as e:
        raise TokenizerError(f"{cfg_path}: not valid JSON ({e})") from None
    template = self.config.get("chat_template")
    if isinstance(template, list):  # the list-of-named-templates form
      template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    self.chat_template: Optional[str] = template
    self.template_source = cfg_path if template else "the built-in LLaDA2 chat template"
    self._compiled = None
    self.path = path

  # ---- plain text ----
  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> Optional[int]:
    return self._tok.token_to_id(token)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  # ---- chat ----
  def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The chat template applied to ``messages`` ([{"role", "content"}, ...]).

    A ``raise_exception`` in the template raises ``TemplateRaised`` (its
    message); a template the sandbox stops raises ``ChatTemplateError`` and
    any other template failure ``TokenizerError``, each naming the file.
    """
    import jinja2  # pylint: disable=import-outside-toplevel
    from jinja2.sandbox import SecurityError  # pylint: disable=import-outside-toplevel

    where = self.template_source
    try:
      if self._compiled is None:
        self._compiled = compile_chat_template(self.chat_template or LLADA2_CHAT_TEMPLATE)
      special = {k: v for k, v in self.config.items() if k.endswith("_token") and isinstance(v, str)}
      return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **special)
    except TemplateRaised as e:
      raise TemplateRaised(f"the chat template of {where} refused it: {e}") from None
    except SecurityError as e:
      raise ChatTemplateError(f"{where}: the chat template tried something unsafe, stopped by the sandbox ({e})") from None
    except jinja2.TemplateSyntaxError as e:
      raise ChatTemplateError(f"{where}: the chat template does not compile (line {e.lineno}: {e.message})") from None
    except jinja2.TemplateError as e:
      raise TokenizerError(f"{where}: the chat template failed ({type(e).__name__}: {e})") from None

  def chat_ids(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    return self.encode(self.render_chat(messages, add_generation_prompt))

  def prompt_ids(self, question: str, suffix: str = "") -> list[int]:
    """Token ids of a single user turn followed by the assistant generation prompt."""
    return self.chat_ids([{"role": "user", "content": question + suffix}], add_generation_prompt=True)


def load_tokenizer(path: str) -> ChatTokenizer:
  return ChatTokenizer(path)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str, chat_template: str = LLADA2_CHAT_TEMPLATE,
                    split_digits: bool = False) -> dict:
  """Trains a byte-level BPE tokenizer in LLaDA2's format and saves it to ``out_dir``.

  ``split_digits`` makes every digit its own token (numbers are never merged),
  as many LLM tokenizers do: a multi-digit result then takes several positions
  that depend on each other (the carry), instead of one memorised token.

  The eos/pad token takes id ``vocab_size - 2`` and the mask token
  ``vocab_size - 1`` (like LLaDA-2.0, whose mask and eos sit at the end of
  the vocabulary), so a model config can name them. Returns
  {"vocab_size", "eos_token_id", "mask_token_id"}.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  if split_digits:
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - 2, special_tokens=list(ROLE_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  filler = 0
  while tok.get_vocab_size(with_added_tokens=True) < vocab_size - 2:
    tok.add_special_tokens([f"<|unused_{filler}|>"])
    filler += 1
  tok.add_special_tokens([EOS_TOKEN, MASK_TOKEN])
  eos, mask = tok.token_to_id(EOS_TOKEN), tok.token_to_id(MASK_TOKEN)
  if (eos, mask) != (vocab_size - 2, vocab_size - 1):
    raise TokenizerError(f"{out_dir}: tokenizer came out with eos={eos}, mask={mask}, vocab={tok.get_vocab_size()}")
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(
        {"chat_template": chat_template, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "mask_token": MASK_TOKEN,
         "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "mask_token": MASK_TOKEN}, f, indent=2)
  return {"vocab_size": vocab_size, "eos_token_id": eos, "mask_token_id": mask}
