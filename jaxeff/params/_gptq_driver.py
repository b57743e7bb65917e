"""Model-level GPTQ: quantize a network layer by layer, sequentially, on calibration batches.

"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (Frantar et
al., ICLR 2023), Section 4 / the reference ``llama_sequential``: the calibration batches are
embedded once; then for layer ``l = 0 .. L-1``

1. run layer ``l`` on its inputs ``h_l`` (which already went through the *quantized* layers
   ``< l``), capturing the input ``x`` of every selected linear weight, and accumulate
   ``H = (2/n) sum x x^T`` in float32, streaming over the batches (activations are not kept);
2. quantize each weight with :func:`jaxeff.params.gptq` and its ``H`` (weights that share an
   input, e.g. ``wq/wk/wv``, share one Hessian);
3. ``h_{l+1} = layer_l^quantized(h_l)``, and drop the layer's Hessians.

Cost: the work is two layer passes per layer over the calibration tokens (the dense prefix of
layer ``l`` that feeds the captured inputs plus the Hessian products, then the quantized layer);
on a CPU both are matmul-bound (SmolLM2-135M, 32K tokens: ~20 MFLOP per token per layer). Step 3
is fused with step 1 of layer ``l+1`` into one jitted pass per batch (``h_{l+1}`` never leaves
the device between them, one compiled program serves every layer of the same shapes), and the
last layer's output is not computed.

With ``true_sequential`` (the reference's ``--true-sequential``) step 1-2 run once per group of
weights that share an input, in forward order (``wq,wk,wv`` -> ``wo`` -> ``w_gate,w_up`` ->
``w_down``), each group seeing the outputs of the already quantized groups of the same layer.

The model is reached through a small pluggable protocol, :class:`LayerwiseModel`, so nothing in
the model's code changes: ``embed(params, batch) -> h``, ``layer(layer_params, h, batch,
capture) -> h`` (when ``capture`` is a dict the layer stores the input of each linear weight in it
under the weight's ``/``-path inside ``layer_params``), ``n_layers``, ``get_layer``,
``set_layers`` and ``layer_path``. :func:`stacked_layerwise` and :func:`list_layers` build it for the
two common layouts, :func:`llama_like` for ``jaxeff.models.llama`` (any module with the same
``embed``/``block`` signatures; the library never imports ``jaxeff.models``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxeff._checks import check_choice
from jaxeff.params._gptq import (HessianState, check_hessian, check_ok, check_solver_args,
                                 gptq_weight, hessian_update_all, quant_error)
from jaxeff.params._pow2 import pow2_gptq_weight
from jaxeff.params._quantized import check_quant_args, stack_quantized
from jaxeff.params._structured import array_fields, is_structured
from jaxeff.select import Selector, flatten_with_paths, select_mask

__all__ = ["LayerwiseModel", "stacked_layerwise", "list_layers", "llama_like", "bert_like",
           "gptq_model", "calibration_batches", "default_token_mask", "GRIDS"]

#: Value grids of :func:`gptq_model`: GPTQ's int grid (``QuantizedWeight``) and the
#: power-of-two grid of ShiftAddViT (``Pow2Weight``, ``jaxeff.params.pow2_gptq``).
GRIDS = ("int", "pow2")


def calibration_batches(n_segments: int = 128, seq_len: int = 256, batch_size: int = 16, *,
                        seed: int = 0, corpus=None, tokenizer=None) -> list:
    """The paper's calibration set: ``n_segments`` random packed segments of ``seq_len`` tokens.

    Drawn from ``jaxeff.data`` (default: the embedded Python-stdlib training corpus, byte
    tokenizer) with shuffling seeded by ``seed``; returned as a list of batch dicts of at most
    ``batch_size`` rows. Any iterable of batch dicts works as ``calib`` instead. Raises
    ``ValueError`` for non-positive sizes.
    """
    for name, v in (("n_segments", n_segments), ("seq_len", seq_len),
                    ("batch_size", batch_size)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    from jaxeff import data as jdata   # imported here: the driver itself needs no corpus

    corpus = jdata.load_stdlib_corpus("train") if corpus is None else corpus
    tokenizer = jdata.ByteTokenizer() if tokenizer is None else tokenizer
    it = iter(jdata.make_lm_dataset(corpus, tokenizer, seq_len, batch_size, seed=seed))
    out, have = [], 0
    while have < n_segments:
        b = next(it)
        take = min(batch_size, n_segments - have)
        out.append({k: np.asarray(v)[:take] for k, v in b.items()})
        have += take
    return out


def default_token_mask(batch):
    """Real tokens of a batch dict: ``segment_ids > 0`` when present (0 = padding), else None."""
    seg = batch.get("segment_ids") if hasattr(batch, "get") else None
    return None if seg is None else seg > 0


@dataclasses.dataclass(frozen=True)
class LayerwiseModel:
    """How the GPTQ driver walks a model: embed, then ``n_layers`` layers applied in sequence.

    Fields (all plain callables):
      embed(params, batch) -> h                       the input of layer 0
      layer(layer_params, h, batch, capture) -> h     one layer; fills ``capture`` (a dict) with
                                                      the input of each linear weight, keyed by
                                                      the weight's ``/``-path in layer_params
      n_layers(params) -> int
      get_layer(params, i) -> layer_params            dense params of layer i
      set_layers(params, layers) -> params            put back all layers (with quantized leaves)
      layer_path(i) -> str                            path prefix of layer i in the full tree, so
                                                      selectors match ``prefix/name``
      token_mask(batch) -> bool[...] | None           tokens that count in the Hessian
    """

    embed: Callable
    layer: Callable
    n_layers: Callable
    get_layer: Callable
    set_layers: Callable
    layer_path: Callable
    token_mask: Callable = default_token_mask


def _stack_leaves(*xs):
    if is_structured(xs[0]):
        return stack_quantized(xs)
    return jnp.stack(xs)


@jax.jit
def _take(tree, i):  # jitted: one compile for all layers instead of one per leaf shape
    return jax.tree.map(lambda x: x[i], tree)


@jax.jit
def _stack_all(layers):
    return jax.tree.map(_stack_leaves, *layers, is_leaf=is_structured)


def stacked_layerwise(embed: Callable, layer: Callable, key: str = "layers") -> LayerwiseModel:
    """Adapter for params whose layers are stacked on axis 0 under ``params[key]`` (scan layout).

    Quantized leaves come back stacked: a ``QuantizedWeight`` of shape ``[L, IN, OUT]``.
    """
    def get_layer(params, i):
        return _take(params[key], i)

    def set_layers(params, layers):
        out = dict(params)
        out[key] = _stack_all(layers)
        return out

    return LayerwiseModel(embed=embed, layer=layer,
                          n_layers=lambda p: int(jax.tree.leaves(p[key])[0].shape[0]),
                          get_layer=get_layer, set_layers=set_layers,
                          layer_path=lambda i: key)


def _layer_keys(container):
    """Positions of the layers in a list/tuple, or the sorted keys of an integer-keyed mapping
    (flax NNX states hold a list of modules as ``{0: ..., 1: ...}``)."""
    if isinstance(container, Mapping):
        keys = list(container.keys())
        if not all(isinstance(k, (int, np.integer)) for k in keys):
            raise ValueError(f"list_layers: the layer container is a mapping with keys {keys[:8]}; "
                             f"expected integer keys 0..L-1 (or a list)")
        return sorted(keys)
    return list(range(len(container)))


def list_layers(embed: Callable, layer: Callable, key: str = "layers") -> LayerwiseModel:
    """Adapter for params holding a list of per-layer trees under ``params[key]``.

    The container may be a list / tuple or a mapping with integer keys (what ``nnx.split`` /
    ``nnx.state`` give for a list of NNX modules); it comes back with the same type and keys.
    """
    def get_layer(params, i):
        container = params[key]
        return container[_layer_keys(container)[i]]

    def set_layers(params, layers):
        out = dict(params)
        container = params[key]
        if isinstance(container, Mapping):
            rebuilt = dict(zip(_layer_keys(container), layers))
            try:
                out[key] = type(container)(rebuilt)
            except TypeError:
                out[key] = rebuilt
        else:
            out[key] = type(container)(layers)
        try:
            return type(params)(out)
        except TypeError:
            return out

    return LayerwiseModel(embed=embed, layer=layer, n_layers=lambda p: len(p[key]),
                          get_layer=get_layer, set_layers=set_layers,
                          layer_path=lambda i: f"{key}/{i}")


def llama_like(module: Any, cfg: Any, key: str = "layers") -> LayerwiseModel:
    """Adapter for ``jaxeff.models.llama`` (or any module with its signatures).

    Uses ``module.embed(params, inputs, cfg)`` and ``module.block(layer_params, h, cfg,
    segment_ids, positions, capture=capture)`` with layers stacked under ``params[key]``; batch
    dicts need ``inputs`` (``segment_ids`` default to 1, ``positions`` to ``0..L-1``).
    """
    def embed(params, batch):
        return module.embed(params, batch["inputs"], cfg)

    def layer(lp, h, batch, capture):
        inputs = batch["inputs"]
        seg = batch.get("segment_ids")
        pos = batch.get("positions")
        if seg is None:
            seg = jnp.ones(inputs.shape, jnp.int32)
        if pos is None:
            pos = jnp.broadcast_to(jnp.arange(inputs.shape[-1], dtype=jnp.int32), inputs.shape)
        return module.block(lp, h, cfg, seg, pos, capture=capture)

    return stacked_layerwise(embed, layer, key)


def bert_like(module: Any, cfg: Any, key: str = "layers") -> LayerwiseModel:
    """Adapter for ``jaxeff.models.bert`` (or any module with its signatures).

    Uses ``module.embed(params, inputs, cfg, token_types)`` and ``module.block(layer_params, h,
    keep, cfg, capture=capture)`` with layers stacked under ``params[key]``; batch dicts need
    ``inputs`` and may hold ``mask`` (1 = real token, 0 = padding; default all real) and
    ``token_types``. Padding tokens are masked out of the attention and of the Hessians.
    """
    def keep(batch):
        m = batch.get("mask")
        return jnp.ones(batch["inputs"].shape, bool) if m is None else jnp.asarray(m) > 0

    def embed(params, batch):
        return module.embed(params, batch["inputs"], cfg, batch.get("token_types"))

    def layer(lp, h, batch, capture):
        return module.block(lp, h, keep(batch), cfg, capture=capture)

    model = stacked_layerwise(embed, layer, key)
    return dataclasses.replace(model, token_mask=lambda b: None if b.get("mask") is None
                               else np.asarray(b["mask"]) > 0)


def _child_key(tree, k: str):
    """The key of ``tree`` spelled ``k`` in a ``/``-path: an int for sequences and for
    integer-keyed mappings (NNX layer lists), else the string."""
    if isinstance(tree, (list, tuple)):
        return int(k)
    if k not in tree and k.lstrip("-").isdigit() and int(k) in tree:
        return int(k)
    return k


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[_child_key(tree, k)]
    return tree


def _set(tree, path, value):
    head, _, rest = path.partition("/")
    key = _child_key(tree, head)
    if isinstance(tree, (list, tuple)):
        items = list(tree)
        items[key] = value if not rest else _set(items[key], rest, value)
        return type(tree)(items)
    out = dict(tree)
    out[key] = value if not rest else _set(tree[key], rest, value)
    return out


def _split_out(qw, sizes):
    """Split a packed ``[..., IN, sum(sizes)]`` weight along OUT (every field but ``perm``)."""
    parts, start = [], 0
    for size in sizes:
        parts.append(qw.replace(**{f: getattr(qw, f)[..., start:start + size]
                                   for f in array_fields(qw) if f != "perm"},
                                shape=(*qw.shape[:-1], size)))
        start += size
    return parts


def _capture_structure(model, lp, h, batch):
    """Names captured by one layer in forward order, grouped by shared input, and input widths."""
    info = {}

    def f(lp, h, batch):
        cap = {}
        model.layer(lp, h, batch, cap)
        info["names"] = list(cap)
        info["ids"] = [id(cap[n]) for n in cap]
        info["width"] = {n: cap[n].shape[-1] for n in cap}
        info["lead"] = {n: cap[n].shape[:-1] for n in cap}
        return 0

    jax.eval_shape(f, lp, h, batch)
    groups, rep, first_of = [], {}, {}
    for name, i in zip(info["names"], info["ids"]):
        rep[name] = first_of.setdefault(i, name)
        if groups and rep[groups[-1][-1]] == rep[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return info["names"], groups, rep, info["width"], info["lead"]


# Compiled pieces are cached at module level (keyed on the model's functions), so quantizing the
# same model twice, or at several settings, compiles each piece once.
@functools.lru_cache(maxsize=32)
def _embed_fn(embed):
    return jax.jit(embed)


@functools.lru_cache(maxsize=32)
def _forward_fn(layer):
    return jax.jit(lambda lp, h, b: layer(lp, h, b, None), donate_argnums=(1,))


def _capture_into(layer, lp, h, b, m, states):
    cap = {}
    layer(lp, h, b, cap)
    return hessian_update_all(states, cap, m)


@functools.lru_cache(maxsize=128)
def _accumulate_fn(layer):
    """Hessians of the inputs captured by ``layer(lp, h)`` (the layer's output is dropped, so
    XLA computes only the prefix of the layer that the captured inputs need)."""
    return jax.jit(functools.partial(_capture_into, layer), donate_argnums=(4,))


@functools.lru_cache(maxsize=128)
def _forward_accumulate_fn(layer):
    """The fused pass: ``h' = layer(lp_q, h)`` with the just-quantized layer, and on the same
    ``h'`` the Hessians of the next layer ``lp_next`` (one pass per layer, nothing leaves the
    device between the two)."""
    def step(lp_q, lp_next, h, b, m, states):
        h = layer(lp_q, h, b, None)
        return h, _capture_into(layer, lp_next, h, b, m, states)
    return jax.jit(step, donate_argnums=(2, 5))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "pad", "block_size",
                                             "act_order", "sym", "scale_dtype", "grid"))
def _solve_members(ws, hess, percdamp, *, bits, group_size, pad, block_size, act_order, sym,
                   scale_dtype, grid="int"):
    """GPTQ of the weights sharing one input Hessian: GPTQ treats output columns independently
    given H, so they are solved as one matrix concatenated along OUT, then split."""
    w = jnp.concatenate(ws, axis=-1) if len(ws) > 1 else ws[0]
    kw = dict(bits=bits, group_size=group_size,
              stored_group_size=check_quant_args(bits, group_size, w.shape[-2], pad),
              block_size=block_size, act_order=act_order, scale_dtype=scale_dtype)
    if grid == "pow2":
        qw, ok = pow2_gptq_weight(w, hess, percdamp, **kw)
    else:
        qw, ok = gptq_weight(w, hess, percdamp, sym=sym, **kw)
    parts = _split_out(qw, [x.shape[-1] for x in ws]) if len(ws) > 1 else [qw]
    w_hats = [q.materialize() for q in parts]
    errs = [quant_error(x, x_hat, hess) for x, x_hat in zip(ws, w_hats)]
    return parts, w_hats, errs, ok


def gptq_model(params, model: LayerwiseModel, calib: Iterable, bits: int,
               group_size: Optional[int] = None, *, select: Selector = None,
               block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
               sym: bool = False, pad: bool = False, scale_dtype=jnp.float32,
               true_sequential: bool = False, progress: bool = True,
               return_stats: bool = False, grid: str = "int"):
    """GPTQ-quantize the linear weights of a model sequentially, layer by layer.

    Procedure in the module docstring (Frantar et al., 2023). Args:
      params: the model's parameter pytree (dense).
      model: a :class:`LayerwiseModel` (e.g. ``llama_like(jaxeff.models.llama, cfg)``).
      calib: any iterable of batch dicts (the paper: 128 random segments of 2048 tokens;
        :func:`calibration_batches` draws them from ``jaxeff.data``); it is read once and kept
        (token ids only; activations are recomputed per layer).
      bits, group_size, block_size (128), percdamp (0.01), act_order (False), sym (False),
        pad (False), scale_dtype (float32): as :func:`jaxeff.params.gptq`.
      select: ``jaxeff.select`` selector over the full-tree paths (``layer_path(i)/name``, e.g.
        ``layers/wq``); default None = every weight whose input the layer captures.
      true_sequential: re-capture inputs after each group of weights sharing an input (False).
      progress: show a tqdm bar over layers (True).
      return_stats: also return ``{'seconds', 'errors': [(layer, name, tr(dW^T H dW))]}``.
      grid: ``'int'`` (default: GPTQ's grid, ``QuantizedWeight``) or ``'pow2'`` (power-of-two
        values, ``Pow2Weight``: ``jaxeff.params.pow2_gptq``; symmetric by construction, so
        ``sym`` must stay False).

    Returns the params with each quantized weight replaced by a ``QuantizedWeight`` (a
    ``Pow2Weight`` for ``grid='pow2'``; stacked layouts give stacked leaves). Peak extra memory: one layer's Hessians plus the calibration
    activations of one layer boundary.

    Raises ``ValueError`` for bad quantization arguments, empty ``calib``, a selector matching no
    leaf, a selector picking leaves whose input no layer captures, an unknown ``grid`` (or
    ``sym=True`` with ``'pow2'``), or a singular Hessian.
    """
    t0 = time.perf_counter()
    check_quant_args(bits, None, 1, pad)
    check_solver_args(block_size, percdamp)
    check_choice("grid", grid, GRIDS)
    if grid == "pow2" and sym:
        raise ValueError("sym=True does not apply to grid='pow2' (sign-magnitude codes are "
                         "symmetric by construction); leave sym=False")
    batches = list(calib)
    if not batches:
        raise ValueError("calib is empty: pass an iterable of batch dicts (e.g. 128 segments)")
    n_layers = model.n_layers(params)
    full_mask = {}
    if select is not None:
        mask = select_mask(select, params, is_leaf=is_structured)
        full_mask = dict(flatten_with_paths(mask)[0])

    hs = [_embed_fn(model.embed)(params, b) for b in batches]
    masks = [model.token_mask(b) for b in batches]
    fwd = _forward_fn(model.layer)

    # Pre-pass (shapes only): what each layer captures, and argument checks before any work.
    plan, used = [], set()
    for i in range(n_layers):
        lp = model.get_layer(params, i)
        names, groups, rep, width, _ = _capture_structure(model, lp, hs[0], batches[0])
        prefix = model.layer_path(i)
        chosen = [n for n in names if select is None or full_mask.get(f"{prefix}/{n}", False)]
        for n in chosen:
            check_quant_args(bits, group_size, _get(lp, n).shape[-2], pad)
        used.update(f"{prefix}/{n}" for n in chosen)
        plan.append((names, groups, rep, width, chosen))
    if select is not None:
        extra = sorted(p for p, m in full_mask.items() if m and p not in used)
        if extra:
            raise ValueError(f"select={select!r} picks leaves whose input no layer captures, so "
                             f"GPTQ cannot quantize them: {extra[:8]}; use rtn() for those")
    if not used:
        raise ValueError(f"select={select!r} matches no weight captured by the model's layers")

    solve = functools.partial(_solve_members, bits=int(bits), group_size=group_size,
                              pad=bool(pad), block_size=int(block_size),
                              act_order=bool(act_order), sym=bool(sym),
                              scale_dtype=jnp.dtype(scale_dtype), grid=grid)
    def zero_states(i, keys):
        width = plan[i][3]
        return {k: HessianState(jnp.zeros((width[k], width[k]), jnp.float32),
                                jnp.zeros((), jnp.float32)) for k in keys}

    def groups_of(i):
        names, groups, rep, width, chosen = plan[i]
        todo = ([[n for n in g if n in chosen] for g in groups] if true_sequential
                else [chosen])
        return [(g, tuple(dict.fromkeys(rep[n] for n in g))) for g in todo if g]

    qlayers, errors = [], []
    acc = _accumulate_fn(model.layer)
    pending = None   # Hessians of layer i's first group, accumulated by layer i-1's fused pass
    bar = tqdm(range(n_layers), desc=f"GPTQ {bits}-bit {grid}", disable=not progress)
    for i in bar:
        lp = model.get_layer(params, i)
        rep = plan[i][2]
        cur, qleaves = lp, {}
        for j, (group, keys) in enumerate(groups_of(i)):
            if j == 0 and pending is not None:
                states = pending
            else:
                states = zero_states(i, keys)
                for h, b, m in zip(hs, batches, masks):
                    states = acc(cur, h, b, m, states)
            pending = None
            for k in keys:
                members = [n for n in group if rep[n] == k]
                ws = tuple(_get(cur, n) for n in members)
                where = f"layer {i} ({', '.join(members)})"
                check_hessian(states[k].h, where)
                parts, w_hats, errs, ok = solve(ws, states[k].h, percdamp)
                check_ok(ok, percdamp, where)
                for n, q, w_hat, e in zip(members, parts, w_hats, errs):
                    if return_stats:
                        errors.append((i, n, float(e)))
                    qleaves[n] = q
                    cur = _set(cur, n, w_hat)
            del states
        # h_{i+1} = layer_i^quantized(h_i), fused with the Hessians of layer i+1's first group
        # (they see the dense layer i+1 on h_{i+1} in both modes).
        nxt = groups_of(i + 1) if i + 1 < n_layers else []
        if nxt:
            fused, lp_next, states = _forward_accumulate_fn(model.layer), model.get_layer(
                params, i + 1), [zero_states(i + 1, nxt[0][1])]
            new_hs = []
            for h, b, m in zip(hs, batches, masks):
                h, st = fused(cur, lp_next, h, b, m, states[-1])
                new_hs.append(h)
                states[-1] = st
            hs, pending = new_hs, states[-1]
        elif i + 1 < n_layers:
            hs = [fwd(cur, h, b) for h, b in zip(hs, batches)]
        out = lp
        for n, qw in qleaves.items():
            out = _set(out, n, qw)
        qlayers.append(out)
    result = model.set_layers(params, qlayers)
    if return_stats:
        return result, {"seconds": time.perf_counter() - t0, "errors": errors}
    return result
