//! Training data: token shards on disk (memory-mapped u32 with a small JSON header) for
//! pretraining streams and SFT examples, `llada data prepare` to make them, and a seeded,
//! resumable cursor that yields batches.
//!
//! A dataset folder holds `header.json`, `{train,val}.tokens` (u32 little-endian) and, for SFT,
//! `{train,val}.examples` (per example: u64 offset, u32 length, u32 prompt length, little-endian).

use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::error::{read_json, Error, Result};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use crate::weights::atomic_write;

/// What a dataset holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// A token stream of documents, each followed by EOS.
    Pretrain,
    /// Chat examples: prompt (template up to the assistant header) + answer + EOT.
    Sft,
    /// Preference pairs for VRPO: the same prompt with a chosen and a rejected answer, each
    /// stored as an SFT example (example 2k chosen, 2k+1 rejected). `vrpo` is the training
    /// mode's name for it.
    #[serde(alias = "vrpo")]
    Preference,
}

impl DataKind {
    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            DataKind::Pretrain => "pretrain",
            DataKind::Sft => "sft",
            DataKind::Preference => "preference",
        }
    }

    /// Data made of examples (prompt + answer).
    pub fn has_examples(self) -> bool {
        matches!(self, DataKind::Sft | DataKind::Preference)
    }
}

/// Counts of one split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct SplitInfo {
    pub tokens: u64,
    pub examples: u64,
}

/// `header.json` of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataHeader {
    pub format: String,
    pub version: u32,
    pub kind: DataKind,
    /// Vocabulary size of the tokenizer that made it (every id is below it).
    pub vocab_size: usize,
    pub eos_id: u32,
    pub train: SplitInfo,
    pub val: SplitInfo,
    /// Input files.
    pub sources: Vec<String>,
}

const FORMAT: &str = "llada-tokens";

/// One split of a dataset, memory-mapped.
pub struct Split {
    tokens: Option<Mmap>,
    examples: Option<Mmap>,
    pub n_tokens: usize,
    pub n_examples: usize,
}

fn map(path: &Path, expect_len: u64) -> Result<Option<Mmap>> {
    if expect_len == 0 {
        return Ok(None);
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len != expect_len {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("{len} bytes, header says {expect_len}: truncated or corrupt"),
        });
    }
    // SAFETY: read-only map of a file the dataset owns.
    Ok(Some(
        unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?,
    ))
}

impl Split {
    /// Token i of the stream.
    pub fn token(&self, i: usize) -> u32 {
        let m = self
            .tokens
            .as_ref()
            .map(|m| &m[i * 4..i * 4 + 4])
            .unwrap_or(&[0; 4]);
        u32::from_le_bytes([m[0], m[1], m[2], m[3]])
    }

    /// Tokens start..start+len.
    pub fn tokens(&self, start: usize, len: usize) -> Vec<u32> {
        (start..start + len).map(|i| self.token(i)).collect()
    }

    /// Checks that every example lies within the token stream and its prompt within it (a
    /// corrupt `.examples` file made [`Split::example`] index past the stream and panic).
    fn check_examples(&self, path: &Path) -> Result<()> {
        let Some(m) = &self.examples else {
            return Ok(());
        };
        for (i, r) in m.chunks_exact(16).enumerate() {
            let field = |a: usize, b: usize| {
                let mut v = [0u8; 8];
                v[..b - a].copy_from_slice(&r[a..b]);
                u64::from_le_bytes(v)
            };
            let (off, len, pl) = (field(0, 8), field(8, 12), field(12, 16));
            let end = off.checked_add(len);
            if end.is_none_or(|e| e > self.n_tokens as u64) || pl > len {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    reason: format!(
                        "example {i} (offset {off}, length {len}, prompt {pl}) lies outside the \
                         {} tokens of the stream or its prompt outside the example: corrupt",
                        self.n_tokens
                    ),
                });
            }
        }
        Ok(())
    }

    /// Example i's (length, prompt length), without reading its tokens.
    pub fn example_lengths(&self, i: usize) -> (usize, usize) {
        let Some(m) = &self.examples else {
            return (0, 0);
        };
        let r = &m[i * 16..i * 16 + 16];
        let len = u32::from_le_bytes(r[8..12].try_into().unwrap_or([0; 4])) as usize;
        let pl = u32::from_le_bytes(r[12..16].try_into().unwrap_or([0; 4])) as usize;
        (len, pl)
    }

    /// Example i: (tokens, prompt length).
    pub fn example(&self, i: usize) -> (Vec<u32>, usize) {
        let Some(m) = &self.examples else {
            return (Vec::new(), 0);
        };
        let r = &m[i * 16..i * 16 + 16];
        let off = u64::from_le_bytes(r[0..8].try_into().unwrap_or([0; 8])) as usize;
        let len = u32::from_le_bytes(r[8..12].try_into().unwrap_or([0; 4])) as usize;
        let pl = u32::from_le_bytes(r[12..16].try_into().unwrap_or([0; 4])) as usize;
        (self.tokens(off, len), pl)
    }
}

/// A prepared dataset.
pub struct Dataset {
    pub dir: PathBuf,
    pub header: DataHeader,
    pub train: Split,
    pub val: Split,
}

impl Dataset {
    /// Opens a dataset folder, checking the files against the header.
    pub fn open(dir: &Path) -> Result<Self> {
        let hp = dir.join("header.json");
        if !hp.exists() {
            return Err(Error::Checkpoint {
                path: hp,
                reason: "not a prepared dataset (run `llada data prepare`)".into(),
            });
        }
        let header: DataHeader = read_json(&hp)?;
        if header.format != FORMAT {
            return Err(Error::Checkpoint {
                path: hp,
                reason: format!("format {:?}, expected {FORMAT:?}", header.format),
            });
        }
        let bytes = |n: u64, each: u64, field: &str| {
            n.checked_mul(each).ok_or_else(|| Error::Checkpoint {
                path: hp.clone(),
                reason: format!("{field} = {n} is not a size any file can have"),
            })
        };
        let split = |name: &str, info: SplitInfo| -> Result<Split> {
            let split = Split {
                tokens: map(
                    &dir.join(format!("{name}.tokens")),
                    bytes(info.tokens, 4, &format!("{name}.tokens"))?,
                )?,
                examples: if header.kind.has_examples() {
                    map(
                        &dir.join(format!("{name}.examples")),
                        bytes(info.examples, 16, &format!("{name}.examples"))?,
                    )?
                } else {
                    None
                },
                n_tokens: info.tokens as usize,
                n_examples: info.examples as usize,
            };
            split.check_examples(&dir.join(format!("{name}.examples")))?;
            if header.kind == DataKind::Preference && !split.n_examples.is_multiple_of(2) {
                return Err(Error::Checkpoint {
                    path: dir.join(format!("{name}.examples")),
                    reason: format!(
                        "{} examples: preference data holds pairs (an even count): corrupt",
                        split.n_examples
                    ),
                });
            }
            Ok(split)
        };
        Ok(Dataset {
            dir: dir.to_path_buf(),
            train: split("train", header.train)?,
            val: split("val", header.val)?,
            header,
        })
    }
}

/// What `prepare` reads.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareOptions {
    pub kind: DataKind,
    /// Plain text: one document per line (instead of per blank-line-separated paragraph).
    pub doc_per_line: bool,
    /// Share of documents/examples held out for validation (seeded).
    pub val_fraction: f64,
    pub seed: u64,
    /// SFT: drop examples longer than this many tokens.
    pub max_len: Option<usize>,
}

/// Documents of a plain-text or JSONL (`{"text": …}`) file.
fn read_documents(path: &Path, per_line: bool) -> Result<Vec<String>> {
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    if is_jsonl {
        #[derive(Deserialize)]
        struct Doc {
            text: String,
        }
        let rows: Vec<(usize, Doc)> = crate::error::read_jsonl(path, "{\"text\": string}")?;
        return Ok(rows.into_iter().map(|(_, d)| d.text).collect());
    }
    let text = crate::error::read_to_string(path)?;
    Ok(if per_line {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    } else {
        text.split("\n\n")
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect()
    })
}

/// SFT examples (prompt text, answer text) of a chat JSONL file: each assistant turn becomes one
/// example whose prompt is the conversation before it, rendered with the chat template.
fn read_chats(path: &Path, tok: &Tokenizer) -> Result<Vec<(String, String)>> {
    #[derive(Deserialize)]
    struct Chat {
        messages: Vec<Message>,
    }
    let mut out = Vec::new();
    let rows: Vec<(usize, Chat)> =
        crate::error::read_jsonl(path, "{\"messages\": [{\"role\", \"content\"}, …]}")?;
    for (line, chat) in rows {
        let mut any = false;
        for (j, m) in chat.messages.iter().enumerate() {
            if m.role == "assistant" && j > 0 {
                let prompt = tok.apply_chat_template(&chat.messages[..j])?;
                out.push((prompt, m.content.trim().to_string()));
                any = true;
            }
        }
        if !any {
            return Err(Error::DataLine {
                path: path.to_path_buf(),
                line,
                reason: "no assistant message after a user message".into(),
            });
        }
    }
    Ok(out)
}

/// One record of a preference file: the prompt (rendered with the chat template), the chosen
/// answer and the rejected one.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// The pairs of a preference JSONL file: `{"prompt": str | "messages": [...], "chosen": str,
/// "rejected": str}`. A `prompt` is one user message; `messages` is a conversation ending with a
/// user message. Both are rendered with the chat template, as SFT prompts are.
pub fn read_preferences(path: &Path, tok: &Tokenizer) -> Result<Vec<PreferencePair>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Record {
        prompt: Option<String>,
        messages: Option<Vec<Message>>,
        chosen: String,
        rejected: String,
        /// Free-form provenance (e.g. the task); ignored.
        #[allow(dead_code)]
        task: Option<serde_json::Value>,
    }
    let expected = "{\"prompt\": string | \"messages\": [{\"role\", \"content\"}, …], \"chosen\": string, \"rejected\": string}";
    let rows: Vec<(usize, Record)> = crate::error::read_jsonl(path, expected)?;
    let bad = |line: usize, reason: String| Error::DataLine {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut out = Vec::with_capacity(rows.len());
    for (line, r) in rows {
        let messages = match (r.prompt, r.messages) {
            (Some(p), None) => vec![Message {
                role: "user".into(),
                content: p,
            }],
            (None, Some(m)) => m,
            (Some(_), Some(_)) => {
                return Err(bad(
                    line,
                    "give \"prompt\" or \"messages\", not both".into(),
                ))
            }
            (None, None) => {
                return Err(bad(line, format!("no prompt: expected {expected}")));
            }
        };
        match messages.last() {
            Some(m) if m.role == "user" => {}
            Some(m) => {
                return Err(bad(
                    line,
                    format!(
                    "\"messages\" must end with a user message (the answers follow it), not {:?}",
                    m.role
                ),
                ))
            }
            None => return Err(bad(line, "\"messages\" is empty".into())),
        }
        let (chosen, rejected) = (r.chosen.trim().to_string(), r.rejected.trim().to_string());
        if chosen.is_empty() || rejected.is_empty() {
            return Err(bad(
                line,
                "\"chosen\" and \"rejected\" must be non-empty answers".into(),
            ));
        }
        if chosen == rejected {
            return Err(bad(
                line,
                format!("\"chosen\" and \"rejected\" are the same answer ({chosen:?}): a pair needs two different answers"),
            ));
        }
        let prompt = tok
            .apply_chat_template(&messages)
            .map_err(|e| bad(line, format!("the chat template refused the prompt: {e}")))?;
        out.push(PreferencePair {
            prompt,
            chosen,
            rejected,
        });
    }
    Ok(out)
}

/// Tokenises `files` into a dataset folder `out`. Returns the header.
pub fn prepare(
    files: &[PathBuf],
    tok: &Tokenizer,
    out: &Path,
    opts: &PrepareOptions,
) -> Result<DataHeader> {
    if files.is_empty() {
        return Err(Error::setting(
            "files",
            "none",
            "give at least one input file",
        ));
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::setting(
            "val_fraction",
            opts.val_fraction,
            "must be in [0, 1)",
        ));
    }
    let sp = *tok.special();
    // (tokens, prompt length) per item
    let mut items: Vec<(Vec<u32>, usize)> = Vec::new();
    let mut dropped = 0usize;
    let mut pair_items: Vec<[(Vec<u32>, usize); 2]> = Vec::new();
    for f in files {
        match opts.kind {
            DataKind::Pretrain => {
                let docs = read_documents(f, opts.doc_per_line)?;
                let enc: Vec<Result<Vec<u32>>> = docs.par_iter().map(|d| tok.encode(d)).collect();
                for e in enc {
                    let mut ids = e?;
                    if ids.is_empty() {
                        continue;
                    }
                    ids.push(sp.eos);
                    items.push((ids, 0));
                }
            }
            DataKind::Sft => {
                let eot = sp.eot.ok_or_else(|| {
                    Error::Tokenizer(
                        "SFT data needs an end-of-turn token (<|eot_id|>) in the vocabulary".into(),
                    )
                })?;
                let pairs = read_chats(f, tok)?;
                let enc: Vec<Result<(Vec<u32>, Vec<u32>)>> = pairs
                    .par_iter()
                    .map(|(p, a)| Ok((tok.encode(p)?, tok.encode(a)?)))
                    .collect();
                for e in enc {
                    let (p, a) = e?;
                    let mut ids = p.clone();
                    ids.extend(a);
                    ids.push(eot);
                    if opts.max_len.is_some_and(|m| ids.len() > m) {
                        dropped += 1;
                        continue;
                    }
                    items.push((ids, p.len()));
                }
            }
            DataKind::Preference => {
                let eot = sp.eot.ok_or_else(|| {
                    Error::Tokenizer(
                        "preference data needs an end-of-turn token (<|eot_id|>) in the vocabulary"
                            .into(),
                    )
                })?;
                let pairs = read_preferences(f, tok)?;
                let enc: Vec<Result<[Vec<u32>; 3]>> = pairs
                    .par_iter()
                    .map(|p| {
                        Ok([
                            tok.encode(&p.prompt)?,
                            tok.encode(&p.chosen)?,
                            tok.encode(&p.rejected)?,
                        ])
                    })
                    .collect();
                for e in enc {
                    let [p, c, r] = e?;
                    let seq = |a: Vec<u32>| {
                        let mut ids = p.clone();
                        ids.extend(a);
                        ids.push(eot);
                        ids
                    };
                    let (c, r) = (seq(c), seq(r));
                    if opts.max_len.is_some_and(|m| c.len().max(r.len()) > m) {
                        dropped += 1;
                        continue;
                    }
                    // a pair is one unit: both go to the same split, chosen first
                    pair_items.push([(c, p.len()), (r, p.len())]);
                }
            }
        }
    }
    for [c, r] in pair_items {
        items.push(c);
        items.push(r);
    }
    if dropped > 0 {
        tracing::warn!(
            "dropped {dropped} {} examples longer than {:?} tokens",
            opts.kind.name(),
            opts.max_len
        );
    }
    if items.is_empty() {
        return Err(Error::setting(
            "files",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            "no text to train on (empty corpus)",
        ));
    }
    let mut rng = Rng::new(opts.seed);
    let mut split: [(Vec<u8>, Vec<u8>, SplitInfo); 2] = Default::default();
    let per_unit = if opts.kind == DataKind::Preference {
        2
    } else {
        1
    };
    let mut s = 0;
    for (k, (ids, pl)) in items.iter().enumerate() {
        if k % per_unit == 0 {
            s = usize::from(opts.val_fraction > 0.0 && rng.uniform() < opts.val_fraction);
        }
        let (tokens, examples, info) = &mut split[s];
        let offset = info.tokens;
        for &t in ids {
            tokens.extend_from_slice(&t.to_le_bytes());
        }
        examples.extend_from_slice(&offset.to_le_bytes());
        examples.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        examples.extend_from_slice(&(*pl as u32).to_le_bytes());
        info.tokens += ids.len() as u64;
        info.examples += 1;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for (name, (tokens, examples, _)) in ["train", "val"].iter().zip(&split) {
        atomic_write(&out.join(format!("{name}.tokens")), tokens)?;
        if opts.kind.has_examples() {
            atomic_write(&out.join(format!("{name}.examples")), examples)?;
        }
    }
    let header = DataHeader {
        format: FORMAT.into(),
        version: 1,
        kind: opts.kind,
        vocab_size: tok.vocab_size(),
        eos_id: sp.eos,
        train: split[0].2,
        val: split[1].2,
        sources: files.iter().map(|f| f.display().to_string()).collect(),
    };
    let text = serde_json::to_string_pretty(&header).map_err(|e| Error::Json {
        path: out.join("header.json"),
        source: e,
    })?;
    atomic_write(&out.join("header.json"), text.as_bytes())?;
    Ok(header)
}

/// Where a reader stands: the epoch and the index in that epoch's seeded order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub index: u64,
}

/// A batch of training sequences of equal length (preference data: two rows per pair, the
/// chosen answer at 2k and the rejected one at 2k+1).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub x0: Vec<Vec<u32>>,
    /// SFT and preference data: prompt lengths.
    pub prompt_lengths: Option<Vec<usize>>,
}

/// A seeded, resumable reader of one split.
pub struct Reader<'a> {
    split: &'a Split,
    kind: DataKind,
    seq_len: usize,
    seed: u64,
    pad: u32,
    pub cursor: Cursor,
    order: Vec<usize>,
    order_epoch: Option<u64>,
}

impl<'a> Reader<'a> {
    /// A reader of `split` yielding sequences of `seq_len` (pretrain: windows of the stream; SFT:
    /// examples padded with `pad` = EOS to the longest of the batch, at most `seq_len`).
    pub fn new(
        ds: &'a Dataset,
        split: &'a Split,
        seq_len: usize,
        seed: u64,
        cursor: Cursor,
    ) -> Result<Self> {
        if seq_len == 0 {
            return Err(Error::setting("seq_len", seq_len, "must be at least 1"));
        }
        let units = match ds.header.kind {
            DataKind::Pretrain => split.n_tokens / seq_len,
            DataKind::Sft => split.n_examples,
            DataKind::Preference => split.n_examples / 2,
        };
        if units == 0 {
            return Err(Error::setting(
                "data",
                ds.dir.display(),
                match ds.header.kind {
                    DataKind::Pretrain => format!(
                        "this split has {} tokens, fewer than one sequence of seq_len={seq_len}",
                        split.n_tokens
                    ),
                    DataKind::Sft | DataKind::Preference => "this split has no examples".into(),
                },
            ));
        }
        if cursor.index >= units as u64 {
            return Err(Error::setting(
                "cursor.index",
                cursor.index,
                format!(
                    "must be below the {units} sequences per epoch of this split of {} (a corrupt state, or another dataset)",
                    ds.dir.display()
                ),
            ));
        }
        Ok(Reader {
            split,
            kind: ds.header.kind,
            seq_len,
            seed,
            pad: ds.header.eos_id,
            cursor,
            order: Vec::new(),
            order_epoch: None,
        })
    }

    fn units(&self) -> usize {
        match self.kind {
            DataKind::Pretrain => self.split.n_tokens / self.seq_len,
            DataKind::Sft => self.split.n_examples,
            DataKind::Preference => self.split.n_examples / 2,
        }
    }

    /// The epoch's order: a permutation seeded by (seed, epoch); for streams, also an offset so
    /// window boundaries move from epoch to epoch.
    fn ensure_order(&mut self) {
        if self.order_epoch != Some(self.cursor.epoch) {
            let mut rng = Rng::derived(self.seed, self.cursor.epoch);
            self.order = rng.permutation(self.units());
            self.order_epoch = Some(self.cursor.epoch);
        }
    }

    fn offset(&self) -> usize {
        let spare = self.split.n_tokens - self.units() * self.seq_len;
        if spare == 0 {
            0
        } else {
            Rng::derived(self.seed ^ 0x5EED, self.cursor.epoch).below(spare + 1)
        }
    }

    /// The next `batch` sequences (preference data: `batch` pairs, 2·`batch` rows).
    pub fn next_batch(&mut self, batch: usize) -> Batch {
        let mut x0 = Vec::with_capacity(batch);
        let mut pls = Vec::with_capacity(batch);
        for _ in 0..batch {
            self.ensure_order();
            let unit = self.order[self.cursor.index as usize];
            match self.kind {
                DataKind::Pretrain => {
                    let start = self.offset() + unit * self.seq_len;
                    x0.push(self.split.tokens(start, self.seq_len));
                }
                DataKind::Sft => {
                    let (mut ids, pl) = self.split.example(unit);
                    ids.truncate(self.seq_len);
                    pls.push(pl.min(ids.len().saturating_sub(1)));
                    x0.push(ids);
                }
                DataKind::Preference => {
                    // chosen then rejected: rows 2k and 2k+1 of the batch
                    for e in [2 * unit, 2 * unit + 1] {
                        let (mut ids, pl) = self.split.example(e);
                        ids.truncate(self.seq_len);
                        pls.push(pl.min(ids.len().saturating_sub(1)));
                        x0.push(ids);
                    }
                }
            }
            self.cursor.index += 1;
            if self.cursor.index as usize >= self.units() {
                self.cursor.index = 0;
                self.cursor.epoch = self.cursor.epoch.saturating_add(1);
            }
        }
        if self.kind.has_examples() {
            // EOS padding to the longest example of the batch: part of the answer (§3.3)
            let len = x0.iter().map(Vec::len).max().unwrap_or(0);
            for row in &mut x0 {
                row.resize(len, self.pad);
            }
            return Batch {
                x0,
                prompt_lengths: Some(pls),
            };
        }
        Batch {
            x0,
            prompt_lengths: None,
        }
    }
}
