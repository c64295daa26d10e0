#!/usr/bin/env python3
"""Reference token ids for crates/cascade-expert/tests/gemma_tokenizer.rs.

Builds a SentencePiece model (Google's `sentencepiece` library, 0.2) from the
vocabulary stored in the Gemma 3 270M GGUF and prints the ids of the test's
texts, as Rust lines to paste into `gemma_encodings_match_sentencepiece`.

The model is made from the GGUF's `tokenizer.ggml.tokens`, `.scores` and
`.token_type` (SentencePiece's own type numbers), with:

* model type BPE and byte fallback (the GGUF has the 256 `<0xAB>` byte pieces);
* the identity normaliser, no dummy prefix (`tokenizer.ggml.add_space_prefix`
  is false), no removal of extra whitespace, spaces escaped to "▁";
* the user-defined space runs re-escaped to "▁": GGUF converters store
  Gemma's "▁▁", "▁▁▁", ... pieces as plain spaces, which would never match the
  escaped text;
* `tokenizer.ggml.unknown_token_id` typed UNKNOWN (the GGUF calls it a control
  piece, and SentencePiece needs exactly one unknown piece).

Usage:
    python3 scripts/reference/gemma_tokenizer_reference.py \
        [models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf]
"""

import sys
from pathlib import Path

import sentencepiece as spm
from gguf import GGUFReader
from sentencepiece import sentencepiece_model_pb2 as model_pb2

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GGUF = ROOT / "models" / "gemma-3-270m" / "gemma-3-270m-q4_k_m.gguf"

# The texts of gemma_encodings_match_sentencepiece, in order.
TEXTS = [
    "Hello world",
    "This movie was absolutely wonderful!",
    "  two leading spaces and\ttabs\t\tinside",
    "Line one\n\nLine two\n",
    "naïve café — déjà vu 😀",
    "I didn't like it... 3/10, would NOT recommend.",
    "Review: Great acting.\nSentiment:",
    "Decide whether each movie review is positive or negative.\n\n"
    "Review: A wonderful film.\nSentiment: positive",
]

USER_DEFINED = model_pb2.ModelProto.SentencePiece.USER_DEFINED
UNKNOWN = model_pb2.ModelProto.SentencePiece.UNKNOWN


def field(reader, key):
    value = reader.fields.get(key)
    if value is None:
        raise KeyError(f"{key} not in the GGUF")
    return value.contents()


def build_processor(gguf_path):
    reader = GGUFReader(str(gguf_path))
    model = field(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"tokenizer.ggml.model is {model!r}, not SentencePiece ('llama')")
    pieces = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    unknown = field(reader, "tokenizer.ggml.unknown_token_id")
    add_space_prefix = (
        field(reader, "tokenizer.ggml.add_space_prefix")
        if "tokenizer.ggml.add_space_prefix" in reader.fields
        else True
    )
    assert len(pieces) == len(scores) == len(types)

    def optional_id(key):
        return int(field(reader, key)) if key in reader.fields else -1

    proto = model_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    trainer.unk_id = int(unknown)
    trainer.bos_id = optional_id("tokenizer.ggml.bos_token_id")
    trainer.eos_id = optional_id("tokenizer.ggml.eos_token_id")
    trainer.pad_id = optional_id("tokenizer.ggml.padding_token_id")

    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(add_space_prefix)
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True

    for i, (piece, score, kind) in enumerate(zip(pieces, scores, types)):
        kind = int(kind)
        if i == unknown:
            kind = UNKNOWN
        if kind == USER_DEFINED:
            piece = piece.replace(" ", "\u2581")
        entry = proto.pieces.add()
        entry.piece = piece
        entry.score = float(score)
        entry.type = kind

    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())
    return processor


def rust_str(text):
    out = []
    for c in text:
        if c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif c in "\\\"":
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{{{ord(c):x}}}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def main():
    gguf_path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_GGUF
    sp = build_processor(gguf_path)
    print(f"// sentencepiece {spm.__version__}, vocabulary of {gguf_path.name}")
    print("    let cases: &[(&str, &[u32])] = &[")
    for text in TEXTS:
        ids = sp.encode(text, out_type=int)
        if sp.decode(ids) != text:
            raise AssertionError(f"{text!r} does not decode back: {sp.decode(ids)!r}")
        print(f"        ({rust_str(text)}, &[{', '.join(map(str, ids))}]),")
    print("    ];")
    # space_runs_are_one_user_defined_piece: "  x" starts with piece 138.
    first = sp.encode("  x", out_type=int)[0]
    print(f'// encode("  x")[0] = {first}, piece {first} = {sp.id_to_piece(first)!r}')


if __name__ == "__main__":
    main()
