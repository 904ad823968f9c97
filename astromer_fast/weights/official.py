"""Map the variables of the official (TensorFlow/Keras) Astromer checkpoints to our PyTorch names.

Variable names in a TF2 object checkpoint are paths through the Keras object graph, each ending in
``/.ATTRIBUTES/VARIABLE_VALUE`` (left out below). ``E`` is the encoder's prefix: ``layer_with_weights-0/``
in the released Astromer 1 model, ``layer_with_weights-1/`` in Astromer 2 models (the MASK-token layer
comes first). Keras ``Dense`` kernels are stored ``[in, out]`` and are transposed (T) to torch's
``[out, in]``.

==================================  ===============================================  =====  ==============
ours (torch)                        official (TF)                                    T      official shape
==================================  ===============================================  =====  ==============
embedding.mag_proj.weight           E inp_transform/kernel  (*)                      T      [1, d]
embedding.mag_proj.bias             E inp_transform/bias    (*)                             [d]
embedding.mask_token                msk_token  (**)                                  ->(1,) [1, 1]
blocks.{i}.attn.wq.weight / .bias   E enc_layers/{i}/mha/wq/kernel / bias            T      [d, d] / [d]
blocks.{i}.attn.wk.weight / .bias   E enc_layers/{i}/mha/wk/kernel / bias            T      [d, d] / [d]
blocks.{i}.attn.wv.weight / .bias   E enc_layers/{i}/mha/wv/kernel / bias            T      [d, d] / [d]
blocks.{i}.attn.wo.weight / .bias   E enc_layers/{i}/mha/dense/kernel / bias         T      [d, d] / [d]
blocks.{i}.leak1.weight / .bias     E enc_layers/{i}/reshape_leak_1/kernel / bias    T      [d, d] / [d]
blocks.{i}.leak2.weight / .bias     E enc_layers/{i}/reshape_leak_2/kernel / bias    T      [d, d] / [d]
blocks.{i}.ffn1.weight / .bias      E enc_layers/{i}/ffn/layer_with_weights-0/...    T      [d, dff]/[dff]
blocks.{i}.ffn2.weight / .bias      E enc_layers/{i}/ffn/layer_with_weights-1/...    T      [dff, d]/[d]
blocks.{i}.ln1.weight / .bias       E enc_layers/{i}/layernorm1/gamma / beta                [d] / [d]
blocks.{i}.ln2.weight / .bias       E enc_layers/{i}/layernorm2/gamma / beta                [d] / [d]
head.norm.weight / .bias            H bn_0/gamma / beta                                     [d] / [d]
head.proj.weight / .bias            H reg_layer/kernel / bias                        T      [d, 1] / [1]
==================================  ===============================================  =====  ==============

``leak*`` exist only in Astromer 2 (``use_leak``), the token only in Astromer 2 (``use_token``).
``ffn/layer-{0,1}`` is accepted for ``ffn/layer_with_weights-{0,1}``. ``H`` is the regression head
("RegLayer", named ``regression``): ``layer_with_weights-1/`` in Astromer 1, ``layer_with_weights-2/``
in an Astromer 2 pretraining model.

(*) In classifier checkpoints built by the official ``skip_avg_clf`` (e.g.
``astromer2_skipclf_alcock``) the classifier calls ``encoder.input_format`` itself, so the input
projection is a top-level layer of that model and is saved once, as ``layer_with_weights-0/kernel``
``[1, 256]`` and ``layer_with_weights-0/bias`` ``[256]``; the encoder is ``layer_with_weights-1/``.
When no ``inp_transform`` variable exists, the one ``.../kernel`` of shape ``[1, d]`` outside the
encoder (with its ``bias`` of shape ``[d]``) is taken.

(**) The MASK token is the ``tf.Variable`` of the official ``AddMSKToken`` layer (named ``msk_token``),
attribute ``msk_token``, initial value ``[[0.]]``: in a pretraining checkpoint
``layer_with_weights-0/msk_token/.ATTRIBUTES/VARIABLE_VALUE`` of shape ``[1, 1]``. Any variable whose
path has a component ``msk_token`` / ``mask_token`` with one element is accepted. Classifier
checkpoints have **no token**: the classifier feeds its inputs to the encoder without the token layer
(zero-padded magnitudes stay 0); ``astromer2_skipclf_alcock.weights.index`` indeed holds no such variable. With ``require_token=False`` a missing token is filled with 0, its
initial value, which reproduces that behaviour for padding.

Classifier-only variables (``gamma_weight``, the MLP, its LayerNorm, the output layer) are not errors:
they are returned as ``.extras``. Optimizer state (``optimizer/``, ``.OPTIMIZER_SLOT``), ``save_counter``,
Keras metrics and ``_CHECKPOINTABLE_OBJECT_GRAPH`` are ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from astromer_fast.weights.tf_checkpoint import CheckpointError, TensorInfo, read_index

__all__ = ["NameMap", "OfficialStateDict", "infer_architecture", "official_name_map",
           "official_state_dict"]

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_IGNORED = (re.compile(r"(^|/)optimizer/"), re.compile(r"\.OPTIMIZER_SLOT"),
            re.compile(r"(^|/)save_counter/"), re.compile(r"^_CHECKPOINTABLE_OBJECT_GRAPH$"),
            re.compile(r"(^|/)keras_api/metrics/"), re.compile(r"(^|/)_?metrics/"))
_ENC = re.compile(r"^(.*?)enc_layers/(\d+)/(.+)$")
_TOKEN = re.compile(r"(^|/)(msk_token|mask_token)(/|$)")


class NameMap(dict):
    """{our name: (official name, transpose)} plus what else the checkpoint holds:
    ``extras`` (unused, non-ignored official names, e.g. a classifier's), ``absent`` (our names with no
    official variable, allowed by ``require_head=False`` / ``require_token=False``)."""

    extras: list
    absent: list


class OfficialStateDict(dict):
    """{our name: np.ndarray} ready for ``torch.from_numpy``; ``extras``/``absent`` as in NameMap,
    ``filled`` the names given a default value (the missing MASK token, zero)."""

    extras: list
    absent: list
    filled: list


def _strip(name: str) -> str:
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name


def _ignored(name: str) -> bool:
    return any(p.search(name) for p in _IGNORED)


def _shapes(index_or_variables) -> tuple[dict[str, tuple], str]:
    """{full official name: shape} from a path, an index, arrays, shapes or (name, shape) pairs."""
    source = getattr(index_or_variables, "source", "checkpoint")  # read_index/read_checkpoint's
    if isinstance(index_or_variables, (str, os.PathLike)):
        source = os.fspath(index_or_variables)
        index_or_variables = read_index(index_or_variables)
    items = (index_or_variables.items() if isinstance(index_or_variables, Mapping)
             else index_or_variables)
    out = {}
    for name, v in items:
        if isinstance(v, TensorInfo):
            if not v.is_numeric:
                continue
            shape = v.shape
        elif hasattr(v, "shape"):
            if getattr(v, "dtype", None) is not None and np.dtype(v.dtype).kind in "OSU":
                continue
            shape = v.shape
        else:
            shape = v
        out[name] = tuple(int(s) for s in shape)
    return out, source


def _candidates(shapes: dict[str, tuple]):
    """Non-ignored variables keyed by their stripped path."""
    return {_strip(n): (n, s) for n, s in shapes.items() if not _ignored(n)}


def _encoder_prefix(vars_: dict, source: str) -> str | None:
    prefixes = sorted({m.group(1) for k in vars_ if (m := _ENC.match(k))})
    if len(prefixes) > 1:
        raise CheckpointError(f"{source}: several encoders (enc_layers under "
                              f"{', '.join(repr(p) for p in prefixes)}); cannot tell which to load")
    return prefixes[0] if prefixes else None


def _find_input_projection(vars_: dict, enc: str | None, d_model: int | None):
    if enc is not None and f"{enc}inp_transform/kernel" in vars_:
        return f"{enc}inp_transform"
    named = sorted({k[: -len("/kernel")] for k in vars_
                    if k.endswith("inp_transform/kernel")})
    if len(named) == 1:
        return named[0]
    cands = []
    for k, (_, s) in vars_.items():
        if not k.endswith("/kernel") and k != "kernel":
            continue
        if "enc_layers/" in k or len(s) != 2 or s[0] != 1 or (d_model and s[1] != d_model):
            continue
        base = k[: -len("kernel")].rstrip("/")
        bias = vars_.get(f"{base}/bias" if base else "bias")
        if bias is not None and bias[1] == (s[1],):
            cands.append(base)
    return cands[0] if len(cands) == 1 else None


def _find_token(vars_: dict):
    hits = sorted(k for k, (_, s) in vars_.items()
                  if _TOKEN.search(k) and int(np.prod(s, dtype=np.int64)) == 1)
    return hits[0] if len(hits) == 1 else None


def _find_head(vars_: dict):
    bases = sorted({k[: -len("bn_0/gamma")] for k in vars_ if k.endswith("bn_0/gamma")
                    and "enc_layers/" not in k})
    for b in bases:
        if f"{b}reg_layer/kernel" in vars_:
            return b
    return None


def _collapse_blocks(names: list[str], vars_: dict) -> list[str]:
    """``names``, with every encoder block that is unused as a whole written once as
    ``<prefix>enc_layers/<i>/* (n variables)``."""
    blocks: dict[str, list[str]] = {}
    for k in vars_:
        if m := _ENC.match(k):
            blocks.setdefault(f"{m.group(1)}enc_layers/{m.group(2)}/", []).append(k)
    unused = set(names)
    whole = {b for b, ks in blocks.items() if unused.issuperset(ks)}
    out = [f"{b}* ({len(blocks[b])} variables)" for b in sorted(whole)]
    for k in names:
        m = _ENC.match(k)
        if not (m and f"{m.group(1)}enc_layers/{m.group(2)}/" in whole):
            out.append(k)
    return out


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def official_name_map(index_or_variables, *, n_blocks: int, dff: int, use_leak: bool,
                      use_token: bool, d_model: int = 256, require_head: bool = True,
                      require_token: bool = True, source: str | None = None) -> NameMap:
    """{our state_dict name: (official variable name, transpose)} for the given architecture.

    ``index_or_variables``: ``read_index(...)`` output, ``{name: array}``, ``{name: shape}``, (name,
    shape) pairs, or a checkpoint path. Raises ``CheckpointError`` listing every expected variable that
    is missing and every one whose shape differs (expected vs found), and the model variables the
    architecture does not use (encoder variables, e.g. more blocks than ``n_blocks``, whole unused
    blocks written once as ``.../enc_layers/<i>/*``; a MASK token when ``use_token=False``).
    Classifier-only variables are not errors: they come back in ``.extras``."""
    shapes, src = _shapes(index_or_variables)
    src = source or src
    vars_ = _candidates(shapes)
    enc = _encoder_prefix(vars_, src)
    d = d_model
    E = enc if enc is not None else "<encoder>/"

    # our name -> (list of acceptable official stripped paths, transpose, expected official shape)
    expected: list[tuple[str, list[str], bool, tuple]] = []
    inp = _find_input_projection(vars_, enc, d)
    inp = inp if inp is not None else f"{E}inp_transform"
    kernel, bias = (f"{inp}/kernel", f"{inp}/bias") if inp else ("kernel", "bias")
    expected += [("embedding.mag_proj.weight", [kernel], True, (1, d)),
                 ("embedding.mag_proj.bias", [bias], False, (d,))]
    for i in range(n_blocks):
        b = f"{E}enc_layers/{i}/"
        dense = [("attn.wq", ["mha/wq"], d, d), ("attn.wk", ["mha/wk"], d, d),
                 ("attn.wv", ["mha/wv"], d, d), ("attn.wo", ["mha/dense"], d, d)]
        if use_leak:
            dense += [("leak1", ["reshape_leak_1"], d, d), ("leak2", ["reshape_leak_2"], d, d)]
        dense += [("ffn1", ["ffn/layer_with_weights-0", "ffn/layer-0"], d, dff),
                  ("ffn2", ["ffn/layer_with_weights-1", "ffn/layer-1"], dff, d)]
        for ours, theirs, fan_in, fan_out in dense:
            expected.append((f"blocks.{i}.{ours}.weight", [f"{b}{t}/kernel" for t in theirs], True,
                             (fan_in, fan_out)))
            expected.append((f"blocks.{i}.{ours}.bias", [f"{b}{t}/bias" for t in theirs], False,
                             (fan_out,)))
        for ours, theirs in (("ln1", "layernorm1"), ("ln2", "layernorm2")):
            expected.append((f"blocks.{i}.{ours}.weight", [f"{b}{theirs}/gamma"], False, (d,)))
            expected.append((f"blocks.{i}.{ours}.bias", [f"{b}{theirs}/beta"], False, (d,)))

    optional: dict[str, str] = {}
    token = _find_token(vars_) if use_token else None
    if use_token:
        if token is None and not require_token:
            optional["embedding.mask_token"] = "token"
        else:
            expected.append(("embedding.mask_token", [token or "msk_token"], False, (1, 1)))
    head = _find_head(vars_)
    if head is None and not require_head:
        optional.update({k: "head" for k in ("head.norm.weight", "head.norm.bias",
                                             "head.proj.weight", "head.proj.bias")})
    else:
        H = head if head is not None else "<head>/"
        expected += [("head.norm.weight", [f"{H}bn_0/gamma"], False, (d,)),
                     ("head.norm.bias", [f"{H}bn_0/beta"], False, (d,)),
                     ("head.proj.weight", [f"{H}reg_layer/kernel"], True, (d, 1)),
                     ("head.proj.bias", [f"{H}reg_layer/bias"], False, (1,))]

    result, missing, misshaped, used = NameMap(), [], [], set()
    for ours, paths, transpose, shape in expected:
        hit = next((p for p in paths if p in vars_), None)
        if hit is None:
            missing.append(f"{ours} <- {paths[0]}")
            continue
        full, found = vars_[hit]
        used.add(hit)
        ok = (int(np.prod(found, dtype=np.int64)) == 1) if ours == "embedding.mask_token" \
            else found == shape
        if not ok:
            misshaped.append(f"{ours} <- {hit}: expected {_fmt(shape)}, found {_fmt(found)}")
            continue
        result[ours] = (full, transpose)

    unexpected = sorted(k for k in vars_ if k not in used and enc is not None
                        and k.startswith(f"{enc}enc_layers/"))
    if not use_token and _find_token(vars_) is not None:
        unexpected.append(_find_token(vars_))  # a trained MASK token would be silently dropped
    if missing or misshaped or unexpected:
        what = (f"n_blocks={n_blocks}, dff={dff}, d_model={d}, use_leak={use_leak}, "
                f"use_token={use_token}")
        lines = [f"{src}: does not match the official Astromer layout for {what}"]
        if missing:
            lines.append(f"missing {len(missing)} variable(s): " + "; ".join(missing))
        if misshaped:
            lines.append(f"mis-shaped {len(misshaped)} variable(s): " + "; ".join(misshaped))
        if unexpected:
            lines.append(f"{len(unexpected)} model variable(s) this architecture does not use: "
                         + "; ".join(_collapse_blocks(unexpected, vars_)))
        if head is None and any(m.startswith("head.") for m in missing):
            lines.append("the checkpoint has no regression head (bn_0 + reg_layer): a classifier "
                         "checkpoint? pass require_head=False to load the encoder alone")
        if use_token and token is None and any(m.startswith("embedding.mask_token")
                                               for m in missing):
            lines.append("the checkpoint has no MASK token (msk_token); official classifier "
                         "checkpoints have none: for one, pass require_token=False to use 0, "
                         "its initial value")
        if enc is None:
            lines.append("no enc_layers/<i>/ variables at all: not an Astromer checkpoint?")
        else:
            try:
                arch = infer_architecture(shapes)
            except CheckpointError:
                pass
            else:
                lines.append("the checkpoint itself looks like: "
                             + ", ".join(f"{k}={v}" for k, v in arch.items()))
        raise CheckpointError("\n  ".join(lines))
    result.extras = sorted(full for k, (full, _) in vars_.items() if k not in used)
    result.absent = sorted(optional)
    return result


def official_state_dict(variables: dict, **kw) -> OfficialStateDict:
    """Our state dict (numpy arrays, torch layout) from official variables (``read_checkpoint``
    output). Keyword arguments as for :func:`official_name_map`.

    Given an index instead (``read_index`` output: ``TensorInfo`` values, or plain shape tuples),
    there is nothing to read: the result maps our names to the *shapes* our tensors would have."""
    names = official_name_map(variables, **kw)
    out = OfficialStateDict()
    shapes_only = any(isinstance(v, (TensorInfo, tuple, list)) for v in variables.values())
    for ours, (theirs, transpose) in names.items():
        if shapes_only:
            v = variables[theirs]
            shape = tuple(v.shape if isinstance(v, TensorInfo) else v)
            out[ours] = (1,) if ours == "embedding.mask_token" else \
                (shape[::-1] if transpose else shape)
            continue
        arr = np.asarray(variables[theirs])
        if ours == "embedding.mask_token":
            arr = arr.reshape(1)
        elif transpose:
            arr = arr.T
        out[ours] = np.ascontiguousarray(arr)
    out.filled = []
    if "embedding.mask_token" in names.absent:
        out["embedding.mask_token"] = (1,) if shapes_only else np.zeros(1, dtype=np.float32)
        out.filled.append("embedding.mask_token")
    out.extras = names.extras
    out.absent = [n for n in names.absent if n not in out.filled]
    return out


def infer_architecture(names_and_shapes) -> dict:
    """``dict(n_blocks, dff, d_model, use_leak, use_token, has_head)`` read off the variable names and
    shapes (an index, ``{name: array}``, ``{name: shape}``, (name, shape) pairs or a path).
    The number of heads is not recorded in the weights (see conf.json's ``heads``)."""
    shapes, src = _shapes(names_and_shapes)
    vars_ = _candidates(shapes)
    enc = _encoder_prefix(vars_, src)
    if enc is None:
        raise CheckpointError(f"{src}: no enc_layers/<i>/ variables: not an Astromer checkpoint")
    blocks = sorted({int(m.group(2)) for k in vars_ if (m := _ENC.match(k))})
    if blocks != list(range(len(blocks))):
        raise CheckpointError(f"{src}: encoder blocks are not numbered 0..n-1 (found {blocks})")

    def shape_of(*paths):
        for p in paths:
            if p in vars_:
                return vars_[p][1]
        raise CheckpointError(f"{src}: cannot infer the architecture: {paths[0]} is missing")

    b0 = f"{enc}enc_layers/0/"
    wq = shape_of(f"{b0}mha/wq/kernel")
    ffn1 = shape_of(f"{b0}ffn/layer_with_weights-0/kernel", f"{b0}ffn/layer-0/kernel")
    if len(wq) != 2 or len(ffn1) != 2:
        raise CheckpointError(f"{src}: unexpected kernel ranks: wq {_fmt(wq)}, ffn {_fmt(ffn1)}")
    return dict(n_blocks=len(blocks), dff=int(ffn1[1]), d_model=int(wq[0]),
                use_leak=f"{b0}reshape_leak_1/kernel" in vars_,
                use_token=_find_token(vars_) is not None,
                has_head=_find_head(vars_) is not None)
