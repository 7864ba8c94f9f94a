//! The cache-mode axis (Fast-dLLM, reference §6.4) and the model-side predictor that implements
//! it: at the start of each block one full forward (its logits are the block's first step) fills
//! the keys/values of every layer; later steps recompute only the current block (`Dual`: the
//! suffix keeps its block-start keys/values) or the block and everything after it (`Prefix`: the
//! prefix before the block stays cached).

use std::ops::Range;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::MaskPredictor;
use crate::error::{Error, Result};
use crate::model::{KvCache, Llada};

/// Which keys/values are reused between the steps of a block. The names (`none`, `prefix`,
/// `dual`) are the same for serde and clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum CacheMode {
    /// Every step is a full forward (the reference LLaDA sampler).
    #[default]
    None,
    /// Cache the prefix (prompt and finished blocks) once per block; recompute block + suffix.
    Prefix,
    /// Cache prefix and suffix once per block; recompute only the block.
    Dual,
}

impl std::str::FromStr for CacheMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        <Self as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| Error::setting("cache", s, "must be none, prefix or dual"))
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = clap::ValueEnum::to_possible_value(self);
        f.write_str(v.as_ref().map_or("", |v| v.get_name()))
    }
}

/// The LLaDA mask predictor with the cache modes.
pub struct LladaPredictor<'a> {
    model: &'a Llada,
    mode: CacheMode,
    cache: Option<KvCache>,
    block: Range<usize>,
    refresh: bool,
    flops: f64,
}

impl<'a> LladaPredictor<'a> {
    pub fn new(model: &'a Llada) -> Self {
        LladaPredictor {
            model,
            mode: CacheMode::None,
            cache: None,
            block: 0..0,
            refresh: true,
            flops: 0.0,
        }
    }

    /// Matrix-product FLOPs of every forward so far, counting only the work done (recomputed
    /// chunks, the rows whose logits were read).
    pub fn executed_flops(&self) -> f64 {
        self.flops
    }
}

impl LladaPredictor<'_> {
    /// Logits of the increasing positions `rows` of the canvas `x`, through the cache mode.
    fn rows_logits(
        &mut self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        rows: &[usize],
    ) -> Result<Tensor> {
        let (b, l) = x.dims2()?;
        let cfg = self.model.config();
        if self.mode == CacheMode::None {
            self.flops += cfg.chunk_flops(b, l, l, rows.len());
            return self.model.forward_rows_at(x, key_mask, rows);
        }
        let stale = self
            .cache
            .as_ref()
            .is_none_or(|c| c.len() != l || c.batch() != b);
        if self.refresh || stale {
            let mut cache = self.model.new_cache(b, l, key_mask)?;
            self.flops += cfg.chunk_flops(b, l, l, rows.len());
            let out = self.model.forward_chunk_at(x, 0, &mut cache, rows)?;
            self.cache = Some(cache);
            self.refresh = false;
            return Ok(out);
        }
        let chunk = match self.mode {
            CacheMode::Dual => self.block.clone(),
            _ => self.block.start..l,
        };
        let ids = x.narrow(1, chunk.start, chunk.end - chunk.start)?;
        self.flops += cfg.chunk_flops(b, chunk.len(), l, rows.len());
        let cache = self
            .cache
            .as_mut()
            .ok_or_else(|| Error::setting("cache", "empty", "no block-start forward yet"))?;
        self.model.forward_chunk_at(&ids, chunk.start, cache, rows)
    }
}

impl MaskPredictor for LladaPredictor<'_> {
    fn logits(
        &mut self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        rows: Range<usize>,
    ) -> Result<Tensor> {
        let rows: Vec<usize> = rows.collect();
        self.rows_logits(x, key_mask, &rows)
    }

    fn logits_at(
        &mut self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        _window: Range<usize>,
        rows: &[usize],
    ) -> Result<Tensor> {
        self.rows_logits(x, key_mask, rows)
    }

    fn device(&self) -> Device {
        self.model.device().clone()
    }

    fn max_sequence_length(&self) -> usize {
        self.model.config().max_sequence_length
    }

    fn begin_block(&mut self, block: Range<usize>, mode: CacheMode) -> Result<()> {
        self.mode = mode;
        self.block = block;
        self.refresh = true;
        Ok(())
    }
}
