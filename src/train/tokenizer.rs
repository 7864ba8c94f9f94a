//! Tokenizer training: a byte-level BPE (GPT-2 split regex, as LLaDA's) trained with the
//! `tokenizers` crate, the LLaDA special tokens appended in LLaDA's relative order, and a
//! `tokenizer_config.json` carrying the LLaDA-8B-Instruct chat template, so the result loads like a
//! published checkpoint's tokenizer.

use std::path::{Path, PathBuf};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::error::{Error, Result};
use crate::tokenizer::names;
use crate::weights::atomic_write;

/// LLaDA-8B-Instruct's chat template (reference §7.1), verbatim.
pub const LLADA_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}";

/// The special tokens, in LLaDA's relative order.
pub const SPECIALS: [&str; 6] = [
    names::BOS,
    names::EOS,
    names::MASK,
    names::START_HEADER,
    names::END_HEADER,
    names::EOT,
];

/// Ids of the special tokens of a trained tokenizer.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct TrainedIds {
    pub vocab_size: usize,
    pub bos: u32,
    pub eos: u32,
    pub mask: u32,
    pub eot: u32,
}

/// Trains a byte-level BPE of `vocab_size` entries in all (the 6 special tokens included) on
/// `files` and writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`
/// into `out`.
pub fn train_tokenizer(files: &[PathBuf], vocab_size: usize, out: &Path) -> Result<TrainedIds> {
    if files.is_empty() {
        return Err(Error::setting(
            "files",
            "none",
            "give at least one text file",
        ));
    }
    let min = 256 + SPECIALS.len() + 1;
    if vocab_size < min {
        return Err(Error::setting(
            "vocab_size",
            vocab_size,
            format!(
                "must be at least {min} (256 bytes, {} special tokens, one merge)",
                SPECIALS.len()
            ),
        ));
    }
    let mut total = 0u64;
    for f in files {
        let len = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
        total += len;
    }
    if total == 0 {
        return Err(Error::setting("files", "empty", "the corpus has no text"));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size - SPECIALS.len())
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(ByteLevel::new(false, false, true).into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    tok.train_from_files(&mut trainer, names)
        .map_err(|e| Error::Tokenizer(format!("training: {e}")))?;
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true).normalized(false))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| Error::Tokenizer(format!("adding special tokens: {e}")))?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let json = tok
        .to_string(true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    atomic_write(&out.join("tokenizer.json"), json.as_bytes())?;

    let id = |s: &str| {
        tok.token_to_id(s)
            .ok_or_else(|| Error::Tokenizer(format!("{s} missing after training")))
    };
    let mut decoder = serde_json::Map::new();
    for s in SPECIALS {
        decoder.insert(
            id(s)?.to_string(),
            serde_json::json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}),
        );
    }
    let config = serde_json::json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "added_tokens_decoder": decoder,
        "bos_token": names::BOS,
        "chat_template": LLADA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": names::EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1_000_000_000_000_000_000_000_000_000_000u128 as f64,
        "pad_token": names::EOS,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Json {
        path: out.join("tokenizer_config.json"),
        source: e,
    })?;
    atomic_write(&out.join("tokenizer_config.json"), text.as_bytes())?;
    let tok_entry = |s: &str| serde_json::json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false});
    let map = serde_json::json!({"bos_token": tok_entry(names::BOS), "eos_token": tok_entry(names::EOS), "pad_token": tok_entry(names::EOS)});
    let text = serde_json::to_string_pretty(&map).map_err(|e| Error::Json {
        path: out.join("special_tokens_map.json"),
        source: e,
    })?;
    atomic_write(&out.join("special_tokens_map.json"), text.as_bytes())?;
    Ok(TrainedIds {
        vocab_size: tok.get_vocab_size(true),
        bos: id(names::BOS)?,
        eos: id(names::EOS)?,
        mask: id(names::MASK)?,
        eot: id(names::EOT)?,
    })
}
