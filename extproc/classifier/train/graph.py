"""Builds the ONNX graph by hand from numpy weights (needs `onnx`, not torch).

One builder for both our classifier and the plain MiniLM-L6 baseline, so the benchmark compares
like with like: same ops, same fusions, same quantization.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 384
HEADS = 12
HEAD_DIM = HIDDEN // HEADS
OPSET = 17
BASE_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ln1": "attention.output.LayerNorm",
    "up": "intermediate.dense",
    "down": "output.dense",
    "ln2": "output.LayerNorm",
}

LayerWeights = dict[str, np.ndarray]  # "q.weight" [out, in], "q.bias", ... "ln2.bias"


def base_layer(sd: dict[str, np.ndarray], i: int) -> LayerWeights:
    out: LayerWeights = {}
    for mine, theirs in BASE_NAMES.items():
        out[f"{mine}.weight"] = sd[f"encoder.layer.{i}.{theirs}.weight"]
        out[f"{mine}.bias"] = sd[f"encoder.layer.{i}.{theirs}.bias"]
    return out


@dataclass
class BranchWeights:
    name: str  # output name prefix: "domain", "complexity", "pii"
    layers: list[LayerWeights]
    head_w: np.ndarray  # [n_out, HIDDEN]
    head_b: np.ndarray
    pooled: bool
    activation: str  # "softmax" | "sigmoid"
    with_trunk_mean: bool = False  # head reads [pooled ; masked mean of the trunk output]


@dataclass
class _G:
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    n: int = 0
    prefix: str = ""  # for nodes added to an existing graph, whose own names run from 1

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def const(self, arr: np.ndarray, hint: str) -> str:
        nm = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), nm))
        return nm

    def op(self, op: str, inputs: list[str], hint: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(hint) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs


def _i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


class Builder:
    def __init__(self, prefix: str = "") -> None:
        self.g = _G(prefix=prefix)
        g = self.g
        self.heads_shape = g.const(_i64(0, 0, HEADS, HEAD_DIM), "heads_shape")
        self.merge_shape = g.const(_i64(0, 0, HIDDEN), "merge_shape")
        self.scale = g.const(np.array(1.0 / math.sqrt(HEAD_DIM), np.float32), "scale")
        self.half = g.const(np.array(0.5, np.float32), "half")
        self.one = g.const(np.array(1.0, np.float32), "one")
        self.rsqrt2 = g.const(np.array(1.0 / math.sqrt(2.0), np.float32), "rsqrt2")

    def linear(self, x: str, w: np.ndarray, b: np.ndarray, hint: str) -> str:
        g = self.g
        y = g.op("MatMul", [x, g.const(_f32(w).T, f"{hint}_w")], hint)
        return g.op("Add", [y, g.const(_f32(b), f"{hint}_b")], hint)

    def layer_norm(self, x: str, w: np.ndarray, b: np.ndarray, hint: str) -> str:
        g = self.g
        return g.op(
            "LayerNormalization",
            [x, g.const(_f32(w), f"{hint}_g"), g.const(_f32(b), f"{hint}_b")],
            hint,
            axis=-1,
            epsilon=1e-12,
        )

    def gelu(self, x: str) -> str:
        g = self.g
        e = g.op("Erf", [g.op("Mul", [x, self.rsqrt2], "gelu")], "gelu")
        return g.op("Mul", [g.op("Mul", [x, self.half], "gelu"), g.op("Add", [e, self.one], "gelu")], "gelu")

    def split_heads(self, x: str, perm: list[int]) -> str:
        g = self.g
        return g.op("Transpose", [g.op("Reshape", [x, self.heads_shape], "heads")], "heads", perm=perm)

    def attention(self, q: str, k: str, v: str, bias: str) -> str:
        """q, k, v already projected, [B, L*, HIDDEN]; returns context [B, Lq, HIDDEN]."""
        g = self.g
        qh = self.split_heads(q, [0, 2, 1, 3])
        kt = self.split_heads(k, [0, 2, 3, 1])
        vh = self.split_heads(v, [0, 2, 1, 3])
        s = g.op("Add", [g.op("Mul", [g.op("MatMul", [qh, kt], "qk"), self.scale], "qk"), bias], "qk")
        ctx = g.op("MatMul", [g.op("Softmax", [s], "attn", axis=-1), vh], "ctx")
        ctx = g.op("Transpose", [ctx], "ctx", perm=[0, 2, 1, 3])
        return g.op("Reshape", [ctx, self.merge_shape], "ctx")

    def projections(self, x: str, mats: list[tuple[np.ndarray, np.ndarray]], hint: str) -> list[str]:
        """Several linear maps of the same input as ONE MatMul (fewer, larger kernels)."""
        g = self.g
        w = np.concatenate([_f32(m[0]).T for m in mats], axis=1)
        b = np.concatenate([_f32(m[1]) for m in mats])
        y = g.op("Add", [g.op("MatMul", [x, g.const(w, f"{hint}_w")], hint), g.const(b, f"{hint}_b")], hint)
        if len(mats) == 1:
            return [y]
        split = g.const(_i64(*[m[0].shape[0] for m in mats]), "split")
        return list(g.op("Split", [y, split], hint, n_out=len(mats), axis=-1))

    def finish_layer(self, resid: str, ctx: str, lw: LayerWeights, hint: str) -> str:
        h = self.layer_norm(
            self.g.op("Add", [resid, self.linear(ctx, lw["o.weight"], lw["o.bias"], f"{hint}_o")], hint),
            lw["ln1.weight"],
            lw["ln1.bias"],
            f"{hint}_ln1",
        )
        ff = self.linear(
            self.gelu(self.linear(h, lw["up.weight"], lw["up.bias"], f"{hint}_up")),
            lw["down.weight"],
            lw["down.bias"],
            f"{hint}_down",
        )
        return self.layer_norm(self.g.op("Add", [h, ff], hint), lw["ln2.weight"], lw["ln2.bias"], f"{hint}_ln2")

    def layer(self, x: str, bias: str, lw: LayerWeights, hint: str) -> str:
        q, k, v = self.projections(x, [(lw[f"{n}.weight"], lw[f"{n}.bias"]) for n in "qkv"], f"{hint}_qkv")
        return self.finish_layer(x, self.attention(q, k, v, bias), lw, hint)


def build(
    sd: dict[str, np.ndarray],
    trunk_layers: int,
    branches: list[BranchWeights],
    *,
    extra_outputs: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """The graph: embeddings and `trunk_layers` base layers once, then every branch.

    `extra_outputs` may hold "trunk" (hidden states after the trunk, for training caches) and
    "embedding" (masked mean of the trunk output; with all six layers as the trunk, the plain
    sentence-transformers pass). The shipped classifier gets its embeddings from `embedding_graph`.
    """
    b = Builder()
    g = b.g
    ids, mask = "input_ids", "attention_mask"
    # Embeddings: token-type 0 is folded into the position table.
    pos_table = _f32(sd["embeddings.position_embeddings.weight"]) + _f32(
        sd["embeddings.token_type_embeddings.weight"][0]
    )
    word = g.op("Gather", [g.const(_f32(sd["embeddings.word_embeddings.weight"]), "word"), ids], "word", axis=0)
    seq_len = g.op("Gather", [g.op("Shape", [ids], "shape"), g.const(_i64(1), "one_idx")], "len", axis=0)
    pos = g.op("Slice", [g.const(pos_table, "pos"), g.const(_i64(0), "zero"), seq_len, g.const(_i64(0), "ax0")], "pos")
    x = b.layer_norm(
        g.op("Add", [word, pos], "emb"), sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"], "emb_ln"
    )
    maskf = g.op("Cast", [mask], "maskf", to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [b.one, maskf], "bias"), g.const(np.array(-10000.0, np.float32), "neg")], "bias")
    bias = g.op("Unsqueeze", [bias, g.const(_i64(1, 2), "axes12")], "bias")
    for i in range(trunk_layers):
        x = b.layer(x, bias, base_layer(sd, i), f"trunk{i}")

    outputs: list[onnx.ValueInfoProto] = []
    if "trunk" in extra_outputs:
        g.nodes.append(helper.make_node("Identity", [x], ["trunk"]))
        outputs.append(helper.make_tensor_value_info("trunk", TensorProto.FLOAT, ["batch", "seq", HIDDEN]))
    if "embedding" in extra_outputs:
        g.nodes.append(helper.make_node("Identity", [_masked_mean(b, x, maskf)], ["embedding"]))
        outputs.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", HIDDEN]))

    if branches:
        _branches(b, x, bias, branches, outputs, maskf)

    graph = helper.make_graph(
        g.nodes,
        "extproc_classifier",
        [
            helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs,
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


EMBEDDING = "embedding"  # [B, 384] masked mean of the trunk output: what fitted heads read
TRUNK = "trunk"  # [B, L, 384] the trunk's hidden states: what the sentence graph reads
SENTENCE_EMBEDDING = "sentence_embedding"  # [B, 384] unit-length all-MiniLM-L6-v2 embedding


def add_trunk_outputs(model: onnx.ModelProto, trunk_layers: int) -> onnx.ModelProto:
    """`model` (a built classifier, quantized or not) with two more outputs: `embedding`, the masked
    mean of the trunk output (free: fitted heads read it), and `trunk`, the hidden states themselves
    (read only when a sentence embedding is asked for; see `sentence_graph`).

    onnxruntime computes every node of a graph whatever outputs a run asks for (measured: asking for
    the domain head alone took as long as all three), so an optional layer cannot live in this graph
    without every request paying for it.
    """

    def produced_by(op: str, prefix: str) -> str:  # by op type: a quantized graph has *_quantized siblings
        return next(n.output[0] for n in model.graph.node if n.op_type == op and n.output[0].startswith(prefix))

    trunk = produced_by("LayerNormalization", f"trunk{trunk_layers - 1}_ln2_")
    maskf = produced_by("Cast", "maskf_")
    b = Builder(prefix="out_")
    b.g.nodes.append(helper.make_node("Identity", [_masked_mean(b, trunk, maskf)], [EMBEDDING]))
    b.g.nodes.append(helper.make_node("Identity", [trunk], [TRUNK]))
    used = {x for n in b.g.nodes for x in n.input}
    model.graph.node.extend(b.g.nodes)
    model.graph.initializer.extend(i for i in b.g.inits if i.name in used)
    model.graph.output.extend(
        [
            helper.make_tensor_value_info(EMBEDDING, TensorProto.FLOAT, ["batch", HIDDEN]),
            helper.make_tensor_value_info(TRUNK, TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
        ]
    )
    onnx.checker.check_model(model)
    return model


def sentence_graph(sd: dict[str, np.ndarray], layer: int) -> onnx.ModelProto:
    """The sentence embedding from the trunk's hidden states: the base model's own layer `layer`,
    unadapted, then mean pooling and L2 normalization, i.e. all-MiniLM-L6-v2's embedding (for a
    semantic cache's paraphrase lookups). A graph of its own (one layer, ~2 MB in int8) so that only
    a caller who asks for an embedding pays for the layer."""
    b = Builder()
    g = b.g
    x, mask = TRUNK, "attention_mask"
    maskf = g.op("Cast", [mask], "maskf", to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [b.one, maskf], "bias"), g.const(np.array(-10000.0, np.float32), "neg")], "bias")
    bias = g.op("Unsqueeze", [bias, g.const(_i64(1, 2), "axes12")], "bias")
    top = b.layer(x, bias, base_layer(sd, layer), f"sent{layer}")
    g.nodes.append(
        helper.make_node("LpNormalization", [_masked_mean(b, top, maskf)], [SENTENCE_EMBEDDING], axis=-1, p=2)
    )
    graph = helper.make_graph(
        g.nodes,
        "extproc_sentence_embedding",
        [
            helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
            helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info(SENTENCE_EMBEDDING, TensorProto.FLOAT, ["batch", HIDDEN])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def branch_graph(branch: BranchWeights) -> onnx.ModelProto:
    """One branch as a graph of its own over the trunk's hidden states (`trunk`, `attention_mask`
    in; `<name>_probs` out), like `sentence_graph`: the runtime runs it only for the texts that
    need it (the PII tagger: only when a policy asks the tagger to read the text), since
    onnxruntime computes every node of a graph whatever outputs a run asks for."""
    b = Builder()
    g = b.g
    maskf = g.op("Cast", ["attention_mask"], "maskf", to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [b.one, maskf], "bias"), g.const(np.array(-10000.0, np.float32), "neg")], "bias")
    bias = g.op("Unsqueeze", [bias, g.const(_i64(1, 2), "axes12")], "bias")
    outputs: list[onnx.ValueInfoProto] = []
    _branches(b, TRUNK, bias, [branch], outputs, maskf)
    graph = helper.make_graph(
        g.nodes,
        f"extproc_{branch.name}",
        [
            helper.make_tensor_value_info(TRUNK, TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs,
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def dequantized_branch(
    model: onnx.ModelProto, name: str, fused: str, columns: tuple[int, int], pooled: bool = False
) -> BranchWeights:
    """A one-layer branch's fp32 weights read back from a quantized graph (int8 weight x its
    per-column scale). Its first projection is `columns` of the fused MatMul `fused`: Q/K/V for a
    token-level branch, K/V for a pooled one (whose Q is its own MatMul). For re-exporting a
    branch whose float weights were not kept: re-quantized with the same scheme, the weights come
    back as the same integers (the export checks its outputs)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def find(prefix: str, suffix: str) -> np.ndarray:
        (key,) = [k for k in inits if k.startswith(prefix) and k.endswith(suffix)]
        return inits[key]

    def weight(prefix: str) -> np.ndarray:  # [out, in], as the builder takes it
        q = find(prefix + "_", "_quantized").astype(np.float32)
        if np.any(find(prefix + "_", "_zero_point")):
            raise ValueError(f"{prefix}: asymmetric weights are not supported")
        return (q * find(prefix + "_", "_scale")[None, :]).T

    a, z = columns
    first, first_b = weight(fused)[a:z], _bias(inits, fused)[a:z]
    names = "kv" if pooled else "qkv"
    layer: LayerWeights = {}
    for i, n in enumerate(names):
        layer[f"{n}.weight"] = first[i * HIDDEN : (i + 1) * HIDDEN]
        layer[f"{n}.bias"] = first_b[i * HIDDEN : (i + 1) * HIDDEN]
    for n in ("o", "up", "down") + (("q",) if pooled else ()):
        layer[f"{n}.weight"] = weight(f"{name}0_{n}_w")
        layer[f"{n}.bias"] = _bias(inits, f"{name}0_{n}_w")
    for n in ("ln1", "ln2"):
        layer[f"{n}.weight"] = find(f"{name}0_{n}_g_", "")
        layer[f"{n}.bias"] = find(f"{name}0_{n}_b_", "")
    head_w = weight(f"{name}_head_w")
    return BranchWeights(
        name, [layer], head_w, _bias(inits, f"{name}_head_w"), pooled, "softmax" if head_w.shape[0] > 1 else "sigmoid"
    )


def dequantized_base(model: onnx.ModelProto, sd: dict[str, np.ndarray], trunk_layers: int) -> dict[str, np.ndarray]:
    """The base state dict `sd` with the word table and the trunk's MatMul weights replaced by those
    a quantized graph holds (dequantized): rebuilt and quantized again, the trunk is the same
    integers, so its states (and the embedding every fitted head reads) stay bit-identical."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def find(prefix: str, suffix: str) -> np.ndarray:
        (key,) = [k for k in inits if k.startswith(prefix) and k.endswith(suffix)]
        return inits[key]

    out = dict(sd)
    word_q = find("word_", "_quantized").astype(np.float32)
    out["embeddings.word_embeddings.weight"] = (word_q - find("word_", "_zero_point").astype(np.float32)) * find(
        "word_", "_scale"
    )
    for i in range(trunk_layers):
        ws = {}
        for n in ("qkv", "o", "up", "down"):
            q = find(f"trunk{i}_{n}_w_", "_quantized").astype(np.float32)
            ws[n] = (q * find(f"trunk{i}_{n}_w_", "_scale")[None, :]).T  # [out, in]
        for j, n in enumerate("qkv"):
            out[f"encoder.layer.{i}.{BASE_NAMES[n]}.weight"] = ws["qkv"][j * HIDDEN : (j + 1) * HIDDEN]
        for n in ("o", "up", "down"):
            out[f"encoder.layer.{i}.{BASE_NAMES[n]}.weight"] = ws[n]
    return out


def _bias(inits: dict[str, np.ndarray], weight_hint: str) -> np.ndarray:
    (key,) = [k for k in inits if k.startswith(weight_hint.replace("_w", "_b") + "_") and "quantized" not in k]
    return inits[key]


def _masked_mean(b: Builder, x: str, maskf: str) -> str:
    g = b.g
    m3 = g.op("Unsqueeze", [maskf, g.const(_i64(2), "ax2")], "m3")
    s = g.op("ReduceSum", [g.op("Mul", [x, m3], "pool"), g.const(_i64(1), "ax1")], "pool", keepdims=0)
    c = g.op("ReduceSum", [m3, g.const(_i64(1), "ax1")], "cnt", keepdims=0)
    return g.op("Div", [s, c], "mean")


def _branches(
    b: Builder, x: str, bias: str, branches: list[BranchWeights], outputs: list[onnx.ValueInfoProto], maskf: str
) -> None:
    g = b.g
    trunk_mean = _masked_mean(b, x, maskf) if any(br.with_trunk_mean for br in branches) else None
    # First layer of every branch reads the trunk output: fuse all their projections of the full
    # sequence (Q/K/V for token-level branches, K/V only for pooled ones) into one MatMul.
    mats: list[tuple[np.ndarray, np.ndarray]] = []
    for br in branches:
        lw = br.layers[0]
        names = "kv" if (br.pooled and len(br.layers) == 1) else "qkv"
        mats += [(lw[f"{n}.weight"], lw[f"{n}.bias"]) for n in names]
    projected = iter(b.projections(x, mats, "branch_qkv"))
    cls = g.op("Slice", [x, g.const(_i64(0), "z"), g.const(_i64(1), "o"), g.const(_i64(1), "a1")], "cls")
    for br in branches:
        h = x
        for li, lw in enumerate(br.layers):
            hint = f"{br.name}{li}"
            last_pooled = br.pooled and li == len(br.layers) - 1
            if li == 0:
                q = None if last_pooled else next(projected)
                k, v = next(projected), next(projected)
            else:
                if last_pooled:
                    k, v = b.projections(h, [(lw[f"{n}.weight"], lw[f"{n}.bias"]) for n in "kv"], f"{hint}_kv")
                else:
                    q, k, v = b.projections(h, [(lw[f"{n}.weight"], lw[f"{n}.bias"]) for n in "qkv"], f"{hint}_qkv")
            if last_pooled:
                query_in = (
                    cls
                    if li == 0
                    else g.op("Slice", [h, g.const(_i64(0), "z"), g.const(_i64(1), "o"), g.const(_i64(1), "a1")], "cls")
                )
                q = b.linear(query_in, lw["q.weight"], lw["q.bias"], f"{hint}_q")
                h = b.finish_layer(query_in, b.attention(q, k, v, bias), lw, hint)
                h = g.op("Squeeze", [h, g.const(_i64(1), "a1")], "pooled")
            else:
                h = b.finish_layer(h, b.attention(q, k, v, bias), lw, hint)
        if br.with_trunk_mean:
            h = g.op("Concat", [h, trunk_mean], "feat", axis=-1)
        logits = b.linear(h, br.head_w, br.head_b, f"{br.name}_head")
        out = f"{br.name}_probs"
        if br.activation == "softmax":
            g.nodes.append(helper.make_node("Softmax", [logits], [out], axis=-1))
        else:
            g.nodes.append(helper.make_node("Sigmoid", [logits], [out]))
        shape = ["batch", "seq", br.head_w.shape[0]] if not br.pooled else ["batch", br.head_w.shape[0]]
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))


def quantize_int8(src: str, dst: str) -> None:
    """Dynamic int8: MatMul weights in 7 bits per output channel, the embedding table in 8.

    Activations are quantized per run to uint8. MatMul weights use 7 bits (`reduce_range`) so that
    every kernel onnxruntime's MLAS may pick computes the same integer sums: on CPUs without VNNI
    (AVX2, AVX-512BW) the u8 x s8 kernel adds pairs of products in saturating 16-bit lanes
    (vpmaddubsw), which 8-bit weights can overflow (2 x 255 x 127 > 32767) and 7-bit weights cannot
    (2 x 255 x 64 < 32767); VNNI and AMX kernels sum in 32 bits. With 8-bit weights a domain
    probability differed by 0.22 between an AVX2 and an AVX-512 VNNI machine; with 7 bits the
    outputs are bit-identical (model card, "Same answer on every CPU"). The embedding table is
    only gathered and dequantized element by element (no sums), so it keeps 8 bits.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        table = str(Path(tmp) / "table.onnx")
        quantize_dynamic(src, table, weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"])
        quantize_dynamic(
            table,
            dst,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            op_types_to_quantize=["MatMul"],
            # DefaultTensorType: shape inference cannot type the outputs of already-int8 nodes
            # (a graph with new float layers, `add_embedding_outputs`)
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
