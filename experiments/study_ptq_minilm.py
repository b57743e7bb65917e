"""Post-training quantization of a real encoder: RTN vs GPTQ on all-MiniLM-L6-v2 embeddings.

    python -m experiments.study_ptq_minilm                 # 4 and 3 bits, rtn / gptq / gptq_act

All 36 linear weights of the 6 blocks of all-MiniLM-L6-v2 (``jaxeff.models.pretrained
("all-minilm-l6-v2")``; ``wq wk wv wo w_in w_out``; embeddings, LayerNorms and biases stay float32)
are quantized with group size 128 along the input dimension (128 divides 384 and 1536) by RTN
(``jaxeff.params.rtn``) and by GPTQ ("GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Frantar et al., ICLR 2023) with and without act-order, through
``jaxeff.params.gptq_model(params, bert_like(bert, cfg), ...)`` (padding tokens masked out of the
Hessians). Metric: cosine similarity between each sentence's fp32 embedding and its quantized
embedding (mean pooling + L2 norm, ``jaxeff.models.bert.sentence_embedding``), mean and minimum
over the evaluation sentences.

Data (tinyshakespeare.txt lines of at least 20 characters): calibration = ``--calib`` (1024)
lines drawn from the first 90% of the file, evaluation = ``--eval`` (256) lines from the last
10%, so the two never overlap. Results: ``experiments/results/study_ptq_minilm.json``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

from experiments.study_ptq_smollm2 import DATA

SELECT = r"layers/(wq|wk|wv|wo|w_in|w_out)$"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--methods", default="rtn,gptq,gptq_act")
    ap.add_argument("--calib", type=int, default=1024, help="calibration sentences")
    ap.add_argument("--percdamp", type=float, default=0.01)
    ap.add_argument("--eval", type=int, default=256, help="evaluation sentences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=DATA, help="tinyshakespeare.txt")
    ap.add_argument("--out", default=os.path.join("experiments", "results",
                                                  "study_ptq_minilm.json"))
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from experiments.common import machine_line, write_json
    from jaxeff.models import bert, pretrained
    from jaxeff.params import bert_like, gptq_model, materialize, rtn

    cfg, params, tok = pretrained("all-minilm-l6-v2")
    with open(args.data) as f:
        lines = [l.strip() for l in f.read().splitlines()]
    cut = int(0.9 * len(lines))
    rng = np.random.default_rng(args.seed)
    pick = lambda ls, n: [ls[i] for i in rng.choice(len(ls), n, replace=False)]  # noqa: E731
    calib_txt = pick([l for l in lines[:cut] if len(l) >= 20], args.calib)
    eval_txt = pick([l for l in lines[cut:] if len(l) >= 20], args.eval)
    calib = []
    for i in range(0, len(calib_txt), 32):
        ids, mask = tok.encode_batch(calib_txt[i:i + 32], max_length=128)
        calib.append({"inputs": jnp.asarray(ids), "mask": jnp.asarray(mask)})
    e_ids, e_mask = tok.encode_batch(eval_txt, max_length=128)
    emb = jax.jit(lambda p: bert.sentence_embedding(materialize(p), e_ids, e_mask, cfg))
    ref = emb(params)
    results = []
    for bits in [int(b) for b in args.bits.split(",")]:
        for method in args.methods.split(","):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                if method == "rtn":
                    q = rtn(params, bits, 128, select=SELECT)
                else:
                    q = gptq_model(params, bert_like(bert, cfg), calib, bits, 128,
                                   select=SELECT, act_order=(method == "gptq_act"),
                                   percdamp=args.percdamp, progress=False)
                jax.block_until_ready(q)
            except ValueError as e:   # e.g. the singular-Hessian check: an honest result
                results.append({"method": method, "bits": bits, "error": str(e)})
                print(results[-1], flush=True)
                continue
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            cos = np.asarray(jnp.sum(emb(q) * ref, axis=-1))
            results.append({"method": method, "bits": bits, "group_size": 128,
                            "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                            "seconds": secs, "cpu_seconds": cpu,
                            "load_avg": os.getloadavg()[0]})
            print(results[-1], flush=True)
    print("\n| method | bits | mean cosine to fp32 | min cosine | CPU-s |\n|---|---|---|---|---|")
    for r in [r for r in results if "error" not in r]:
        print(f"| {r['method']} | {r['bits']} | {r['cos_mean']:.5f} | {r['cos_min']:.4f} | "
              f"{r['cpu_seconds']:.1f} |")
    write_json({"study": "ptq_minilm", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": machine_line(),
                "command": "python -m experiments.study_ptq_minilm " + " ".join(argv or sys.argv[1:]),
                "calib_sentences": args.calib, "percdamp": args.percdamp,
                "eval_sentences": args.eval,
                "calib_tokens": int(sum(int(np.sum(b["mask"])) for b in calib)),
                "results": results}, args.out)


if __name__ == "__main__":
    main()
