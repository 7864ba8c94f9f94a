//! The tokenizer of a checkpoint (`tokenizer.json` through the `tokenizers` crate), its special
//! token ids (read from `config.json`, `tokenizer_config.json` and the vocabulary, never literals)
//! and its chat template.

use std::collections::BTreeMap;
use std::path::Path;

use crate::chat::{ChatTemplate, Message};
use crate::config::ModelConfig;
use crate::error::{read_json, Error, Result};

/// The token strings of the LLaDA vocabulary's special tokens (reference §1, §7.1).
pub mod names {
    pub const BOS: &str = "<|startoftext|>";
    pub const EOS: &str = "<|endoftext|>";
    pub const MASK: &str = "<|mdm_mask|>";
    pub const START_HEADER: &str = "<|start_header_id|>";
    pub const END_HEADER: &str = "<|end_header_id|>";
    pub const EOT: &str = "<|eot_id|>";
    /// The end of a turn in ChatML templates (Dream-Instruct, Qwen2.5).
    pub const IM_END: &str = "<|im_end|>";
    /// LLaDA2's mask token (its `generate()` default `mask_id` 156895).
    pub const LLADA2_MASK: &str = "<|mask|>";
    /// The end of a turn in LLaDA2's template (`<role>HUMAN</role>…<|role_end|>`).
    pub const ROLE_END: &str = "<|role_end|>";
}

/// The pre-tokenizer split of Qwen2's tokenizer (`Qwen2TokenizerFast`, which Dream's slow
/// `DreamTokenizer` also uses).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer built from the slow Qwen2-style files (`vocab.json` + `merges.txt`, the added
/// tokens of `tokenizer_config.json`'s `added_tokens_decoder` and of `added_tokens.json`), as Dream's repository ships it:
/// byte-level BPE, NFC normalisation, Qwen2's split. Each added token must get the id the file
/// gives it (they follow the vocabulary in id order).
fn from_slow_files(dir: &Path, tc: &serde_json::Value) -> Result<tokenizers::Tokenizer> {
    use tokenizers::pre_tokenizers::{
        byte_level::ByteLevel, sequence::Sequence, split::Split, PreTokenizerWrapper,
    };
    let err = |e: tokenizers::Error| Error::Tokenizer(format!("{}: {e}", dir.display()));
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    let path = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Tokenizer(format!("{}: path is not UTF-8", p.display())))
    };
    let bpe = tokenizers::models::bpe::BPE::from_file(&path(&vocab)?, &path(&merges)?)
        .build()
        .map_err(err)?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_normalizer(Some(tokenizers::normalizers::unicode::NFC))
        .map_err(err)?;
    let split = Split::new(
        tokenizers::pre_tokenizers::split::SplitPattern::Regex(QWEN2_SPLIT.into()),
        tokenizers::SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(err)?;
    t.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ])));
    t.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    let mut added: Vec<(u32, String, bool)> = Vec::new();
    if let Some(map) = tc.get("added_tokens_decoder").and_then(|m| m.as_object()) {
        for (id, v) in map {
            let id: u32 = id.parse().map_err(|_| {
                Error::Tokenizer(format!(
                    "tokenizer_config.json: added token id {id:?} is not a number"
                ))
            })?;
            let content = v.get("content").and_then(|c| c.as_str()).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "tokenizer_config.json: added token {id} has no content"
                ))
            })?;
            let special = v.get("special").and_then(|c| c.as_bool()).unwrap_or(true);
            added.push((id, content.to_string(), special));
        }
    }
    // the older added_tokens.json ({"content": id}) for what the config does not declare
    let older = dir.join("added_tokens.json");
    if older.exists() {
        let v: serde_json::Value = read_json(&older)?;
        for (content, id) in v.as_object().into_iter().flatten() {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| {
                    Error::Tokenizer(format!("{}: {content:?} has no id", older.display()))
                })?;
            if !added.iter().any(|a| a.0 == id) {
                added.push((id, content.clone(), true));
            }
        }
    }
    added.sort();
    for (id, content, special) in added {
        let tok = tokenizers::AddedToken::from(content.clone(), special).normalized(false);
        if special {
            t.add_special_tokens([tok]).map_err(err)?;
        } else {
            t.add_tokens([tok]).map_err(err)?;
        }
        if t.token_to_id(&content) != Some(id) {
            return Err(Error::Tokenizer(format!(
                "tokenizer_config.json: added token {content:?} should have id {id} but gets {:?} after the {} entries of vocab.json (the added tokens must follow the vocabulary in id order)",
                t.token_to_id(&content),
                t.get_vocab_size(false)
            )));
        }
    }
    Ok(t)
}

/// Whether `dir` holds a tokenizer llada can read: `tokenizer.json`, or the slow Qwen2-style
/// `vocab.json` + `merges.txt`.
pub fn present(dir: &Path) -> bool {
    dir.join("tokenizer.json").exists()
        || (dir.join("vocab.json").exists() && dir.join("merges.txt").exists())
}

/// The special token ids a model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SpecialTokens {
    /// `<|mdm_mask|>`: the diffusion mask.
    pub mask: u32,
    /// `<|endoftext|>`: end of text; also the SFT answer padding.
    pub eos: u32,
    /// Padding for left-padded batches (LLaDA: = EOS).
    pub pad: u32,
    /// `<|startoftext|>`.
    pub bos: Option<u32>,
    /// `<|eot_id|>`: end of turn.
    pub eot: Option<u32>,
    pub start_header: Option<u32>,
    pub end_header: Option<u32>,
}

impl SpecialTokens {
    /// Whether `t` ends an answer: EOS or EOT. The first one ends it; what follows is discarded
    /// (the paper discards what follows EOS).
    pub fn ends_answer(&self, t: u32) -> bool {
        t == self.eos || Some(t) == self.eot
    }

    /// Index of the token that ends `ids` as an answer (the first EOS/EOT), if any.
    pub fn answer_end(&self, ids: &[u32]) -> Option<usize> {
        ids.iter().position(|&t| self.ends_answer(t))
    }

    /// Whether an answer canvas is final: some EOS/EOT is committed and nothing before the first
    /// one is masked (later steps cannot change what precedes it, and the answer is cut there).
    pub fn answer_is_final(&self, answer: &[u32]) -> bool {
        match self.answer_end(answer) {
            Some(e) => !answer[..e].contains(&self.mask),
            None => false,
        }
    }

    /// Ids from the config alone (the model files without a tokenizer): mask and EOS must be in
    /// `config.json`.
    pub fn from_config(cfg: &ModelConfig) -> Result<Self> {
        let mask = cfg.mask_token_id.ok_or_else(|| {
            Error::config(
                "mask_token_id",
                "absent",
                "without a tokenizer.json the mask id must be in config.json",
            )
        })?;
        let eos = cfg.eos_token_id.ok_or_else(|| {
            Error::config(
                "eos_token_id",
                "absent",
                "without a tokenizer.json the EOS id must be in config.json",
            )
        })?;
        Ok(SpecialTokens {
            mask,
            eos,
            pad: cfg.pad_token_id.unwrap_or(eos),
            bos: None,
            eot: None,
            start_header: None,
            end_header: None,
        })
    }
}

/// A token given in `tokenizer_config.json` either as a string or as an AddedToken object.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The tokenizer of a checkpoint folder.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    chat: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("special", &self.special)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (required) and `dir/tokenizer_config.json` (optional: special
    /// token names and the chat template). `cfg` supplies `mask_token_id`/`eos_token_id` when the
    /// config has them; otherwise they are looked up by name in the vocabulary.
    pub fn from_dir(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        Self::load(dir, cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id)
    }

    /// Loads a tokenizer folder on its own (no model config): special ids come from the
    /// tokenizer files.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::load(dir, None, None, None)
    }

    fn load(
        dir: &Path,
        mask_id: Option<u32>,
        eos_id: Option<u32>,
        pad_id: Option<u32>,
    ) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tc_path = dir.join("tokenizer_config.json");
        let tc: serde_json::Value = if tc_path.exists() {
            read_json(&tc_path)?
        } else {
            serde_json::Value::Null
        };
        let inner = if path.exists() {
            let bytes = crate::error::read_regular_file(&path, crate::error::TOKENIZER_FILE_LIMIT)?;
            tokenizers::Tokenizer::from_bytes(bytes)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?
        } else if present(dir) {
            from_slow_files(dir, &tc)?
        } else {
            return Err(Error::Tokenizer(format!(
                "{} not found (nor vocab.json + merges.txt)",
                path.display()
            )));
        };
        let id_of = |tok: &str| inner.token_to_id(tok);
        let named = |key: &str| token_string(tc.get(key)).and_then(|t| id_of(&t));

        let mask = mask_id
            .or_else(|| named("mask_token"))
            .or_else(|| id_of(names::MASK))
            .or_else(|| id_of(names::LLADA2_MASK))
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "no mask token: config.json has no mask_token_id and the vocabulary has no {}",
                    names::MASK
                ))
            })?;
        let eos = eos_id
            .or_else(|| named("eos_token"))
            .or_else(|| id_of(names::EOS))
            .ok_or_else(|| {
                Error::Tokenizer(
                    "no EOS token: neither config.json eos_token_id nor tokenizer_config eos_token"
                        .into(),
                )
            })?;
        let pad = pad_id.or_else(|| named("pad_token")).unwrap_or(eos);
        if pad == mask {
            return Err(Error::Tokenizer(format!(
                "pad id {pad} equals the mask id: padding must differ from the mask"
            )));
        }
        let special = SpecialTokens {
            mask,
            eos,
            pad,
            bos: named("bos_token").or_else(|| id_of(names::BOS)),
            eot: id_of(names::EOT)
                .or_else(|| id_of(names::IM_END))
                .or_else(|| id_of(names::ROLE_END)),
            start_header: id_of(names::START_HEADER),
            end_header: id_of(names::END_HEADER),
        };

        let template_src = match tc.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let chat = match template_src {
            Some(src) => {
                let mut vars = BTreeMap::new();
                for key in [
                    "bos_token",
                    "eos_token",
                    "pad_token",
                    "unk_token",
                    "cls_token",
                    "sep_token",
                    "mask_token",
                ] {
                    if let Some(s) = token_string(tc.get(key)) {
                        vars.insert(key.to_string(), s);
                    }
                }
                Some(ChatTemplate::new(src, vars)?)
            }
            None => None,
        };
        Ok(Tokenizer {
            inner,
            special,
            chat,
        })
    }

    /// Wraps an in-memory tokenizer (used by tokenizer training).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        special: SpecialTokens,
        chat: Option<ChatTemplate>,
    ) -> Self {
        Tokenizer {
            inner,
            special,
            chat,
        }
    }

    /// The special token ids.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes `text`; special-token strings in the text map to their ids; nothing is added
    /// (LLaDA's tokenizer adds no BOS/EOS: the chat template supplies BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encoding: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes several texts into one left-padded batch (pad = the pad id): the ids and the
    /// key-padding mask (1 = token, 0 = padding), each `[B][L]` with L the longest text.
    pub fn encode_batch_left_padded(&self, texts: &[&str]) -> Result<PaddedBatch> {
        let seqs = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<Vec<_>>>()?;
        Ok(left_pad(&seqs, self.special.pad))
    }

    /// Decodes ids to text, optionally dropping special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("decoding: {e}")))
    }

    /// Encodes an infill text: `<mask:N>` marks a span of N masked tokens (N ≥ 1) anywhere in the
    /// text; the text around the spans is encoded piece by piece. Returns the ids and the spans
    /// (start, length) in token positions. The canvas must fit `max_len` positions (the model's
    /// `max_sequence_length`): each span is checked before its masks are allocated. The text
    /// itself must not contain the mask token (only `<mask:N>` places masks, so that every mask is
    /// in a reported span).
    pub fn encode_infill(&self, text: &str, max_len: usize) -> Result<(Vec<u32>, Vec<MaskSpan>)> {
        let mut ids = Vec::new();
        let mut spans = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("<mask") {
            // A space before a span belongs to the span: byte-level BPE words carry their
            // leading space (" sheep"), so "my <mask:1>" is "my" + a mask that fills as " sheep"
            // (keeping the space in the text would give "my  sheep", two spaces).
            let before = &rest[..at];
            let before = before.strip_suffix(' ').unwrap_or(before);
            self.encode_infill_piece(before, &mut ids, max_len)?;
            let tail = &rest[at..];
            let close = tail.find('>').ok_or_else(|| Error::InvalidSetting {
                name: "text".into(),
                value: tail.chars().take(20).collect(),
                rule: "unknown mask-span syntax: write <mask:N> for N masked tokens".into(),
            })?;
            let tag = &tail[..=close];
            let n = tag
                .strip_prefix("<mask:")
                .and_then(|t| t.strip_suffix('>'))
                .and_then(|t| t.trim().parse::<usize>().ok())
                .filter(|&n| n >= 1)
                .ok_or_else(|| Error::InvalidSetting {
                    name: "text".into(),
                    value: tag.to_string(),
                    rule: "unknown mask-span syntax: write <mask:N> with N >= 1 masked tokens"
                        .into(),
                })?;
            crate::sampler::prompt::check_length(ids.len(), n, max_len).map_err(|_| {
                Error::setting(
                    "text",
                    tag,
                    format!(
                        "the infill canvas ({} tokens before this span + {n} masked) exceeds the model's max_sequence_length={max_len}",
                        ids.len()
                    ),
                )
            })?;
            spans.push((ids.len(), n));
            ids.extend(std::iter::repeat_n(self.special.mask, n));
            rest = &tail[close + 1..];
        }
        self.encode_infill_piece(rest, &mut ids, max_len)?;
        Ok((ids, spans))
    }

    /// Appends the ids of a text piece of an infill text, which must not hold the mask token and
    /// must keep the canvas inside `max_len`.
    fn encode_infill_piece(&self, piece: &str, ids: &mut Vec<u32>, max_len: usize) -> Result<()> {
        let enc = self.encode(piece)?;
        if enc.contains(&self.special.mask) {
            let name = self
                .id_to_token(self.special.mask)
                .unwrap_or_else(|| format!("id {}", self.special.mask));
            return Err(Error::setting(
                "text",
                format!("{name:?} written literally"),
                "the text must not contain the mask token: write <mask:N> for N masked tokens",
            ));
        }
        crate::sampler::prompt::check_length(ids.len(), enc.len(), max_len).map_err(|_| {
            Error::setting(
                "text",
                format!("{} tokens", ids.len() + enc.len()),
                format!("the infill canvas exceeds the model's max_sequence_length={max_len}"),
            )
        })?;
        ids.extend(enc);
        Ok(())
    }

    /// The answer's text: cut at the first EOS or EOT (the paper discards what follows EOS),
    /// special tokens dropped.
    pub fn decode_answer(&self, ids: &[u32]) -> Result<String> {
        let end = self.special.answer_end(ids).unwrap_or(ids.len());
        self.decode(&ids[..end], true)
    }

    /// The text of an answer canvas that is already final: the longest prefix with no mask,
    /// up to the first EOS/EOT, decoded. Later steps cannot change it (they only unmask), so it
    /// can be shown while the answer is still being denoised; `None` while that prefix ends
    /// inside a multi-byte character.
    pub fn committed_prefix(&self, canvas: &[u32]) -> Option<String> {
        let sp = &self.special;
        let end = canvas
            .iter()
            .position(|&t| t == sp.mask || sp.ends_answer(t))
            .unwrap_or(canvas.len());
        self.decode(&canvas[..end], true)
            .ok()
            .filter(|t| !t.ends_with('\u{FFFD}'))
    }

    /// Why an answer's text is empty, for people: `None` when it has text; else which token ended
    /// it at once, or that it holds only special tokens.
    pub fn empty_answer_reason(&self, ids: &[u32]) -> Option<String> {
        let text = self.decode_answer(ids).ok()?;
        if !text.trim().is_empty() {
            return None;
        }
        let end = self.special.answer_end(ids);
        let name = |id: u32| self.id_to_token(id).unwrap_or_else(|| format!("id {id}"));
        Some(match end {
            Some(0) => format!(
                "the model ended the answer at once ({} first)",
                name(ids[0])
            ),
            Some(i) => format!(
                "the model wrote only {i} blank or special token{} before {}",
                if i == 1 { "" } else { "s" },
                name(ids[i])
            ),
            None => "the answer holds only blank or special tokens".to_string(),
        })
    }

    /// The token string of an id (byte-level symbols, e.g. `Ġ` for a space).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The chat template, if `tokenizer_config.json` has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Renders `messages` with the chat template (the assistant header is appended as the
    /// template decides).
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String> {
        let t = self.chat.as_ref().ok_or_else(|| {
            Error::Tokenizer("this checkpoint's tokenizer_config.json has no chat_template".into())
        })?;
        t.render(messages, true)
    }

    /// Renders and encodes `messages`.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.encode(&self.apply_chat_template(messages)?)
    }
}

/// A masked span of an infill text: (start, length) in token positions.
pub type MaskSpan = (usize, usize);

/// Left-padded token rows and their key-padding mask (1 = token, 0 = padding).
pub type PaddedBatch = (Vec<Vec<u32>>, Vec<Vec<u32>>);

/// Left-pads sequences to the longest with `pad`: the ids and the key-padding mask (1 = token).
pub fn left_pad(seqs: &[Vec<u32>], pad: u32) -> PaddedBatch {
    let len = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len());
    let mut mask = Vec::with_capacity(seqs.len());
    for s in seqs {
        let n = len - s.len();
        ids.push(
            std::iter::repeat_n(pad, n)
                .chain(s.iter().copied())
                .collect(),
        );
        mask.push(
            std::iter::repeat_n(0, n)
                .chain(std::iter::repeat_n(1, s.len()))
                .collect(),
        );
    }
    (ids, mask)
}
