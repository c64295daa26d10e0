#!/usr/bin/env python3
"""Reference embeddings for crates/cascade-encoders/tests/mpnet.rs.

An independent NumPy forward pass of all-mpnet-base-v2, written from the
Hugging Face reference (`transformers`' modeling_mpnet.py) rather than from
our Rust code: float32 weights and activations, float64 softmax and norms
(layer norms, mean pooling and the final L2 normalisation).

What the test relies on and this reproduces:

* tokens: `tokenizer.json` through the `tokenizers` package, with the file's
  own truncation and padding switched off, `<s> … </s>` wrapping, the body
  cut so that the whole fits in `max_len` = 128 tokens; one batch padded with
  `<pad>` to its longest row (21 tokens here);
* RoBERTa-style absolute positions: `padding_idx + cumsum(mask) * mask`
  (padding_idx = 1), so real tokens start at position 2 and padding sits at 1;
* relative-position buckets (32, max distance 128, computed in float32 like
  torch) added to every layer's attention scores, from one shared
  `encoder.relative_attention_bias` table;
* post-norm layers: attention -> o -> LayerNorm(+residual), then dense ->
  exact (erf) GELU -> dense -> LayerNorm(+residual); eps from config.json;
* sentence-transformers pooling: masked mean of the last hidden states,
  normalised to unit length.

It prints the constants `REFERENCE` (first six dimensions of each embedding)
and `COSINES` (pairs (0, 1), (0, 2), (1, 3)) to paste into the test, which
compares them with tolerances 5e-4 and 2e-3.

Usage:
    python3 scripts/reference/mpnet_reference.py [models/all-mpnet-base-v2]
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "models" / "all-mpnet-base-v2"

# The test's TEXTS, in order.
TEXTS = [
    "I love this movie",
    "I hate this movie",
    "The weather is nice today",
    "When my best friend moved abroad without saying goodbye, I felt deeply hurt and lonely for weeks.",
]
MAX_LEN = 128
DIMS = 6
PAIRS = [(0, 1), (0, 2), (1, 3)]
RELATIVE_MAX_DISTANCE = 128


class MPNet:
    def __init__(self, model_dir):
        model_dir = Path(model_dir)
        self.config = json.loads((model_dir / "config.json").read_text())
        weights = load_file(str(model_dir / "model.safetensors"))
        # Sentence-transformers checkpoints have no "mpnet." prefix; a plain
        # MPNetModel/MPNetForMaskedLM one has.
        self.w = {
            (k[len("mpnet."):] if k.startswith("mpnet.") else k): v.astype(np.float32)
            for k, v in weights.items()
            if not k.startswith("lm_head.")
        }
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.cls, self.sep = self.tokenizer.encode("", add_special_tokens=True).ids
        self.pad = self.config.get("pad_token_id", 1)
        self.eps = self.config.get("layer_norm_eps", 1e-5)

    # --- tokenisation -----------------------------------------------------

    def token_ids(self, text):
        body = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.cls] + body[: MAX_LEN - 2] + [self.sep]

    def batch(self, texts):
        rows = [self.token_ids(t) for t in texts]
        seq = max(len(r) for r in rows)
        ids = np.full((len(rows), seq), self.pad, dtype=np.int64)
        mask = np.zeros((len(rows), seq), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    # --- building blocks ------------------------------------------------

    def linear(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def layer_norm(self, x, name):
        x = x.astype(np.float64)
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        y = (x - mean) / np.sqrt(var + self.eps)
        y = y * self.w[name + ".weight"].astype(np.float64) + self.w[name + ".bias"].astype(np.float64)
        return y.astype(np.float32)

    @staticmethod
    def gelu(x):
        # Exact GELU, x * Φ(x), as torch's default ("gelu" in config.json).
        erf = np.frompyfunc(math.erf, 1, 1)
        x64 = x.astype(np.float64)
        return (0.5 * x64 * (1.0 + erf(x64 / math.sqrt(2.0)).astype(np.float64))).astype(np.float32)

    @staticmethod
    def relative_position_bucket(relative_position, num_buckets, max_distance):
        # modeling_mpnet.MPNetEncoder.relative_position_bucket, in float32.
        ret = np.zeros_like(relative_position)
        n = -relative_position
        num_buckets //= 2
        ret += (n < 0).astype(np.int64) * num_buckets
        n = np.abs(n)
        max_exact = num_buckets // 2
        is_small = n < max_exact
        # Only n >= max_exact uses the log; keep log(0) out of the way.
        ratio = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
            math.log(max_distance / max_exact)
        )
        large = max_exact + (ratio * np.float32(num_buckets - max_exact)).astype(np.int64)
        large = np.minimum(large, num_buckets - 1)
        return ret + np.where(is_small, n, large)

    def position_bias(self, seq):
        context = np.arange(seq)[:, None]
        memory = np.arange(seq)[None, :]
        buckets = self.relative_position_bucket(
            memory - context,
            self.config.get("relative_attention_num_buckets", 32),
            RELATIVE_MAX_DISTANCE,
        )
        table = self.w["encoder.relative_attention_bias.weight"]  # (buckets, heads)
        return table[buckets].transpose(2, 0, 1)[None]  # (1, heads, seq, seq)

    # --- forward --------------------------------------------------------

    def forward(self, ids, mask):
        batch, seq = ids.shape
        heads = self.config["num_attention_heads"]
        hidden = self.config["hidden_size"]
        head_dim = hidden // heads

        # MPNetEmbeddings: RoBERTa-style positions, no token types.
        positions = np.cumsum(mask, axis=1) * mask + self.pad
        x = self.w["embeddings.word_embeddings.weight"][ids] + self.w[
            "embeddings.position_embeddings.weight"
        ][positions]
        x = self.layer_norm(x, "embeddings.LayerNorm")

        bias = self.position_bias(seq).astype(np.float64)
        additive = (1.0 - mask[:, None, None, :].astype(np.float64)) * np.finfo(np.float32).min

        def split(t):
            return t.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)

        for i in range(self.config["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q = split(self.linear(x, p + "attention.attn.q"))
            k = split(self.linear(x, p + "attention.attn.k"))
            v = split(self.linear(x, p + "attention.attn.v"))
            scores = (q @ k.transpose(0, 1, 3, 2)).astype(np.float64) / math.sqrt(head_dim)
            scores = scores + bias + additive
            scores -= scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            context = probs.astype(np.float32) @ v
            context = context.transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
            attention = self.layer_norm(
                self.linear(context, p + "attention.attn.o") + x, p + "attention.LayerNorm"
            )
            inner = self.gelu(self.linear(attention, p + "intermediate.dense"))
            x = self.layer_norm(
                self.linear(inner, p + "output.dense") + attention, p + "output.LayerNorm"
            )
        return x

    def embed(self, texts):
        ids, mask = self.batch(texts)
        hidden = self.forward(ids, mask).astype(np.float64)
        m = mask[:, :, None].astype(np.float64)
        pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True), mask.sum(1)


def literal(x):
    # Five decimals, as short as Rust's float literal allows.
    r = round(float(x), 5)
    return repr(0.0 if r == 0 else r)


def main():
    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_MODEL
    model = MPNet(model_dir)
    embeddings, lengths = model.embed(TEXTS)
    print(f"// tokens per text: {lengths.tolist()} (one batch padded to {lengths.max()})")

    # The test also embeds each text alone; the reference must not care.
    for i, text in enumerate(TEXTS):
        single, _ = model.embed([text])
        gap = np.abs(single[0] - embeddings[i]).max()
        assert gap < 1e-5, f"text {i}: padding changed the reference embedding by {gap}"

    print(f"const REFERENCE: [[f32; {DIMS}]; {len(TEXTS)}] = [")
    for row in embeddings:
        print("    [" + ", ".join(literal(x) for x in row[:DIMS]) + "],")
    print("];")
    cosines = [((a, b), float(embeddings[a] @ embeddings[b])) for a, b in PAIRS]
    print(f"const COSINES: [((usize, usize), f32); {len(PAIRS)}] =")
    print("    [" + ", ".join(f"(({a}, {b}), {literal(c)})" for (a, b), c in cosines) + "];")

    print("// full precision:")
    for i, row in enumerate(embeddings):
        print(f"//   {i}: " + " ".join(f"{x:+.8f}" for x in row[:DIMS]))
    for (a, b), c in cosines:
        print(f"//   cos({a}, {b}) = {c:.8f}")


if __name__ == "__main__":
    main()
