"""Where the lab keeps what it builds, and the digests that name it: plain Python, so that
`jaxprompt lab path` answers without loading TensorFlow or JAX."""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Sequence

from jaxprompt.lab import world

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def default_cache_dir() -> str:
  """`$JAXPROMPT_CACHE/lab`, or `~/.cache/jaxprompt/lab` when the variable is unset."""
  root = os.environ.get('JAXPROMPT_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'jaxprompt')
  return os.path.join(root, 'lab')


def vocabulary_tokens() -> List[str]:
  """The lab vocabulary's words in id order (ids 3, 4, ...): items, function words, prefixes."""
  tokens = list(dict.fromkeys(world.WORDS))
  tokens += [world.TASKS[t].prefix.strip() for t in world.TASKS]
  return tokens


def _trainer_args(tokens: Sequence[str]) -> Dict[str, object]:
  return dict(
      vocab_size=len(tokens) + 3, model_type='word', character_coverage=1.0,
      hard_vocab_limit=False, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      shuffle_input_sentence=False, num_threads=1,
      minloglevel=2)


def vocabulary_digest() -> str:
  """A digest of the vocabulary's corpus and trainer settings (part of the cached file name)."""
  tokens = vocabulary_tokens()
  text = '\n'.join(tokens) + repr(sorted(_trainer_args(tokens).items()))
  return hashlib.blake2b(text.encode('utf-8'), digest_size=6).hexdigest()
