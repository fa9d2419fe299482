"""Perplexity with the strided sliding window of Hugging Face's guide "Perplexity of
fixed-length models" (https://huggingface.co/docs/transformers/perplexity), its loop as written
there, on a tiny random GPT2LMHeadModel that transformers writes (GPT-2's vocabulary, so any
text tokenizes into it).

Usage: hf_perplexity.py OUT_DIR TEXT_FILE BPE_DIR MAX_LENGTH:STRIDE [MAX_LENGTH:STRIDE ...]
Writes OUT_DIR/model/{config.json,model.safetensors}; prints one JSON object:
{"text_tokens": n, "runs": [{"max_length", "stride", "perplexity", "nll", "tokens", "windows",
"exact_nll", "scored_tokens"}]}: the guide's figures, and the mean over every scored target.
BPE_DIR holds GPT-2's encoder.json and vocab.bpe (the data registry's gpt2-bpe).
"""
import json
import os
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer


def guide_perplexity(model, encodings, max_length, stride, device="cpu"):
    """The guide's code, unchanged but for returning its figures."""
    seq_len = encodings.input_ids.size(1)

    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    windows = 0
    exact_sum, exact_n = 0.0, 0  # ours: every scored target counted once
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings.input_ids[:, begin_loc:end_loc].to(device)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100

        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)

            # loss is calculated using CrossEntropyLoss which averages over valid labels
            # N.B. the model only calculates loss over trg_len - 1 labels, because it internally shifts the labels
            # to the left by 1.
            neg_log_likelihood = outputs.loss

        # Accumulate the total negative log-likelihood and the total number of tokens
        num_valid_tokens = (target_ids != -100).sum().item()  # number of valid tokens in target_ids
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # subtract batch_size due to internal label shift
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        windows += 1
        scored = (target_ids[:, 1:] != -100).sum().item()  # what the shifted loss averaged over
        if scored > 0:
            exact_sum += float(neg_log_likelihood) * scored
            exact_n += scored

        prev_end_loc = end_loc
        if end_loc == seq_len:
            break

    avg_nll = nll_sum / n_tokens  # average negative log-likelihood per token
    ppl = torch.exp(avg_nll)
    return {"max_length": max_length, "stride": stride, "perplexity": float(ppl),
            "nll": float(avg_nll), "tokens": int(n_tokens), "windows": windows,
            "exact_nll": exact_sum / exact_n, "scored_tokens": exact_n}


def main():
    out, text_file, bpe_dir, *runs = sys.argv[1:]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=50256, eos_token_id=50256)
    model = GPT2LMHeadModel(cfg).eval()
    # Much larger than default random weights, so the logits are far from uniform and depend
    # on the context (how much context a window gives then changes the perplexity).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    tok = GPT2Tokenizer(vocab=os.path.join(bpe_dir, "encoder.json"),
                        merges=os.path.join(bpe_dir, "vocab.bpe"))
    with open(text_file, encoding="utf-8") as f:
        text = f.read()
    encodings = tok(text, return_tensors="pt")
    results = []
    for r in runs:
        max_length, stride = (int(x) for x in r.split(":"))
        results.append(guide_perplexity(model, encodings, max_length, stride))
    print(json.dumps({"text_tokens": encodings.input_ids.size(1), "runs": results}))


if __name__ == "__main__":
    main()
