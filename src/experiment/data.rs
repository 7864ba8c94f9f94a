//! The experiment's data: seeded pseudo-word lines, their pairs, the training documents (test
//! pairs one way, bridge pairs both ways), the shuffled corpus and the queries of each probe.

use serde::Serialize;

use crate::rng::Rng;

/// One pair of lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pair {
    pub first: String,
    pub second: String,
}

const SYLLABLES: &[&str] = &[
    "ba", "ko", "ri", "mu", "te", "sa", "no", "li", "da", "pe", "vo", "gi", "fu", "ne", "ta", "zo",
    "ka", "mi", "ro", "su",
];

/// A seeded vocabulary of two-syllable pseudo-words.
pub fn words(seed: u64, n: usize) -> Vec<String> {
    let mut rng = Rng::new(seed ^ 0x0005_07D5);
    let mut set = std::collections::BTreeSet::new();
    while set.len() < n {
        set.insert(format!(
            "{}{}",
            SYLLABLES[rng.below(SYLLABLES.len())],
            SYLLABLES[rng.below(SYLLABLES.len())]
        ));
    }
    let mut v: Vec<String> = set.into_iter().collect();
    let perm = rng.permutation(v.len());
    v = perm.into_iter().map(|i| v[i].clone()).collect();
    v
}

/// `n` pairs of distinct lines (no line is reused anywhere), seeded.
pub fn make_pairs(n: usize, words_per_line: usize, seed: u64) -> Vec<Pair> {
    let vocab = words(seed, 120);
    let mut rng = Rng::new(seed);
    let mut used = std::collections::HashSet::new();
    let mut line = |rng: &mut Rng| loop {
        let l: Vec<&str> = (0..words_per_line)
            .map(|_| vocab[rng.below(vocab.len())].as_str())
            .collect();
        let s = l.join(" ");
        if used.insert(s.clone()) {
            return s;
        }
    };
    (0..n)
        .map(|_| Pair {
            first: line(&mut rng),
            second: line(&mut rng),
        })
        .collect()
}

/// The training documents: test pairs forward only; bridge pairs both ways.
pub fn documents(test: &[Pair], bridge: &[Pair]) -> Vec<String> {
    let mut docs: Vec<String> = test
        .iter()
        .map(|p| format!("{} ; {} .", p.first, p.second))
        .collect();
    for p in bridge {
        docs.push(format!("{} ; {} .", p.first, p.second));
        docs.push(format!("{} : {} .", p.second, p.first));
    }
    docs
}

/// How a model is asked about a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `A ;` → ` B .`: the training template, continued.
    Forward,
    /// `B :` → ` A .`: the reversed template (taught by the bridge pairs), continued. The only way
    /// a left-to-right model can be asked.
    ReversalPrompt,
    /// `[masks] ; B .` → `A`: the training template with the first line masked, filled using the
    /// context on its right. What a bidirectional mask predictor makes possible.
    ReversalInfill,
}

/// How many times the corpus lists the documents, each time in a new order.
pub const CORPUS_COPIES: usize = 8;

/// `copies` seeded permutations of `docs`, one after the other. Pretraining reads windows of a
/// packed stream, so a document that straddles a window boundary in one copy sits whole in
/// another, and every document is seen next to different neighbours.
pub fn shuffled_copies(docs: &[String], copies: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed ^ 0xC0_91E5);
    (0..copies)
        .flat_map(|_| rng.permutation(docs.len()))
        .map(|i| docs[i].clone())
        .collect()
}

/// A query: the text before the answer, the expected answer and the text after it.
pub fn query(p: &Pair, probe: Probe) -> (String, String, String) {
    match probe {
        Probe::Forward => (
            format!("{} ;", p.first),
            format!(" {} .", p.second),
            String::new(),
        ),
        Probe::ReversalPrompt => (
            format!("{} :", p.second),
            format!(" {} .", p.first),
            String::new(),
        ),
        Probe::ReversalInfill => (String::new(), p.first.clone(), format!(" ; {} .", p.second)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn pairs_are_seeded_distinct_and_shaped() {
        let a = make_pairs(60, 2, 7);
        assert_eq!(a, make_pairs(60, 2, 7));
        assert_ne!(a, make_pairs(60, 2, 8));
        let lines: Vec<&String> = a.iter().flat_map(|p| [&p.first, &p.second]).collect();
        let set: HashSet<&&String> = lines.iter().collect();
        assert_eq!(set.len(), 120, "a line is reused");
        for l in lines {
            assert_eq!(l.split(' ').count(), 2, "{l}");
            assert!(!l.contains(';') && !l.contains(':') && !l.contains('.'));
        }
    }

    #[test]
    fn test_pairs_are_shown_one_way_bridge_pairs_both() {
        let all = make_pairs(20, 3, 1);
        let (test, bridge) = all.split_at(10);
        let docs = documents(test, bridge);
        assert_eq!(docs.len(), 10 + 2 * 10);
        // the corpus: every document once per copy, in seeded orders that differ between copies
        let stream = shuffled_copies(&docs, 3, 5);
        assert_eq!(stream, shuffled_copies(&docs, 3, 5));
        assert_ne!(stream[..30], stream[30..60]);
        for d in &docs {
            assert_eq!(stream.iter().filter(|x| *x == d).count(), 3);
        }
        let text = docs.join("\n");
        for p in test {
            assert_eq!(
                text.matches(&format!("{} ; {} .", p.first, p.second))
                    .count(),
                1
            );
            // the reversed statement, in either template, never appears
            assert!(!text.contains(&format!("{} : {}", p.second, p.first)));
            assert!(!text.contains(&format!("{} ; {}", p.second, p.first)));
        }
        for p in bridge {
            assert!(docs.contains(&format!("{} ; {} .", p.first, p.second)));
            assert!(docs.contains(&format!("{} : {} .", p.second, p.first)));
        }
        // queries use the training templates; the answer is the other line
        let (q, a, rest) = query(&test[0], Probe::Forward);
        assert_eq!(
            q + &a + &rest,
            format!("{} ; {} .", test[0].first, test[0].second)
        );
        let (q, a, rest) = query(&test[0], Probe::ReversalPrompt);
        assert_eq!(
            q + &a + &rest,
            format!("{} : {} .", test[0].second, test[0].first)
        );
        let (q, a, rest) = query(&test[0], Probe::ReversalInfill);
        assert_eq!(a, test[0].first);
        assert_eq!(
            q + &a + &rest,
            format!("{} ; {} .", test[0].first, test[0].second)
        );
    }
}
