"""Chapter 6's classification fine-tuning in PyTorch on a tiny random GPT-2 written by
transformers: the book's recipe (freeze everything, a new 2-class `out_head` with bias, unfreeze
what the strategy trains together with the final norm), the class logits of the chosen token,
cross-entropy, and a few torch.optim.AdamW steps (the book's optimizer: weight decay on every
trainable tensor).

Usage: hf_classify.py OUT_DIR
Writes OUT_DIR/model/{config.json,model.safetensors} (tied embeddings, as GPT-2) and, per case,
OUT_DIR/<trainable>-<token>.safetensors with the inputs, the initial head, the loss of each step
and the class logits before and after the steps.
"""
import argparse
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

PAD = 210
STEPS = 3
LR = 1e-3
WEIGHT_DECAY = 0.1


def pooled(hidden, lens, token):
    """The hidden state the head reads: the book's last token, the first, the last real token
    (flexible) or the mean over the real tokens (ch06/02_bonus_additional-experiments)."""
    if token == "last":
        return hidden[:, -1, :]
    if token == "first":
        return hidden[:, 0, :]
    if token == "flexible":
        return hidden[torch.arange(hidden.shape[0]), lens - 1, :]
    mask = (torch.arange(hidden.shape[1])[None, :] < lens[:, None]).unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def class_logits(model, ids, lens, token):
    hidden = model.transformer(ids).last_hidden_state  # after the final norm (ln_f)
    return model.lm_head(pooled(hidden, lens, token))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=211, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                     tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=PAD, pad_token_id=PAD)
    base = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model_dir = os.path.join(a.out, "model")
    base.save_pretrained(model_dir, safe_serialization=True)

    # Four messages padded with the end-of-text token to the longest, as the book's SpamDataset.
    lens = torch.tensor([9, 5, 7, 3])
    ids = torch.full((4, 9), PAD, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        ids[i, :n] = torch.randint(1, 200, (n,))
    labels = torch.tensor([0, 1, 1, 0])
    head = torch.nn.Linear(48, 2)
    head_init = {"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()}

    for trainable in ["last_block", "all", "head"]:
        for token in ["last", "flexible", "mean"]:
            model = GPT2LMHeadModel.from_pretrained(model_dir).train()
            for p in model.parameters():
                p.requires_grad = False
            model.lm_head = torch.nn.Linear(48, 2)
            with torch.no_grad():
                model.lm_head.weight.copy_(head_init["head.weight"])
                model.lm_head.bias.copy_(head_init["head.bias"])
            if trainable == "last_block":
                unfrozen = [model.transformer.h[-1], model.transformer.ln_f]
            elif trainable == "all":
                unfrozen = [model.transformer]
            else:
                unfrozen = []
            for m in unfrozen:
                for p in m.parameters():
                    p.requires_grad = True
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                    lr=LR, weight_decay=WEIGHT_DECAY)
            with torch.no_grad():
                before = class_logits(model, ids, lens, token)
            losses = []
            for _ in range(STEPS):
                opt.zero_grad()
                loss = F.cross_entropy(class_logits(model, ids, lens, token), labels)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            with torch.no_grad():
                after = class_logits(model, ids, lens, token)
                wte_changed = not torch.equal(model.transformer.wte.weight, base.transformer.wte.weight)
            save_file({"ids": ids, "lens": lens, "labels": labels, **head_init,
                       "losses": torch.tensor(losses, dtype=torch.float64),
                       "before": before.contiguous(), "after": after.contiguous(),
                       "wte_changed": torch.tensor([int(wte_changed)])},
                      os.path.join(a.out, f"{trainable}-{token}.safetensors"))


if __name__ == "__main__":
    main()
