"""Chatbot Arena's ratings of a votes file: `compute_mle_elo` (the Bradley-Terry fit as a
scikit-learn logistic regression) and `compute_online_elo`, as the Arena's analysis notebook
writes them (https://colab.research.google.com/drive/1KdwokPjirkTmpO_P1WByFNFiqxWQquwH), with
numpy arrays in place of the pandas frame and K = 32 for the online Elo.

Usage: arena_elo.py VOTES.jsonl
Prints {"mle": {model: rating}, "elo": {model: rating}}.
"""
import json
import math
import sys
from collections import defaultdict

import numpy as np
from sklearn.linear_model import LogisticRegression


def compute_mle_elo(battles, SCALE=400, BASE=10, INIT_RATING=1000):
    models = list(dict.fromkeys([b["model_a"] for b in battles] + [b["model_b"] for b in battles]))
    index = {m: i for i, m in enumerate(models)}
    # duplicate battles
    battles = battles + battles
    p = len(models)
    n = len(battles)

    X = np.zeros([n, p])
    X[np.arange(n), [index[b["model_a"]] for b in battles]] = +math.log(BASE)
    X[np.arange(n), [index[b["model_b"]] for b in battles]] = -math.log(BASE)

    # one A win => two A win
    Y = np.zeros(n)
    Y[[b["winner"] == "model_a" for b in battles]] = 1.0

    # one tie => one A win + one B win
    tie_idx = np.array([b["winner"] in ("tie", "tie (bothbad)") for b in battles])
    tie_idx[len(tie_idx) // 2:] = False
    Y[tie_idx] = 1.0

    # penalty=None in the notebook; scikit-learn >= 1.8 spells it C=np.inf.
    lr = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-6)
    lr.fit(X, Y)

    elo_scores = SCALE * lr.coef_[0] + INIT_RATING
    return {m: float(elo_scores[i]) for m, i in index.items()}


def compute_online_elo(battles, K=32, SCALE=400, BASE=10, INIT_RATING=1000):
    rating = defaultdict(lambda: INIT_RATING)
    for b in battles:
        model_a, model_b, winner = b["model_a"], b["model_b"], b["winner"]
        ra = rating[model_a]
        rb = rating[model_b]
        ea = 1 / (1 + BASE ** ((rb - ra) / SCALE))
        eb = 1 / (1 + BASE ** ((ra - rb) / SCALE))
        if winner == "model_a":
            sa = 1
        elif winner == "model_b":
            sa = 0
        elif winner == "tie" or winner == "tie (bothbad)":
            sa = 0.5
        else:
            raise Exception(f"unexpected vote {winner}")
        rating[model_a] += K * (sa - ea)
        rating[model_b] += K * (1 - sa - eb)
    return dict(rating)


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        battles = [json.loads(line) for line in f if line.strip()]
    print(json.dumps({"mle": compute_mle_elo(battles), "elo": compute_online_elo(battles)}))


if __name__ == "__main__":
    main()
