"""References for the Llama-family tests (tests/suite/llama.rs, tests/suite/gguf.rs), from code llmlab did
not write: Hugging Face transformers (GGUF loading, LlamaForCausalLM) and the `gguf` package.

Subcommands:
  smollm2 GGUF OUT_DIR CORPUS...   token ids of each corpus file, last-position logits of the
                                   prompts, greedy 32-token continuations, chat-template texts
  dequant GGUF OUT NAME...         tensors of a GGUF file dequantized by gguf-py (safetensors)
  small-gguf OUT_GGUF OUT_REF      a small GGUF with one tensor per ggml type (random blocks with
                                   sane scales) and gguf-py's dequantization of each
  tiny-llama OUT_DIR [--tied] [--shards] [--llama3-rope] [--bf16]
                                   a random LlamaForCausalLM saved with save_pretrained, plus
                                   logits and a greedy continuation for fixed inputs
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Übersetze: «Guten Morgen» — 早上好! 🚀",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a color."},
    ],
]


def smollm2(gguf, out_dir, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    # transformers' GGUF loader builds a plain ByteLevel pre-tokenizer whatever
    # `tokenizer.ggml.pre` says; for `smollm`, llama.cpp (and SmolLM2's own tokenizer.json) first
    # split every digit on its own. `ids_pre` is the same tokenizer with that pre-tokenizer.
    from tokenizers import pre_tokenizers

    patched = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    patched.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    ids, ids_pre = {}, {}
    for path in corpus:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        ids[path] = tok.encode(text, add_special_tokens=False)
        ids_pre[path] = patched.encode(text, add_special_tokens=False)
    logits = {}
    greedy = []
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            x = torch.tensor([tok.encode(p, add_special_tokens=False)])
            logits[f"prompt{i}"] = model(x).logits[0, -1].contiguous()
            g = model.generate(x, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            greedy.append({"prompt_ids": x[0].tolist(), "ids": g[0, x.shape[1]:].tolist()})
    save_file(logits, os.path.join(out_dir, "logits.safetensors"))
    chats = [
        tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS
    ]
    with open(os.path.join(out_dir, "ref.json"), "w") as f:
        json.dump({"ids": ids, "ids_pre": ids_pre, "prompts": PROMPTS, "greedy": greedy, "chats": chats,
                   "conversations": CONVERSATIONS}, f)


def dequant(gguf, out, names):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(gguf)
    by_name = {t.name: t for t in r.tensors}
    tensors = {}
    for n in names:
        t = by_name[n]
        tensors[n] = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)).astype(np.float32))
    save_file(tensors, out)


def small_gguf(out_gguf, out_ref):
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(out_gguf, "llama")
    w.add_uint32("test.u32", 7)
    w.add_float32("test.f32", 0.5)
    w.add_string("test.string", "héllo")
    w.add_array("test.array", ["a", "b"])
    w.add_bool("test.bool", True)
    rows, cols = 3, 512
    ref = {}
    # Byte offsets of the f16 scale/min fields in each block, set to sane values.
    scale_fields = {
        Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
        Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
    }
    for qt in [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]:
        name = f"t.{qt.name}"
        if qt == Q.F32:
            data = rng.standard_normal((rows, cols)).astype(np.float32)
            w.add_tensor(name, data)
            ref[name] = torch.from_numpy(data.copy())
            continue
        if qt == Q.F16:
            data = rng.standard_normal((rows, cols)).astype(np.float16)
            w.add_tensor(name, data)
            ref[name] = torch.from_numpy(data.astype(np.float32))
            continue
        block, size = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        if qt == Q.BF16:
            vals = rng.standard_normal((rows, cols)).astype(np.float32)
            raw = (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, cols // block, size)
        for off in scale_fields.get(qt, []):
            sc = (rng.random((rows, cols // block)) * 0.1 + 0.01).astype(np.float16)
            if off == 2 and qt in (Q.Q4_1, Q.Q5_1):
                sc = (rng.random((rows, cols // block)) - 0.5).astype(np.float16)
            raw[:, :, off:off + 2] = sc.view(np.uint8).reshape(rows, cols // block, 2)
        raw = raw.reshape(rows, -1)
        w.add_tensor(name, raw, raw_dtype=qt)
        ref[name] = torch.from_numpy(np.ascontiguousarray(dequantize(raw, qt)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(ref, out_ref)


def tiny_llama(out_dir, tied, shards, llama3_rope, bf16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_theta": 50000.0, "rope_type": "default"}
    if llama3_rope:
        rope = {"rope_theta": 50000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_parameters=rope,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init: a sharper parity test
            p.normal_(0, 0.2)
    if bf16:
        model = model.to(torch.bfloat16).to(torch.float32)  # values the bf16 file holds exactly
    model.eval()
    save_kw = {"max_shard_size": "40KB"} if shards else {}
    model.save_pretrained(out_dir, **save_kw)
    if bf16:
        model.to(torch.bfloat16).save_pretrained(out_dir, **save_kw)
        model = model.to(torch.float32)
    x = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x).logits
        g = model.generate(x[:1, :7], max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    save_file({"input_ids": x, "logits": logits.contiguous()}, os.path.join(out_dir, "ref.safetensors"))
    with open(os.path.join(out_dir, "ref.json"), "w") as f:
        json.dump({"prompt": x[0, :7].tolist(), "greedy": g[0, 7:].tolist()}, f)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "smollm2":
        smollm2(args[0], args[1], args[2:])
    elif cmd == "dequant":
        dequant(args[0], args[1], args[2:])
    elif cmd == "small-gguf":
        small_gguf(args[0], args[1])
    elif cmd == "tiny-llama":
        flags = set(args[1:])
        tiny_llama(args[0], "--tied" in flags, "--shards" in flags, "--llama3-rope" in flags, "--bf16" in flags)
    else:
        sys.exit(f"unknown command {cmd}")
