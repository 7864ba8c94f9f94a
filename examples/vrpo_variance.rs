//! The variance of VRPO's loss estimate (DPO's part) over noise draws, for a trained policy against its
//! reference: antithetic sampling on and off, and the budget n split as n_t × n_yt in several
//! ways (LLaDA 1.5: for a fixed n, all of it on timesteps is best).
//!
//!   cargo run --release --example vrpo_variance -- RUN [SEEDS] [PAIRS]
//!
//! RUN is a VRPO run folder (its last checkpoint is the policy; its base the reference); the
//! estimates are taken on the first PAIRS held-out pairs of its data, SEEDS draws each.

use std::path::PathBuf;

use llada::candle_core::Device;
use llada::diffusion::vrpo::VrpoSettings;
use llada::train::trainer::Trainer;
use llada::Rng;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let run = PathBuf::from(args.next().ok_or_else(|| {
        anyhow::anyhow!("usage: vrpo_variance RUN [SEEDS] [PAIRS] (RUN: a VRPO run folder)")
    })?);
    let seeds: u64 = args.next().map_or(Ok(32), |s| s.parse())?;
    let pairs: usize = args.next().map_or(Ok(8), |s| s.parse())?;
    anyhow::ensure!(
        seeds >= 2,
        "SEEDS={seeds}: a variance needs at least 2 draws"
    );
    anyhow::ensure!(pairs >= 1, "PAIRS={pairs}: needs at least 1 pair");
    let mut t = Trainer::resume(&run, None, &Device::Cpu)?;
    let (x0, pl) = t.preference_pairs(pairs)?;
    let base = t.cfg.vrpo.clone();
    println!(
        "policy: {} (step {}), β {}, {pairs} held-out pairs, {seeds} draws each",
        run.display(),
        t.state.step,
        base.beta
    );
    println!("| n_t × n_yt | antithetic | mean loss | variance of the loss | mean margin |");
    println!("| --- | --- | --- | --- | --- |");
    let n = base.budget();
    let mut splits = vec![(n, 1)];
    if n > 1 {
        splits.push((1, n));
        if n % 2 == 0 && n > 2 {
            splits.push((n / 2, 2));
        }
    }
    for (nt, nyt) in splits {
        for antithetic in [true, false] {
            t.cfg.vrpo = VrpoSettings {
                timesteps: nt,
                masks: nyt,
                antithetic,
                // DPO's loss alone (an SFT term's noise is the same with or without sharing)
                sft_weight: 0.0,
                ..base.clone()
            };
            let mut v = Vec::new();
            let mut margin = 0.0;
            for s in 0..seeds {
                let (loss, st) = t.vrpo_estimate(&x0, &pl, &mut Rng::new(10_000 + s))?;
                v.push(loss);
                margin += st.reward_margin / seeds as f64;
            }
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
            println!(
                "| {nt} × {nyt} | {} | {mean:.4} | {var:.3e} | {margin:.4} |",
                if antithetic { "yes" } else { "no" }
            );
        }
    }
    Ok(())
}
