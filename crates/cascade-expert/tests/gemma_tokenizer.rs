//! The SentencePiece encoder on the real Gemma 3 270M GGUF (`scripts/setup.sh`
//! fetches it) against Google's `sentencepiece` library: the ids below come
//! from `SentencePieceProcessor` built from this GGUF's pieces, scores and
//! types (BPE, byte fallback, identity normaliser, no dummy prefix, the
//! user-defined space runs re-escaped to "▁", the unknown piece marked
//! unknown), sentencepiece 0.2; `scripts/reference/gemma_tokenizer_reference.py`
//! prints them (its README pins the environment).

use std::path::Path;

use cascade_expert::sentencepiece::SentencePiece;

fn gemma() -> SentencePiece {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf");
    let mut file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/setup.sh", path.display()));
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    SentencePiece::from_gguf(&content.metadata).unwrap()
}

#[test]
fn gemma_encodings_match_sentencepiece() {
    let sp = gemma();
    let cases: &[(&str, &[u32])] = &[
        ("Hello world", &[9259, 1902]),
        ("This movie was absolutely wonderful!", &[2094, 6387, 691, 11087, 10455, 236888]),
        ("  two leading spaces and\ttabs\t\tinside", &[138, 13498, 5830, 9952, 532, 255968, 39218, 255969, 49431]),
        ("Line one\n\nLine two\n", &[4539, 886, 108, 4539, 1156, 107]),
        ("naïve café — déjà vu 😀", &[1789, 238527, 560, 33443, 2192, 29234, 11042, 163543]),
        ("I didn't like it... 3/10, would NOT recommend.", &[236777, 3782, 236789, 236745, 1133, 625, 1390, 236743, 236800, 236786, 236770, 236771, 236764, 1093, 5244, 5840, 236761]),
        ("Review: Great acting.\nSentiment:", &[30852, 236787, 8098, 13011, 236761, 107, 203481, 236787]),
        ("Decide whether each movie review is positive or negative.\n\nReview: A wonderful film.\nSentiment: positive", &[8724, 754, 3363, 1546, 6387, 3540, 563, 4414, 653, 5676, 236761, 108, 30852, 236787, 562, 10455, 4103, 236761, 107, 203481, 236787, 4414]),
    ];
    for (text, expected) in cases {
        let ids = sp.encode(text);
        assert_eq!(&ids, expected, "{text:?}");
        assert_eq!(&sp.decode(&ids), text);
    }
}

#[test]
fn space_runs_are_one_user_defined_piece() {
    let sp = gemma();
    // Two spaces are piece 138 (stored as "  " in the GGUF), not "▁" + "▁".
    assert_eq!(sp.encode("  x")[0], 138);
    assert_eq!(sp.piece(138), Some("  "));
}
