//! Exact-match evaluation of generated answers: chat examples whose last message is the expected
//! assistant answer; the model answers the conversation before it (greedy, batched), and the
//! answer cut at EOS/EOT must equal the expected text (whitespace-trimmed).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::choice::Accuracy;
use crate::chat::Message;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::sampler::{self, MaskPredictor, PromptBatch, SamplerConfig};
use crate::tokenizer::Tokenizer;

/// A chat example with an expected answer (and an optional task label).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCase {
    #[serde(default)]
    pub task: Option<String>,
    pub messages: Vec<Message>,
}

/// Reads chat JSONL cases; the last message must be the assistant's answer.
pub fn load_cases(path: &Path) -> Result<Vec<ChatCase>> {
    let rows: Vec<(usize, ChatCase)> = crate::error::read_jsonl(
        path,
        "{\"task\"?: str, \"messages\": [{\"role\", \"content\"}, ...]}",
    )?;
    rows.into_iter()
        .map(|(line, c)| {
            if c.messages.len() < 2
                || c.messages.last().map(|m| m.role.as_str()) != Some("assistant")
            {
                return Err(Error::DataLine {
                    path: path.to_path_buf(),
                    line,
                    reason: "the last message must be the expected assistant answer".into(),
                });
            }
            Ok(c)
        })
        .collect()
}

/// Per-case result.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub task: Option<String>,
    pub expected: String,
    pub answer: String,
    pub correct: bool,
    /// Tokens of the answer before its EOS/EOT (what was generated; the padding after it is not).
    pub answer_tokens: usize,
}

/// An exact-match evaluation: every case's result, the accuracy overall and per task, and the
/// work it took.
#[derive(Debug, Clone, Serialize)]
pub struct ChatEval {
    pub results: Vec<CaseResult>,
    pub accuracy: Accuracy,
    pub per_task: BTreeMap<String, Accuracy>,
    /// Forward passes of all batches.
    pub forwards: usize,
    /// Answer tokens generated (before each EOS/EOT).
    pub answer_tokens: usize,
}

/// Generates an answer for every case (in batches of `batch`) and scores exact matches, overall
/// and per task.
pub fn evaluate(
    model: &mut dyn MaskPredictor,
    tok: &Tokenizer,
    cases: &[ChatCase],
    cfg: &SamplerConfig,
    batch: usize,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<ChatEval> {
    let sp = *tok.special();
    let mut forwards = 0;
    let mut results = Vec::with_capacity(cases.len());
    for chunk in cases.chunks(batch.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .map(|c| tok.encode_chat(&c.messages[..c.messages.len() - 1]))
            .collect::<Result<_>>()?;
        let pb = PromptBatch::left_padded(&prompts, sp.pad);
        let g = sampler::generate(
            model,
            &pb,
            cfg,
            &sp,
            &mut Rng::new(0),
            &mut sampler::no_progress,
        )?;
        forwards += g.nfe;
        for (c, ids) in chunk.iter().zip(&g.generated_ids) {
            let answer = tok.decode_answer(ids)?.trim().to_string();
            let expected = c
                .messages
                .last()
                .map(|m| m.content.trim().to_string())
                .unwrap_or_default();
            results.push(CaseResult {
                task: c.task.clone(),
                answer_tokens: sp.answer_end(ids).unwrap_or(ids.len()),
                correct: answer == expected,
                expected,
                answer,
            });
        }
        on_progress(results.len(), cases.len());
    }
    let acc = Accuracy::of(results.iter().filter(|r| r.correct).count(), results.len());
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in &results {
        let e = per
            .entry(r.task.clone().unwrap_or_else(|| "all".into()))
            .or_default();
        e.0 += usize::from(r.correct);
        e.1 += 1;
    }
    let per = per
        .into_iter()
        .map(|(k, (c, n))| (k, Accuracy::of(c, n)))
        .collect();
    let answer_tokens = results.iter().map(|r| r.answer_tokens).sum();
    Ok(ChatEval {
        results,
        accuracy: acc,
        per_task: per,
        forwards,
        answer_tokens,
    })
}
