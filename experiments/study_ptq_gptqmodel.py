"""gptqmodel 7.6.0 beside jaxeff's GPTQ on SmolLM2-135M: same weights, calibration and eval tokens.

    python3 -m venv /work/gptqvenv && /work/gptqvenv/bin/pip install torch==2.13.0 \\
        gptqmodel==7.6.0 transformers                    # a separate venv, never a jaxeff dep
    python -m experiments.study_ptq_gptqmodel --venv /work/gptqvenv        # project venv

Two stages. In the project venv (jaxeff importable) the script exports SmolLM2-135M-Instruct as
jaxeff loads it (``jaxeff.models.save_safetensors`` + ``hf_config``, and the tokenizer as
``tokenizer.json``) together with the calibration and evaluation token ids of
``experiments.study_ptq_smollm2`` (128 random 256-token segments from the text before the last
8,192 tokens; evaluation = the last 1,024 tokens of tinyshakespeare.txt as one sequence) into
``--work``; then it runs itself under ``<venv>/bin/python`` with ``--quantize``, which imports
only torch / transformers / gptqmodel (never jaxeff, so no test imports it). That stage

* evaluates the exported fp32 model with HF transformers (should reproduce jaxeff's 3.363),
* quantizes all linears of the 30 blocks with gptqmodel's GPTQ at 4 (and 3) bits, group 128,
  its own defaults otherwise (sym=True, true_sequential=True, desc_act=False,
  act_group_aware=True, damp_percent=0.05) and once with desc_act=True (act-order),
* evaluates each quantized model with gptqmodel's torch kernel on the same tokens,

recording the quantization wall time, its CPU seconds (``time.process_time``, all threads) and
the 1-minute load average. Results: ``experiments/results/study_ptq_gptqmodel.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join("experiments", "results", "study_ptq_gptqmodel.json")


def export(work, data, n_calib, seed):
    """Project venv: write the HF checkpoint, tokenizer and token ids into ``work``."""
    import numpy as np

    from experiments.study_ptq_smollm2 import _data
    from jaxeff.models import hf_config, pretrained, save_safetensors

    cfg, params, tok = pretrained("smollm2-135m")
    os.makedirs(work, exist_ok=True)
    save_safetensors(os.path.join(work, "model.safetensors"), params, cfg)
    conf = dict(hf_config(cfg), bos_token_id=int(tok.bos_id), eos_token_id=int(tok.eos_id))
    with open(os.path.join(work, "config.json"), "w") as f:
        json.dump(conf, f, indent=1)
    tok.backend.save(os.path.join(work, "tokenizer.json"))
    name = tok.backend.id_to_token
    with open(os.path.join(work, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                   "bos_token": name(int(tok.bos_id)), "eos_token": name(int(tok.eos_id)),
                   "pad_token": name(int(tok.pad_id)), "model_max_length": cfg.max_seq_len}, f)
    eval_ids, calib, n_tokens = _data(tok, data, n_calib, seed)
    np.save(os.path.join(work, "eval_ids.npy"), np.asarray(eval_ids, np.int64))
    np.save(os.path.join(work, "calib_ids.npy"),
            np.concatenate([b["inputs"] for b in calib]).astype(np.int64))
    return n_tokens


def quantize(work, bits_list, runs):
    """gptqmodel venv: fp32 eval, then quantize + eval per setting; one JSON line per result."""
    import numpy as np
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    eval_ids = torch.from_numpy(np.load(os.path.join(work, "eval_ids.npy")))[None]
    calib = np.load(os.path.join(work, "calib_ids.npy"))
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.size} for row in calib]

    @torch.no_grad()
    def loss_of(model):
        logits = model(input_ids=eval_ids[:, :-1]).logits.float()
        return float(torch.nn.functional.cross_entropy(logits[0], eval_ids[0, 1:]))

    def emit(r):
        r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(r), flush=True)

    fp = AutoModelForCausalLM.from_pretrained(work, torch_dtype=torch.float32)
    emit({"method": "fp32 (transformers)", "bits": 0, "loss": loss_of(fp)})
    del fp
    for bits in bits_list:
        for name in runs:
            kw = {"desc_act": True, "act_group_aware": False} if name == "desc_act" else {}
            qcfg = QuantizeConfig(bits=bits, group_size=128, **kw)
            out_dir = os.path.join(work, f"q{bits}_{name}")
            c0, w0, l0 = time.process_time(), time.perf_counter(), os.getloadavg()[0]
            model = GPTQModel.load(work, qcfg, device="cpu")
            c1, w1 = time.process_time(), time.perf_counter()
            model.quantize(calib, batch_size=16)
            c2, w2 = time.process_time(), time.perf_counter()
            model.save(out_dir)
            del model
            qm = GPTQModel.load(out_dir, device="cpu", backend=BACKEND.TORCH)
            emit({"method": f"gptqmodel {name}", "bits": bits, "group_size": 128,
                  "config": {k: getattr(qcfg, k) for k in ("sym", "true_sequential", "desc_act",
                                                          "act_group_aware", "damp_percent")},
                  "load_seconds": w1 - w0, "seconds": w2 - w1, "cpu_seconds": c2 - c1,
                  "load_avg_start": l0, "load_avg_end": os.getloadavg()[0],
                  "loss": loss_of(qm)})
            del qm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default="/work/gptqvenv", help="venv with gptqmodel 7.6.0")
    ap.add_argument("--work", default="/tmp/ptq_gptqmodel", help="scratch folder (~0.6 GB)")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--runs", default="default,desc_act",
                    help="gptqmodel settings: default (its defaults), desc_act (act-order)")
    ap.add_argument("--calib", type=int, default=128, help="256-token calibration segments")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data",
                                                   "tinyshakespeare.txt"),
                    help="tinyshakespeare.txt (as experiments.study_ptq_smollm2)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--quantize", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bits = [int(b) for b in args.bits.split(",")]
    args.work = os.path.abspath(args.work)
    if args.quantize:
        return quantize(args.work, bits, args.runs.split(","))
    n_tokens = export(args.work, args.data, args.calib, args.seed)
    py = os.path.join(args.venv, "bin", "python")
    cmd = [py, os.path.abspath(__file__), "--quantize", "--work", args.work, "--bits", args.bits,
           "--runs", args.runs]
    # Without PYTHONPATH: the repository root holds a ``kernels`` folder (jaxeff's Pallas
    # kernels) that transformers would import as the hub ``kernels`` package.
    # GPTQMODEL_CPU_WORKERS=2: on a 2-core machine gptqmodel 7.6.0's default (1 worker) fails at
    # once ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1").
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    results, tail = [], []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=args.work) as p:
        for line in p.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            if line.startswith("RESULT "):
                results.append(json.loads(line[len("RESULT "):]))
                print(json.dumps(results[-1]), flush=True)
    if p.returncode:
        raise RuntimeError(f"gptqmodel stage failed (exit {p.returncode}):\n" + "\n".join(tail))
    fp32 = results[0]["loss"]
    for r in results:
        r["increase"] = r["loss"] - fp32
    vers = subprocess.run([py, "-c", "from importlib.metadata import version as v; "
                           "print(v('gptqmodel'), v('torch'), v('transformers'))"],
                          capture_output=True, text=True, env=env, cwd=args.work).stdout.split()
    from experiments.common import machine_line, write_json
    report = {"study": "ptq_gptqmodel", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_line(),
              "command": "python -m experiments.study_ptq_gptqmodel " + " ".join(argv or sys.argv[1:]),
              "versions": dict(zip(("gptqmodel", "torch", "transformers"), vers)),
              "calib_segments": args.calib, "text_tokens": n_tokens, "results": results}
    write_json(report, args.out)


if __name__ == "__main__":
    main()
