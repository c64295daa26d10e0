//! Hashed word n-gram TF-IDF features computed one text at a time.
//!
//! Tokens follow scikit-learn's default pattern (`\b\w\w+\b`, lower-cased).
//! Unigrams and bigrams are hashed into a fixed number of buckets, term
//! frequencies are sublinear (`1 + ln tf`), and IDF comes from the document
//! frequencies of the texts observed so far, so no statistic looks ahead.

/// A sparse, L2-normalised feature vector: (bucket, value), buckets ascending and distinct.
pub type SparseVector = Vec<(u32, f32)>;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HashedTfidf {
    mask: u64,
    max_ngram: usize,
    doc_freq: Vec<u32>,
    docs: u64,
    frozen: bool,
}

impl HashedTfidf {
    /// `buckets` must be a power of two; `max_ngram` is 1 (unigrams) or 2 (plus bigrams).
    pub fn new(buckets: usize, max_ngram: usize) -> Self {
        assert!(buckets.is_power_of_two(), "buckets must be a power of two");
        assert!((1..=2).contains(&max_ngram), "max_ngram must be 1 or 2");
        Self {
            mask: buckets as u64 - 1,
            max_ngram,
            doc_freq: vec![0; buckets],
            docs: 0,
            frozen: false,
        }
    }

    pub fn buckets(&self) -> usize {
        self.doc_freq.len()
    }

    /// Same hashing space and n-grams: a checkpoint of one fits the other.
    pub fn same_shape(&self, other: &Self) -> bool {
        (self.mask, self.max_ngram, self.doc_freq.len())
            == (other.mask, other.max_ngram, other.doc_freq.len())
    }

    /// Counts the text's distinct buckets towards the document frequencies.
    /// Does nothing once the statistics were prefit.
    pub fn observe(&mut self, text: &str) {
        if self.frozen {
            return;
        }
        self.count_document(text);
    }

    /// Fits document frequencies on a whole corpus and freezes them (look-ahead;
    /// only for comparing with the authors' `TfidfVectorizer().fit(stream)`).
    pub fn prefit(&mut self, corpus: &[&str]) {
        self.doc_freq.iter_mut().for_each(|df| *df = 0);
        self.docs = 0;
        for text in corpus {
            self.count_document(text);
        }
        self.frozen = true;
    }

    fn count_document(&mut self, text: &str) {
        let mut buckets = self.bucket_counts(text);
        buckets.dedup_by_key(|(bucket, _)| *bucket);
        for (bucket, _) in buckets {
            self.doc_freq[bucket as usize] += 1;
        }
        self.docs += 1;
    }

    /// The text's TF-IDF vector under the current statistics.
    pub fn transform(&self, text: &str) -> SparseVector {
        let docs = self.docs as f32;
        let mut features: SparseVector = self
            .bucket_counts(text)
            .into_iter()
            .map(|(bucket, count)| {
                let df = self.doc_freq[bucket as usize] as f32;
                // scikit-learn's smoothed IDF: ln((1 + n) / (1 + df)) + 1.
                let idf = ((1.0 + docs) / (1.0 + df)).ln() + 1.0;
                let tf = 1.0 + (count as f32).ln();
                (bucket, tf * idf)
            })
            .collect();
        let norm = features.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            features.iter_mut().for_each(|(_, v)| *v /= norm);
        }
        features
    }

    /// Sorted (bucket, count) pairs of the text's n-grams.
    fn bucket_counts(&self, text: &str) -> Vec<(u32, u32)> {
        let mut hashes: Vec<u32> = Vec::with_capacity(text.len() / 3);
        let mut previous: Option<u64> = None;
        for token in tokens(text) {
            hashes.push(self.bucket(token));
            if self.max_ngram == 2 {
                if let Some(prev) = previous {
                    // Mixing the pair keeps "a b" and "b a" apart.
                    hashes.push(self.bucket(prev.rotate_left(17) ^ token ^ BIGRAM_SALT));
                }
                previous = Some(token);
            }
        }
        hashes.sort_unstable();
        let mut counts: Vec<(u32, u32)> = Vec::with_capacity(hashes.len());
        for bucket in hashes {
            match counts.last_mut() {
                Some((last, count)) if *last == bucket => *count += 1,
                _ => counts.push((bucket, 1)),
            }
        }
        counts
    }

    fn bucket(&self, hash: u64) -> u32 {
        (splitmix64(hash) & self.mask) as u32
    }
}

const BIGRAM_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// Hashes of the lower-cased tokens of at least two word characters.
fn tokens(text: &str) -> impl Iterator<Item = u64> + '_ {
    let mut chars = text.chars().peekable();
    std::iter::from_fn(move || loop {
        // Skip to the start of a token.
        while chars.peek().is_some_and(|c| !is_word_char(*c)) {
            chars.next();
        }
        chars.peek()?;
        let mut hash = FNV_OFFSET;
        let mut len = 0;
        while let Some(c) = chars.next_if(|c| is_word_char(*c)) {
            for lower in c.to_lowercase() {
                let mut buf = [0u8; 4];
                for byte in lower.encode_utf8(&mut buf).bytes() {
                    hash = (hash ^ byte as u64).wrapping_mul(FNV_PRIME);
                }
            }
            len += 1;
        }
        if len >= 2 {
            return Some(hash);
        }
    })
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_count(text: &str) -> usize {
        tokens(text).count()
    }

    #[test]
    fn tokens_follow_sklearn_default_pattern() {
        // Single characters and punctuation are not tokens.
        assert_eq!(token_count("a I ! ok, fine_day 42"), 3);
        assert_eq!(token_count(""), 0);
        // Case does not matter.
        let a: Vec<u64> = tokens("Movie").collect();
        let b: Vec<u64> = tokens("mOVIE").collect();
        assert_eq!(a, b);
        // Non-ASCII letters are word characters.
        assert_eq!(token_count("déjà vu"), 2);
    }

    #[test]
    fn vectors_are_l2_normalised_and_sorted() {
        let mut f = HashedTfidf::new(1 << 16, 2);
        f.observe("the movie was good");
        f.observe("the movie was bad bad bad");
        let v = f.transform("the movie was bad bad bad");
        let norm: f32 = v.iter().map(|(_, x)| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        assert!(v.windows(2).all(|w| w[0].0 < w[1].0));
        // 6 unigram tokens (4 distinct) and 5 bigrams (4 distinct).
        assert_eq!(v.len(), 8);
        assert!(f.transform("! ?").is_empty());
    }

    #[test]
    fn rare_terms_weigh_more_than_common_ones() {
        let mut f = HashedTfidf::new(1 << 16, 1);
        for _ in 0..10 {
            f.observe("common words here");
        }
        f.observe("common rare");
        let v = f.transform("common rare");
        let weight = |word: &str| {
            let bucket = f.bucket(tokens(word).next().unwrap());
            v.iter().find(|(b, _)| *b == bucket).unwrap().1
        };
        assert!(weight("rare") > 2.0 * weight("common"));
    }

    #[test]
    fn sublinear_tf_dampens_repetition() {
        let f = HashedTfidf::new(1 << 16, 1);
        let v = f.transform("great great great great boring");
        let (mut hi, mut lo) = (0.0f32, f32::MAX);
        for (_, x) in &v {
            hi = hi.max(*x);
            lo = lo.min(*x);
        }
        // 1 + ln 4 ≈ 2.39, not 4.
        assert!((hi / lo - (1.0 + 4f32.ln())).abs() < 1e-4);
    }

    #[test]
    fn prefit_freezes_the_statistics() {
        let mut f = HashedTfidf::new(1 << 12, 2);
        f.prefit(&["a first text", "a second text"]);
        let before = f.transform("first text");
        f.observe("first first first");
        assert_eq!(before, f.transform("first text"));
    }
}
