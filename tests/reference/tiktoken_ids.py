"""Prints tiktoken's GPT-2 token ids for files, as JSON: {"path": [ids...], ...}.

The encoding is built from the local encoder.json + vocab.bpe (tiktoken's own loader for OpenAI's
GPT-2 files), with <|endoftext|> allowed as a special token, like llmlab's tokenizer.
Usage: tiktoken_ids.py BPE_DIR FILE [FILE ...]   (a FILE ending in .tsv: the text after the tab of each line)
"""
import json
import os
import sys

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

bpe_dir = sys.argv[1]
ranks = data_gym_to_mergeable_bpe_ranks(
    vocab_bpe_file=os.path.join(bpe_dir, "vocab.bpe"),
    encoder_json_file=os.path.join(bpe_dir, "encoder.json"),
)
enc = tiktoken.Encoding(
    name="gpt2-local",
    explicit_n_vocab=50257,
    pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    mergeable_ranks=ranks,
    special_tokens={"<|endoftext|>": 50256},
)
out = {}
for path in sys.argv[2:]:
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if path.endswith(".tsv") or os.path.basename(path) == "SMSSpamCollection":
        out[path] = [enc.encode(line.split("\t", 1)[1], allowed_special={"<|endoftext|>"})
                     for line in text.split("\n") if "\t" in line]
    else:
        out[path] = enc.encode(text, allowed_special={"<|endoftext|>"})
print(json.dumps(out))
