//! The reversal-curse experiment at small scale (paper §3.3, reference §8): a diffusion model and
//! its autoregressive twin (same Transformer, causal mask, next-token loss) trained on the same
//! synthetic pairs with equal budgets, then asked for each pair's second line given the first
//! (forward) and its first line given the second (reversal). The training text shows every test
//! pair in one order only.
//!
//! Data: "lines" are short sequences of pseudo-words. A document `A ; B .` says that line B follows
//! line A. Test pairs appear only that way. Bridge pairs (disjoint lines) appear both as `A ; B .`
//! and `B : A .` (`:` reads "follows"), which teaches the reversed template. Queries use the same
//! text for both models: forward `A ;` → ` B .`, reversal `B :` → ` A .`; the diffusion model fills
//! the masked answer after the prompt, the twin writes it left to right. Reversal for the diffusion
//! model is also asked by masking the first line of the training template (`[masks] ; B .`), which
//! only a bidirectional model can fill. The corpus lists the documents several times in seeded
//! orders; both models train without weight decay (the task is memorisation).

use std::path::Path;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::config::LladaConfig;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::sampler::{self, ar, PromptBatch, SamplerConfig};
use crate::score::choice::Accuracy;
use crate::tokenizer::Tokenizer;
use crate::train::data::{self, DataKind, PrepareOptions};
use crate::train::optim::{AdamWConfig, Schedule};
use crate::train::{ObjectiveKind, TrainConfig, Trainer};

/// Settings of the experiment.
#[derive(Debug, Clone, Serialize)]
pub struct ReversalConfig {
    /// Test pairs (shown one way) and bridge pairs (shown both ways).
    pub test_pairs: usize,
    pub bridge_pairs: usize,
    pub words_per_line: usize,
    pub seed: u64,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
}

impl ReversalConfig {
    /// Finishes in under 10 minutes on 2 CPU cores.
    pub fn quick() -> Self {
        ReversalConfig {
            test_pairs: 80,
            bridge_pairs: 80,
            words_per_line: 2,
            seed: 0,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            steps: 2500,
            batch_size: 32,
            seq_len: 32,
            lr: 1e-3,
        }
    }

    /// The full run (under an hour on 2 CPU cores). Masked diffusion memorises associations
    /// later than next-token prediction (its loss drops suddenly after a few thousand steps at
    /// this size), hence the step count.
    pub fn full() -> Self {
        ReversalConfig {
            test_pairs: 150,
            bridge_pairs: 150,
            steps: 10000,
            ..Self::quick()
        }
    }
}

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

/// Accuracies of one model.
#[derive(Debug, Clone, Serialize)]
pub struct DirectionScores {
    pub forward: Accuracy,
    /// Diffusion: by infilling the first line (`[masks] ; B .`); autoregressive: by the reversed
    /// template (`B :`).
    pub reversal: Accuracy,
    /// Diffusion only: the reversed template too, continued as the twin is asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reversal_prompt: Option<Accuracy>,
}

/// The experiment's result.
#[derive(Debug, Clone, Serialize)]
pub struct ReversalReport {
    pub config: ReversalConfig,
    pub diffusion: DirectionScores,
    pub autoregressive: DirectionScores,
    pub parameters: u64,
    pub seconds: f64,
}

/// Produces `n` answer tokens between a prefix and a suffix (see [`exact_match`]).
pub type Answerer<'a> = dyn FnMut(&[u32], usize, &[u32]) -> Result<Vec<u32>> + 'a;

/// Exact-match accuracy over `pairs` for one probe, whatever produces the answers:
/// `answer(prefix, n, suffix)` returns the `n` answer tokens between `prefix` (`eos`, then the
/// query) and `suffix` (empty for continuations).
pub fn exact_match(
    tok: &Tokenizer,
    eos: u32,
    pairs: &[Pair],
    probe: Probe,
    answer: &mut Answerer,
) -> Result<Accuracy> {
    let mut correct = 0;
    for p in pairs {
        let (before, a, after) = query(p, probe);
        let mut prefix = vec![eos];
        prefix.extend(tok.encode(&before)?);
        let target = tok.encode(&a)?;
        let suffix = tok.encode(&after)?;
        let got = answer(&prefix, target.len(), &suffix)?;
        correct += usize::from(got == target);
    }
    Ok(Accuracy::of(correct, pairs.len()))
}

/// Exact-match accuracy of a model on the test pairs for one probe. The answer length is the
/// expected answer's: the diffusion model fills exactly that many masks, one per step (greedy,
/// low-confidence remasking); the twin writes that many tokens greedily.
pub fn evaluate(
    ck: &Checkpoint,
    pairs: &[Pair],
    probe: Probe,
    autoregressive: bool,
) -> Result<Accuracy> {
    let tok = ck.tokenizer()?;
    let sp = ck.special;
    if autoregressive && probe == Probe::ReversalInfill {
        return Err(Error::setting(
            "probe",
            "reversal by infilling",
            "a left-to-right model cannot fill a span before its context",
        ));
    }
    exact_match(tok, sp.eos, pairs, probe, &mut |prefix, n, suffix| {
        let mut m = ck.model.predictor();
        if autoregressive {
            let out = ar::generate_ar(
                &mut m,
                prefix,
                n,
                0.0,
                false,
                &sp,
                &mut Rng::new(0),
                &mut sampler::no_progress,
            )?;
            return Ok(out.generated_ids.into_iter().next().unwrap_or_default());
        }
        let cfg = SamplerConfig {
            gen_length: n,
            steps: n,
            // one block over the whole region (the answer and, for infilling, the suffix)
            block_length: 0,
            ..Default::default()
        };
        let mut canvas = prefix.to_vec();
        canvas.extend(std::iter::repeat_n(sp.mask, n));
        canvas.extend_from_slice(suffix);
        let out = sampler::infill(
            &mut m,
            &canvas,
            &cfg,
            &sp,
            &mut Rng::new(0),
            &mut sampler::no_progress,
        )?;
        let mut ids = out.generated_ids.into_iter().next().unwrap_or_default();
        ids.truncate(n);
        Ok(ids)
    })
}

/// Runs the whole experiment in `dir`: data, tokenizer, both models, evaluation.
/// `log(msg)` reports progress.
pub fn run(
    cfg: &ReversalConfig,
    dir: &Path,
    threads_note: &str,
    log: &mut dyn FnMut(&str),
) -> Result<ReversalReport> {
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let all = make_pairs(
        cfg.test_pairs + cfg.bridge_pairs,
        cfg.words_per_line,
        cfg.seed,
    );
    let (test, bridge) = all.split_at(cfg.test_pairs);
    let docs = documents(test, bridge);
    let corpus = dir.join("corpus.txt");
    let stream = shuffled_copies(&docs, CORPUS_COPIES, cfg.seed);
    crate::weights::atomic_write(&corpus, stream.join("\n").as_bytes())?;
    let pairs_json =
        serde_json::to_string_pretty(&serde_json::json!({"test": test, "bridge": bridge}))
            .map_err(|e| Error::Json {
                path: dir.join("pairs.json"),
                source: e,
            })?;
    crate::weights::atomic_write(&dir.join("pairs.json"), pairs_json.as_bytes())?;
    log(&format!(
        "{} test pairs (one order), {} bridge pairs (both orders), {} documents",
        test.len(),
        bridge.len(),
        docs.len()
    ));

    let tok_dir = dir.join("tokenizer");
    let ids =
        crate::train::tokenizer::train_tokenizer(std::slice::from_ref(&corpus), 512, &tok_dir)?;
    let tok = Tokenizer::open(&tok_dir)?;
    let data_dir = dir.join("data");
    data::prepare(
        &[corpus],
        &tok,
        &data_dir,
        &PrepareOptions {
            kind: DataKind::Pretrain,
            doc_per_line: true,
            val_fraction: 0.0,
            seed: cfg.seed,
            max_len: None,
        },
    )?;
    let base = LladaConfig {
        d_model: cfg.d_model,
        n_layers: cfg.n_layers,
        n_heads: cfg.n_heads,
        n_kv_heads: Some(cfg.n_heads),
        mlp_hidden_size: Some(3 * cfg.d_model),
        vocab_size: ids.vocab_size,
        embedding_size: Some(ids.vocab_size),
        mask_token_id: Some(ids.mask),
        eos_token_id: Some(ids.eos),
        pad_token_id: Some(ids.eos),
        max_sequence_length: cfg.seq_len.max(64),
        rope_theta: 10000.0,
        ..LladaConfig::default()
    };
    let mut scores = Vec::new();
    let mut parameters = 0;
    for (label, objective) in [
        ("diffusion", ObjectiveKind::Diffusion),
        ("autoregressive", ObjectiveKind::Autoregressive),
    ] {
        let model_cfg = LladaConfig {
            causal_attention: objective == ObjectiveKind::Autoregressive,
            ..base.clone()
        };
        let cfg_path = dir.join(format!("{label}-config.json"));
        let text = serde_json::to_string_pretty(&model_cfg).map_err(|e| Error::Json {
            path: cfg_path.clone(),
            source: e,
        })?;
        crate::weights::atomic_write(&cfg_path, text.as_bytes())?;
        parameters = model_cfg.resolve()?.parameter_count();
        let run_dir = dir.join(label);
        let _ = std::fs::remove_dir_all(&run_dir);
        let tc = TrainConfig {
            mode: DataKind::Pretrain,
            objective,
            model_config: Some(cfg_path),
            tokenizer: Some(tok_dir.clone()),
            data: data_dir.clone(),
            out: run_dir.clone(),
            seq_len: cfg.seq_len,
            batch_size: cfg.batch_size,
            steps: cfg.steps,
            lr: cfg.lr,
            schedule: Schedule::Wsd {
                warmup: cfg.steps / 20,
                decay_fraction: 0.2,
                min_ratio: 0.1,
            },
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 1,
            random_length_prob: 0.0,
            // memorisation: no weight decay pulling the facts out of either model
            optimizer: AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            seed: cfg.seed,
            ..TrainConfig::default()
        };
        log(&format!(
            "training the {label} model ({parameters} parameters, {} steps, {threads_note})",
            cfg.steps
        ));
        let t = std::time::Instant::now();
        let mut trainer = Trainer::new(tc, &candle_core::Device::Cpu)?;
        let mut last = 0.0;
        let ck_dir = trainer.run(&mut |r| {
            last = r.loss;
        })?;
        log(&format!(
            "  done in {:.0} s, final loss {last:.3}",
            t.elapsed().as_secs_f64()
        ));
        let ck = Checkpoint::load(&ck_dir, None, &candle_core::Device::Cpu)?;
        let ar = objective == ObjectiveKind::Autoregressive;
        let forward = evaluate(&ck, test, Probe::Forward, ar)?;
        let prompted = evaluate(&ck, test, Probe::ReversalPrompt, ar)?;
        let scores_here = if ar {
            DirectionScores {
                forward,
                reversal: prompted,
                reversal_prompt: None,
            }
        } else {
            DirectionScores {
                forward,
                reversal: evaluate(&ck, test, Probe::ReversalInfill, ar)?,
                reversal_prompt: Some(prompted),
            }
        };
        log(&format!(
            "  {label}: forward {:.1}%, reversal {:.1}%{}",
            100.0 * scores_here.forward.accuracy,
            100.0 * scores_here.reversal.accuracy,
            scores_here
                .reversal_prompt
                .as_ref()
                .map(|a| format!(" (by the reversed template: {:.1}%)", 100.0 * a.accuracy))
                .unwrap_or_default()
        ));
        scores.push(scores_here);
    }
    let autoregressive = scores
        .pop()
        .ok_or_else(|| Error::setting("experiment", "", "no result"))?;
    let diffusion = scores
        .pop()
        .ok_or_else(|| Error::setting("experiment", "", "no result"))?;
    Ok(ReversalReport {
        config: cfg.clone(),
        diffusion,
        autoregressive,
        parameters,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A bar chart of the four accuracies with their 95% intervals (PNG).
pub fn plot(r: &ReversalReport, out: &Path) -> Result<()> {
    use plotters::prelude::*;
    crate::train::plot::register_font();
    let err = |e: &dyn std::fmt::Display| Error::setting("plot", "drawing", e.to_string());
    let root = BitMapBackend::new(out, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Reversal curse: exact-match accuracy (95% CI)",
            ("sans-serif", 24),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..4.6, 0f64..1.05)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("accuracy")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    let bars = [
        (0.3, &r.diffusion.forward, BLUE, "diffusion · forward"),
        (
            1.3,
            &r.diffusion.reversal,
            RGBColor(120, 140, 255),
            "diffusion · reversal",
        ),
        (
            2.5,
            &r.autoregressive.forward,
            RED,
            "autoregressive · forward",
        ),
        (
            3.5,
            &r.autoregressive.reversal,
            RGBColor(255, 140, 140),
            "autoregressive · reversal",
        ),
    ];
    for (x, a, color, label) in bars {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x, 0.0), (x + 0.8, a.accuracy)],
                color.filled(),
            )))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x + 0.4, a.ci95.0), (x + 0.4, a.ci95.1)],
                BLACK.stroke_width(2),
            )))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{:.0}%", 100.0 * a.accuracy),
                (x + 0.2, (a.accuracy + 0.03).min(1.0)),
                ("sans-serif", 16),
            )))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(std::iter::once(Text::new(
                label.to_string(),
                (x - 0.1, -0.0),
                ("sans-serif", 13),
            )))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// One line pair of the paper's poem set (`data/poem_data.json`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Poem {
    pub first: String,
    pub second: String,
}

/// Settings of the paper's poem protocol (reference §8.2).
#[derive(Debug, Clone)]
pub struct PoemConfig {
    /// steps = gen_length = block_length (the reference's default 28).
    pub gen_length: usize,
    pub cfg_scale: f64,
    pub logits_eos_inf: bool,
}

impl Default for PoemConfig {
    fn default() -> Self {
        PoemConfig {
            gen_length: 28,
            cfg_scale: 0.0,
            logits_eos_inf: true,
        }
    }
}

/// Reads the poem set: a JSON list of `{"first", "second", "source"}`.
pub fn load_poems(path: &Path) -> Result<Vec<Poem>> {
    crate::error::read_json(path)
}

/// The paper's poem protocol: the Instruct template with one user message asking for the next
/// (forward) or previous (reversal) line, greedy generation with steps = gen_length =
/// block_length, and success iff the expected line occurs in the decoded answer.
pub fn poem_accuracy(
    ck: &Checkpoint,
    poems: &[Poem],
    reversal: bool,
    cfg: &PoemConfig,
    on_item: &mut dyn FnMut(usize, usize),
) -> Result<Accuracy> {
    let tok = ck.tokenizer()?;
    let sp = ck.special;
    let n = cfg.gen_length;
    let scfg = SamplerConfig {
        gen_length: n,
        steps: n,
        block_length: n,
        cfg_scale: cfg.cfg_scale,
        logits_eos_inf: cfg.logits_eos_inf,
        ..Default::default()
    };
    let mut correct = 0;
    for (i, p) in poems.iter().enumerate() {
        let (line, question, target) = if reversal {
            (&p.second, "的上一句是什么？", &p.first)
        } else {
            (&p.first, "的下一句是什么？", &p.second)
        };
        let prompt = format!("{line}{question} 直接输出句子即可。");
        let ids = tok.encode_chat(&[crate::chat::Message::user(prompt)])?;
        let mut m = ck.model.predictor();
        let g = sampler::generate(
            &mut m,
            &PromptBatch::single(ids),
            &scfg,
            &sp,
            &mut Rng::new(0),
            &mut sampler::no_progress,
        )?;
        let text = tok.decode(&g.generated_ids[0], true)?;
        correct += usize::from(text.contains(target.as_str()));
        on_item(i + 1, poems.len());
    }
    Ok(Accuracy::of(correct, poems.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

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

    /// The evaluation scores exact matches: an oracle that knows every pair forward only gets
    /// 100% forward and 0% reversal; one answer token off is a miss.
    #[test]
    fn exact_match_scores_an_oracle() {
        let dir = tempfile::tempdir().unwrap();
        let all = make_pairs(12, 2, 3);
        let (test, bridge) = all.split_at(6);
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, documents(test, bridge).join("\n")).unwrap();
        let ids = crate::train::tokenizer::train_tokenizer(&[corpus], 300, &dir.path().join("tok"))
            .unwrap();
        let tok = Tokenizer::open(&dir.path().join("tok")).unwrap();
        let forward: HashMap<String, String> = test
            .iter()
            .map(|p| (format!("{} ;", p.first), format!(" {} .", p.second)))
            .collect();
        let oracle = |sabotage: bool| {
            let tok = &tok;
            let forward = &forward;
            move |prompt: &[u32], n: usize, suffix: &[u32]| -> Result<Vec<u32>> {
                assert_eq!(prompt[0], ids.eos);
                assert!(suffix.is_empty());
                let q = tok.decode(&prompt[1..], false)?;
                let mut out = match forward.get(&q) {
                    Some(a) => tok.encode(a)?,
                    None => vec![ids.eos; n],
                };
                if sabotage {
                    out[0] = ids.mask;
                }
                Ok(out)
            }
        };
        let fwd = exact_match(&tok, ids.eos, test, Probe::Forward, &mut oracle(false)).unwrap();
        assert_eq!((fwd.correct, fwd.n), (6, 6));
        let rev = exact_match(
            &tok,
            ids.eos,
            test,
            Probe::ReversalPrompt,
            &mut oracle(false),
        )
        .unwrap();
        assert_eq!((rev.correct, rev.n), (0, 6));
        let off = exact_match(&tok, ids.eos, test, Probe::Forward, &mut oracle(true)).unwrap();
        assert_eq!(off.correct, 0);
        // infilling: the answer sits between the prefix and the suffix ` ; B .`
        let first_of: HashMap<String, String> = test
            .iter()
            .map(|p| (format!(" ; {} .", p.second), p.first.clone()))
            .collect();
        let mut infiller = |prefix: &[u32], n: usize, suffix: &[u32]| -> Result<Vec<u32>> {
            assert_eq!(prefix, &[ids.eos]);
            let a = tok.encode(&first_of[&tok.decode(suffix, false)?])?;
            assert_eq!(a.len(), n);
            Ok(a)
        };
        let inf = exact_match(&tok, ids.eos, test, Probe::ReversalInfill, &mut infiller).unwrap();
        assert_eq!(inf.correct, 6);
    }
}
