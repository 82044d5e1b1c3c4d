"""baton.workers.text: everything between text and token ids, without torch.

    tokenizer      a checkpoint's tokenizer.json (through `tokenizers`) or the byte-level
                   fallback, its specials, eos ids and chat template (load_tokenizer)
    streaming      incremental detokenization and stop strings (IncrementalDetokenizer,
                   StopMatcher, partial_marker_len)
    chat_template  the Nemotron 3 chat template baton's checkpoints ship

The router imports only this package for text (it never imports torch; tests/workers/router
asserts it); the engine and the tools use the same code.
"""

from baton.workers.text.streaming import IncrementalDetokenizer, StopMatcher, partial_marker_len
from baton.workers.text.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "IncrementalDetokenizer", "StopMatcher", "Tokenizer",
           "load_tokenizer", "partial_marker_len"]
