//! Golden tests of the reverse process: every non-fragile case of `generate.json` (and the
//! no-cache cases of `fastdllm.json`) reproduced token for token, with the same unmasking
//! trajectory and number of model calls.

mod common;

use common::*;
use llada::candle_core::DType;

#[test]
fn generate_cases_match_reference() {
    golden::check_generate_cases(&golden_dir(), model(DType::F32));
}

#[test]
fn fastdllm_cases_match_reference() {
    golden::check_fastdllm_cases(&golden_dir(), model(DType::F32));
}

/// Where the reference says cached and uncached must agree: when every block is one step long,
/// each step is a block-start full forward, so prefix and dual caches change nothing.
#[test]
fn cached_and_uncached_agree_where_they_must() {
    golden::check_cached_and_uncached_agree(model(DType::F32));
}

/// Early stop keeps the decoded answer and saves forward passes.
#[test]
fn early_stop_keeps_the_answer() {
    golden::check_early_stop_keeps_the_answer(model(DType::F32));
}
