"""Chapter 6's classification fine-tuning in PyTorch on a tiny random GPT-2 written by
transformers: the book's recipe (freeze everything, a new 2-class `out_head` with bias, unfreeze
what the strategy trains together with the final norm), the class logits of the chosen token,
cross-entropy, and a few torch.optim.AdamW steps (the book's optimizer: weight decay on every
trainable tensor).

Usage: hf_classify.py OUT_DIR [--lora]
Writes OUT_DIR/model/{config.json,model.safetensors} (tied embeddings, as GPT-2) and, per case,
OUT_DIR/<trainable>-<token>.safetensors with the inputs, the initial head, the loss of each step
and the class logits before and after the steps.

With --lora: a tiny random Llama (GQA) instead, adapted by Hugging Face PEFT (LoRA rank 4,
alpha 8, on q/k/v/o and gate/up/down; PEFT scales by alpha / rank) and trained with the final
norm and the head; OUT_DIR/lora-<token>.safetensors also holds PEFT's initial adapters under
llmlab's names (`A` as (in, rank), `B` as (rank, out)).
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


# PEFT's module names -> the book's Llama (llmlab's variable names).
LLAMA_NAMES = {"self_attn.q_proj": "att.W_query", "self_attn.k_proj": "att.W_key",
               "self_attn.v_proj": "att.W_value", "self_attn.o_proj": "att.out_proj",
               "mlp.gate_proj": "ff.fc1", "mlp.up_proj": "ff.fc2", "mlp.down_proj": "ff.fc3"}


class Classifier(torch.nn.Module):
    """A Llama body, its final norm and a new class head on the chosen token."""

    def __init__(self, lm, head_init, token):
        super().__init__()
        self.lm, self.token = lm, token
        self.head = torch.nn.Linear(lm.config.hidden_size, 2)
        with torch.no_grad():
            self.head.weight.copy_(head_init["head.weight"])
            self.head.bias.copy_(head_init["head.bias"])

    def forward(self, ids, lens):
        return self.head(pooled(self.lm.model(ids).last_hidden_state, lens, self.token))


def write_byte_tokenizer(path, vocab_size):
    """A byte-level BPE tokenizer.json without merges (the model folder needs one; these tests
    feed token ids directly): 3 special tokens, the 256 bytes, filler tokens up to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(path)


def llama_lora(out):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, attention_dropout=0.0,
                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    model_dir = os.path.join(out, "model")
    base.save_pretrained(model_dir)
    write_byte_tokenizer(os.path.join(model_dir, "tokenizer.json"), cfg.vocab_size)
    lens = torch.tensor([10, 4, 7, 2])
    ids = torch.zeros((4, 10), dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        ids[i, :n] = torch.randint(3, 300, (n,))
    labels = torch.tensor([1, 0, 1, 0])
    head = torch.nn.Linear(64, 2)
    head_init = {"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()}
    for token in ["last", "flexible"]:
        torch.manual_seed(1)
        lm = LlamaForCausalLM.from_pretrained(model_dir)
        lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        lm = peft.inject_adapter_in_model(lcfg, lm)
        clf = Classifier(lm, head_init, token).train()
        init = {}
        for name, p in clf.named_parameters():
            trained = "lora_" in name or name.startswith("lm.model.norm.") or name.startswith("head.")
            p.requires_grad = trained
            if "lora_" in name:
                # lm.model.layers.{i}.{module}.lora_A.default.weight
                parts = name.split(".")
                i, module, ab = parts[3], ".".join(parts[4:6]), parts[6]
                key = f"init.trf_blocks.{i}.{LLAMA_NAMES[module]}.{ab}"
                init[key] = p.detach().t().contiguous()
        assert len(init) == 2 * 7 * cfg.num_hidden_layers, sorted(init)
        opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=LR,
                                weight_decay=WEIGHT_DECAY)
        with torch.no_grad():
            before = clf(ids, lens)
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = F.cross_entropy(clf(ids, lens), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            after = clf(ids, lens)
        save_file({"ids": ids, "lens": lens, "labels": labels, **head_init, **init,
                   "losses": torch.tensor(losses, dtype=torch.float64),
                   "before": before.contiguous(), "after": after.contiguous()},
                  os.path.join(out, f"lora-{token}.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--lora", action="store_true")
    a = ap.parse_args()
    if a.lora:
        llama_lora(a.out)
        return
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
