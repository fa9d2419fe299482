"""The book's DPO (ch07/04_preference-tuning-with-dpo/dpo-from-scratch.ipynb) for a few AdamW steps on
a tiny random GPT-2, as a value-for-value reference for llmlab's `task: dpo`.

Usage: book_dpo.py --data FILE.json --bpe DIR --out DIR --order "0,1;2,3;4,5"
                   [--logprobs mean|sum] [--beta 0.1] [--lr 5e-6] [--weight-decay 0.01] [--batch-size 2]
                   [--eval-iter 2] [--allowed-max-length 1024] [--seed 0]
Writes OUT/model (the initial model, save_pretrained, safetensors; llmlab loads it as gpt2:OUT/model)
and OUT/dpo.json (initial/after-each-step evaluation, per-step training figures, the first collated batch).
--order: the training batches, one per optimizer step, as indices into the train split.
"""
import argparse
import copy
import json
import os

import tiktoken
import torch
import torch.nn.functional as F
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from transformers import GPT2Config, GPT2LMHeadModel


def gpt2_tokenizer(bpe_dir):  # as tests/reference/tiktoken_ids.py
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=os.path.join(bpe_dir, "vocab.bpe"),
                                            encoder_json_file=os.path.join(bpe_dir, "encoder.json"))
    return tiktoken.Encoding(name="gpt2-local", explicit_n_vocab=50257,
                             pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


def format_input(entry):  # book: format_input (Alpaca prompt)
    instruction_text = ("Below is an instruction that describes a task. "
                        "Write a response that appropriately completes the request."
                        f"\n\n### Instruction:\n{entry['instruction']}")
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def encode_preference(entry, tokenizer):  # book: PreferenceDataset.__init__ (one entry)
    prompt = format_input(entry)
    return {"prompt": tokenizer.encode(prompt),
            "chosen": tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['chosen']}"),
            "rejected": tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['rejected']}")}


def custom_collate_fn(batch, pad_token_id=50256, allowed_max_length=None, mask_prompt_tokens=True):  # book
    data = {"prompt": [], "chosen": [], "rejected": [], "chosen_mask": [], "rejected_mask": []}
    max_length_common = max(len(item[key]) + 1 for item in batch for key in ("chosen", "rejected"))
    for item in batch:
        prompt = torch.tensor(item["prompt"])
        data["prompt"].append(prompt)
        for key in ("chosen", "rejected"):
            sequence = item[key]
            padded = sequence + [pad_token_id] * (max_length_common - len(sequence))
            mask = torch.ones(len(padded)).bool()
            mask[len(sequence):] = False
            if mask_prompt_tokens:
                mask[:prompt.shape[0] + 2] = False  # +2: the two "\n" before "### Response"
            data[key].append(torch.tensor(padded))
            data[f"{key}_mask"].append(mask)
    for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        stacked = torch.stack(data[key])
        data[key] = stacked[:, :allowed_max_length] if allowed_max_length is not None else stacked
    return data


def compute_logprobs(logits, labels, selection_mask, reduction):  # book: compute_logprobs (+ TRL's "sum")
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    mask = selection_mask[:, 1:].clone()
    selected = selected * mask
    return selected.sum(-1) / mask.sum(-1) if reduction == "mean" else selected.sum(-1)


def compute_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta):  # book: compute_dpo_loss (per-pair, not yet averaged)
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    losses = -F.logsigmoid(beta * logits)
    return losses, (pi_c - ref_c).detach(), (pi_r - ref_r).detach()


def compute_dpo_loss_batch(batch, policy, reference, beta, reduction):  # book: compute_dpo_loss_batch
    def logps(model, key):
        return compute_logprobs(model(batch[key]).logits, batch[key], batch[f"{key}_mask"], reduction)

    pi_c, pi_r = logps(policy, "chosen"), logps(policy, "rejected")
    with torch.no_grad():
        ref_c, ref_r = logps(reference, "chosen"), logps(reference, "rejected")
    losses, chosen_rewards, rejected_rewards = compute_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    # The book's three values (batch means), then TRL's logged metrics for the same batch.
    metrics = {"loss": losses.mean(), "chosen_reward": chosen_rewards.mean(),
               "rejected_reward": rejected_rewards.mean(),
               "reward_margin": (chosen_rewards - rejected_rewards).mean(),
               "rewards/chosen": (beta * chosen_rewards).mean(),
               "rewards/rejected": (beta * rejected_rewards).mean(),
               "rewards/margins": (beta * chosen_rewards - beta * rejected_rewards).mean(),
               "rewards/accuracies": (beta * chosen_rewards > beta * rejected_rewards).float().mean(),
               "logps/chosen": pi_c.detach().mean(), "logps/rejected": pi_r.detach().mean()}
    return metrics


def compute_dpo_loss_loader(batches, policy, reference, beta, reduction, num_batches):  # book: compute_dpo_loss_loader
    batches = batches[:num_batches]
    totals = {}
    for batch in batches:
        for k, v in compute_dpo_loss_batch(batch, policy, reference, beta, reduction).items():
            totals[k] = totals.get(k, 0.0) + v.item()
    return {k: v / len(batches) for k, v in totals.items()}


def evaluate_dpo_loss_loader(policy, reference, train_batches, val_batches, beta, reduction, eval_iter):  # book
    policy.eval()
    with torch.no_grad():
        res = {"train": compute_dpo_loss_loader(train_batches, policy, reference, beta, reduction, eval_iter),
               "val": compute_dpo_loss_loader(val_batches, policy, reference, beta, reduction, eval_iter)}
    policy.train()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--bpe", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--order", required=True)
    ap.add_argument("--logprobs", choices=["mean", "sum"], default="mean")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--eval-iter", type=int, default=2)
    ap.add_argument("--allowed-max-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)

    with open(a.data, encoding="utf-8") as f:
        data = json.load(f)
    train_portion, test_portion = int(len(data) * 0.85), int(len(data) * 0.1)  # the book's split
    train_data = data[:train_portion]
    test_data = data[train_portion:train_portion + test_portion]
    val_data = data[train_portion + test_portion:]

    tokenizer = gpt2_tokenizer(a.bpe)
    train_enc = [encode_preference(e, tokenizer) for e in train_data]
    val_enc = [encode_preference(e, tokenizer) for e in val_data]

    def collate(items):
        return custom_collate_fn(items, allowed_max_length=a.allowed_max_length)

    def file_order_batches(enc):  # DataLoader(shuffle=False, drop_last=False)
        return [collate(enc[i:i + a.batch_size]) for i in range(0, len(enc), a.batch_size)]

    train_eval, val_eval = file_order_batches(train_enc), file_order_batches(val_enc)
    order = [[int(i) for i in b.split(",")] for b in a.order.split(";")]
    train_steps = [collate([train_enc[i] for i in b]) for b in order]

    torch.manual_seed(a.seed)
    cfg = GPT2Config(vocab_size=50257, n_positions=256, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=True,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    policy = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # larger-than-default random weights so the logits are far from flat
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    policy.save_pretrained(os.path.join(a.out, "model"), safe_serialization=True)
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=a.weight_decay)

    def evaluate():
        return evaluate_dpo_loss_loader(policy, reference, train_eval, val_eval, a.beta, a.logprobs, a.eval_iter)

    def show(tag, ev):
        t, v = ev["train"], ev["val"]
        print(f"{tag}: train loss {t['loss']:.6f} margin {t['reward_margin']:.6f} acc {t['rewards/accuracies']:.2f}"
              f" | val loss {v['loss']:.6f} margin {v['reward_margin']:.6f} acc {v['rewards/accuracies']:.2f}")

    initial = evaluate()
    show("initial", initial)
    steps, tokens_seen = [], 0
    policy.train()
    for step, batch in enumerate(train_steps, 1):  # book: train_model_dpo_simple's inner loop
        optimizer.zero_grad()
        m = compute_dpo_loss_batch(batch, policy, reference, a.beta, a.logprobs)
        m["loss"].backward()
        optimizer.step()
        tokens_seen += batch["chosen"].numel()
        ev = evaluate()
        steps.append({"step": step, "loss": m["loss"].item(), "chosen_reward": m["chosen_reward"].item(),
                      "rejected_reward": m["rejected_reward"].item(), "tokens_seen": tokens_seen, "eval": ev})
        print(f"step {step}: batch loss {m['loss'].item():.6f} chosen {m['chosen_reward'].item():.6f}"
              f" rejected {m['rejected_reward'].item():.6f} tokens_seen {tokens_seen}")
        show(f"  eval after step {step}", ev)

    first = train_steps[0]
    collated = {k: first[k].long().tolist() for k in ("chosen", "rejected", "chosen_mask", "rejected_mask")}
    collated["prompt"] = [p.tolist() for p in first["prompt"]]
    out = {"logprobs": a.logprobs, "beta": a.beta, "train_size": len(train_data), "val_size": len(val_data),
           "test_size": len(test_data), "initial": initial, "steps": steps, "collate": collated}
    with open(os.path.join(a.out, "dpo.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
