#!/usr/bin/env python3
"""ONNX Runtime's frozen-encoder throughput, fp32 and dynamic int8, on the
same model, texts, tokens and batching as `cascade bench-embed`.

The peer users pick for CPU embeddings (fastembed, TEI's CPU path) is ONNX
Runtime, usually with int8 dynamic quantization. The Hugging Face hub is out
of reach here and torch is not needed: the ONNX graph is written directly
from the model folder's safetensors (BERT or MPNet, the first `--layers`
layers), then `onnxruntime.quantization.quantize_dynamic` makes its int8
twin. Texts: the first `--texts` of the dataset's test stream, tokenised with
`tokenizer.json`, cut to `--max-len`, sorted by length and run in batches of
32 padded to their longest row, as `cascade bench-embed` does. Embedding:
masked mean of the last computed layer, L2-normalised.

Not a dependency of the project. Set up once (Python 3.11):

    python3 -m venv /tmp/ortenv
    /tmp/ortenv/bin/pip install numpy==2.4.6 safetensors==0.8.0 tokenizers==0.23.3 \\
        zstandard==0.25.0 onnx==1.23.2 onnxruntime==1.32.0

Run (2 threads, 3 alternating rounds, medians):

    /tmp/ortenv/bin/python scripts/bench/onnxruntime_embed.py \\
        --model models/all-minilm-l6-v2 --max-len 256
    /tmp/ortenv/bin/python scripts/bench/onnxruntime_embed.py \\
        --model models/all-mpnet-base-v2 --max-len 384 --layers 8

`--compare FILE` reads the f32 embeddings `cascade bench-embed --save FILE`
wrote for the same texts and prints their cosine with ONNX Runtime's fp32
ones: a check that both run the same model.
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import zstandard
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from safetensors.numpy import load_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "reference"))
from mpnet_reference import RELATIVE_MAX_DISTANCE, MPNet  # noqa: E402

BATCH = 32


def load_texts(data, count):
    data = Path(data)
    raw = zstandard.ZstdDecompressor().stream_reader(open(data / "stream.jsonl.zst", "rb")).read()
    by_id = {}
    for line in raw.decode("utf-8").split("\n"):
        if line.strip():
            item = json.loads(line)
            by_id[int(item["id"])] = item["text"]
    ids = [int(l) for l in (data / "split_test_ids.txt").read_text().split() if l.strip()]
    return [by_id[i] for i in ids[:count]]


class Model:
    def __init__(self, model_dir, layers):
        model_dir = Path(model_dir)
        self.config = json.loads((model_dir / "config.json").read_text())
        self.mpnet = self.config.get("model_type") == "mpnet"
        weights = load_file(str(model_dir / "model.safetensors"))
        self.w = {}
        for k, v in weights.items():
            for prefix in ("bert.", "mpnet."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
            self.w[k] = v.astype(np.float32)
        self.layers = layers or self.config["num_hidden_layers"]
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.cls, self.sep = self.tokenizer.encode("", add_special_tokens=True).ids
        self.pad = self.config.get("pad_token_id", 0)
        self.bias_cache = {}

    def token_ids(self, text, max_len):
        body = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.cls] + body[: max_len - 2] + [self.sep]

    # --- the graph ----------------------------------------------------------

    def graph(self, path):
        c = self.config
        h, heads = c["hidden_size"], c["num_attention_heads"]
        eps = c.get("layer_norm_eps", 1e-12)
        nodes, inits = [], []
        counter = [0]

        def name(base):
            counter[0] += 1
            return f"{base}_{counter[0]}"

        def const(array, base="c"):
            n = name(base)
            inits.append(numpy_helper.from_array(np.asarray(array), n))
            return n

        def op(kind, inputs, **attrs):
            out = name(kind.lower())
            nodes.append(helper.make_node(kind, inputs, [out], **attrs))
            return out

        def linear(x, prefix):
            # MatMul with a constant (in, out) weight: what quantize_dynamic quantizes.
            w = const(np.ascontiguousarray(self.w[prefix + ".weight"].T), "w")
            return op("Add", [op("MatMul", [x, w]), const(self.w[prefix + ".bias"], "b")])

        def norm(x, prefix):
            return op(
                "LayerNormalization",
                [x, const(self.w[prefix + ".weight"]), const(self.w[prefix + ".bias"])],
                axis=-1,
                epsilon=eps,
            )

        words = op("Gather", [const(self.w["embeddings.word_embeddings.weight"]), "input_ids"])
        positions = op(
            "Gather", [const(self.w["embeddings.position_embeddings.weight"]), "position_ids"]
        )
        x = op("Add", [words, positions])
        if not self.mpnet:
            x = op("Add", [x, const(self.w["embeddings.token_type_embeddings.weight"][0])])
        x = norm(x, "embeddings.LayerNorm")
        head_shape = const(np.array([0, 0, heads, h // heads], dtype=np.int64))
        merged_shape = const(np.array([0, 0, h], dtype=np.int64))
        scale = const(np.array(1.0 / math.sqrt(h // heads), dtype=np.float32))
        names = (
            ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "attention.LayerNorm")
            if self.mpnet
            else (
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "attention.output.LayerNorm",
            )
        )
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q = op("Transpose", [op("Reshape", [linear(x, p + names[0]), head_shape])], perm=[0, 2, 1, 3])
            k = op("Transpose", [op("Reshape", [linear(x, p + names[1]), head_shape])], perm=[0, 2, 3, 1])
            v = op("Transpose", [op("Reshape", [linear(x, p + names[2]), head_shape])], perm=[0, 2, 1, 3])
            scores = op("Add", [op("Mul", [op("MatMul", [q, k]), scale]), "mask_bias"])
            if self.mpnet:
                scores = op("Add", [scores, "position_bias"])
            context = op("MatMul", [op("Softmax", [scores], axis=-1), v])
            context = op("Reshape", [op("Transpose", [context], perm=[0, 2, 1, 3]), merged_shape])
            attended = norm(op("Add", [linear(context, p + names[3]), x]), p + names[4])
            inner = linear(attended, p + "intermediate.dense")
            # Exact GELU: 0.5 · x · (1 + erf(x / √2)).
            erf = op("Erf", [op("Div", [inner, const(np.array(math.sqrt(2.0), dtype=np.float32))])])
            gelu = op(
                "Mul",
                [op("Mul", [inner, const(np.array(0.5, dtype=np.float32))]), op("Add", [erf, const(np.array(1.0, dtype=np.float32))])],
            )
            x = norm(op("Add", [linear(gelu, p + "output.dense"), attended]), p + "output.LayerNorm")
        nodes[-1].output[0] = "hidden"
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["seq"]),
            helper.make_tensor_value_info("mask_bias", TensorProto.FLOAT, ["batch", 1, 1, "seq"]),
        ]
        if self.mpnet:
            inputs.append(helper.make_tensor_value_info("position_bias", TensorProto.FLOAT, [1, heads, "seq", "seq"]))
        outputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", h])]
        model = helper.make_model(
            helper.make_graph(nodes, "encoder", inputs, outputs, inits),
            opset_imports=[helper.make_opsetid("", 17)],
        )
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")

    # --- feeds ----------------------------------------------------------------

    def position_bias(self, seq):
        # modeling_mpnet's relative buckets, from the reference script.
        if seq not in self.bias_cache:
            positions = np.arange(seq)
            buckets = MPNet.relative_position_bucket(
                positions[None, :] - positions[:, None],
                self.config.get("relative_attention_num_buckets", 32),
                RELATIVE_MAX_DISTANCE,
            )
            table = self.w["encoder.relative_attention_bias.weight"]
            bias = table[buckets].transpose(2, 0, 1)[None]
            self.bias_cache[seq] = np.ascontiguousarray(bias.astype(np.float32))
        return self.bias_cache[seq]

    def feeds(self, rows):
        seq = max(len(r) for r in rows)
        ids = np.full((len(rows), seq), self.pad, dtype=np.int64)
        mask = np.zeros((len(rows), seq), dtype=np.float32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1.0
        # MPNet's positions start after the padding index (RoBERTa style).
        offset = self.pad + 1 if self.mpnet else 0
        feed = {
            "input_ids": ids,
            "position_ids": np.arange(offset, offset + seq, dtype=np.int64),
            "mask_bias": ((1.0 - mask) * -1e9)[:, None, None, :].astype(np.float32),
        }
        if self.mpnet:
            feed["position_bias"] = self.position_bias(seq)
        return feed, mask


def embed(session, model, batches):
    out = []
    for rows, index in batches:
        feed, mask = model.feeds(rows)
        hidden = session.run(["hidden"], feed)[0]
        pooled = (hidden * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        out.extend(zip(index, pooled))
    out.sort(key=lambda p: p[0])
    return np.stack([e for _, e in out])


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "all-minilm-l6-v2"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imdb"))
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=0, help="run the first N layers (0: all)")
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-channel", action="store_true", help="int8 weights per output channel")
    parser.add_argument(
        "--all-ops", action="store_true", help="quantize what ORT does by default (embedding Gathers, every MatMul)"
    )
    parser.add_argument("--compare", help="f32 embeddings written by `cascade bench-embed --save`")
    args = parser.parse_args()

    model = Model(args.model, args.layers)
    texts = load_texts(args.data, args.texts)
    rows = [model.token_ids(t, args.max_len) for t in texts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batches = [
        ([rows[i] for i in order[s : s + BATCH]], order[s : s + BATCH]) for s in range(0, len(order), BATCH)
    ]

    work = Path(tempfile.mkdtemp(prefix="ort-embed-"))
    fp32_path, int8_path = work / "fp32.onnx", work / "int8.onnx"
    model.graph(fp32_path)
    quantize_dynamic(
        str(fp32_path),
        str(int8_path),
        weight_type=QuantType.QInt8,
        per_channel=args.per_channel,
        use_external_data_format=True,
        # Dense layers only, as ours: MatMuls with a constant weight. ORT's
        # default also quantizes the embedding Gathers (per tensor) and the
        # activation x activation MatMuls, which left MPNet's embeddings at
        # cosine 0.13 of fp32.
        op_types_to_quantize=None if args.all_ops else ["MatMul"],
        extra_options={"MatMulConstBOnly": not args.all_ops},
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in (("fp32", fp32_path), ("int8", int8_path))
    }
    cpu = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        "unknown CPU",
    )
    print(
        f"onnxruntime {ort.__version__} · {cpu} · {args.threads} threads · {len(texts)} texts · "
        f"max_len {args.max_len} · layers {model.layers} · int8 per_channel={args.per_channel} "
        f"all_ops={args.all_ops}"
    )
    print(f"{'scheme':<6} {'round':>5} {'texts/s':>9} {'seconds':>8}")
    rates = {name: [] for name in sessions}
    last = {}
    embed(sessions["fp32"], model, batches[:1])  # warm-up: first-run allocations
    embed(sessions["int8"], model, batches[:1])
    for r in range(1, args.rounds + 1):
        for name, session in sessions.items():
            start = time.perf_counter()
            last[name] = embed(session, model, batches)
            seconds = time.perf_counter() - start
            rates[name].append(len(texts) / seconds)
            print(f"{name:<6} {r:>5} {len(texts) / seconds:>9.2f} {seconds:>8.2f}")
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"median texts/s: fp32 {med['fp32']:.2f}, int8 {med['int8']:.2f}, int8/fp32 {med['int8'] / med['fp32']:.2f}x")
    c = cosines(last["fp32"], last["int8"])
    print(f"cosine(int8, fp32) over {len(c)} texts: mean {c.mean():.5f}, min {c.min():.5f}")
    if args.compare:
        ours = np.fromfile(args.compare, dtype="<f4").reshape(len(texts), -1)
        c = cosines(ours, last["fp32"])
        print(f"cosine(ours f32, onnxruntime fp32): mean {c.mean():.6f}, min {c.min():.6f}")


if __name__ == "__main__":
    main()
