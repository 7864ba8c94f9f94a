//! `llada plot RUN_DIR`: the training loss, the held-out bound and the learning rate of a run as
//! a PNG (plotters, with an embedded DejaVu Sans font so no system fonts are needed).

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::trainer::read_metrics;
use crate::error::{Error, Result};

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Registers the embedded font as "sans-serif" (once).
pub fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::setting("plot", "drawing", e.to_string())
}

/// The loss chart of `area`: step on x, the loss range padded by 5% on y, labelled axes.
fn loss_chart<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    caption: String,
    y_desc: &str,
    max_step: f64,
    (lo, hi): (f64, f64),
) -> Result<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    Ok(chart)
}

/// Draws the curves of the run in `run_dir` into `out` (PNG, 1200×800).
pub fn plot_run(run_dir: &Path, out: &Path) -> Result<()> {
    register_font();
    let (train, eval) = read_metrics(run_dir)?;
    if train.is_empty() {
        return Err(Error::setting(
            "run",
            run_dir.display(),
            "metrics.jsonl has no training steps yet",
        ));
    }
    let rewards = super::trainer::read_rewards(run_dir)?;
    let vrpo = !rewards.0.is_empty();
    let root = BitMapBackend::new(out, (1200, if vrpo { 1200 } else { 800 })).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (top, bottom) = root.split_vertically(520);
    let bottom = if vrpo {
        let (middle, bottom) = bottom.split_vertically(420);
        reward_chart(
            &middle,
            &rewards,
            train.last().map(|t| t.0).unwrap_or(1.0).max(1.0),
        )?;
        bottom
    } else {
        bottom
    };
    let max_step = train.last().map(|t| t.0).unwrap_or(1.0).max(1.0);
    // smoothed training loss (EMA) next to the raw one
    let mut ema = Vec::with_capacity(train.len());
    let mut e = train[0].1;
    for &(s, l, _) in &train {
        e = 0.95 * e + 0.05 * l;
        ema.push((s, e));
    }
    let lo = train
        .iter()
        .map(|t| t.1)
        .chain(eval.iter().map(|t| t.1))
        .fold(f64::INFINITY, f64::min);
    let hi = train
        .iter()
        .map(|t| t.1)
        .chain(eval.iter().map(|t| t.1))
        .fold(f64::NEG_INFINITY, f64::max);
    let mut chart = loss_chart(
        &top,
        format!(
            "{} — {}",
            run_dir.display(),
            if vrpo { "VRPO loss" } else { "loss" }
        ),
        if vrpo {
            "loss"
        } else {
            "loss (nats / token bound)"
        },
        max_step,
        (lo, hi),
    )?;
    chart
        .draw_series(LineSeries::new(
            train.iter().map(|t| (t.0, t.1)),
            RGBColor(180, 200, 230),
        ))
        .map_err(plot_err)?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(180, 200, 230)));
    chart
        .draw_series(LineSeries::new(ema, BLUE.stroke_width(2)))
        .map_err(plot_err)?
        .label("train loss (EMA)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))
            .map_err(plot_err)?
            .label(if vrpo {
                "held-out loss"
            } else {
                "held-out bound"
            })
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .draw_series(eval.iter().map(|&p| Circle::new(p, 3, RED.filled())))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    let lr_max = train.iter().map(|t| t.2).fold(0f64, f64::max).max(1e-12);
    let mut lr_chart = ChartBuilder::on(&bottom)
        .caption("learning rate", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_step, 0f64..lr_max * 1.05)
        .map_err(plot_err)?;
    lr_chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("lr")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    lr_chart
        .draw_series(LineSeries::new(
            train.iter().map(|t| (t.0, t.2)),
            GREEN.stroke_width(2),
        ))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// VRPO's reward margin (training EMA and held-out; left axis) and held-out reward accuracy
/// (right axis, 0 to 1) on `area`.
fn reward_chart(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    (train, eval): &super::trainer::RewardCurves,
    max_step: f64,
) -> Result<()> {
    let mut ema = Vec::with_capacity(train.len());
    let mut e = train.first().map_or(0.0, |t| t.1);
    for &(s, m, _) in train {
        e = 0.9 * e + 0.1 * m;
        ema.push((s, e));
    }
    let values = ema.iter().map(|t| t.1).chain(eval.iter().map(|t| t.1));
    let (lo, hi) = values.fold((0f64, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "VRPO: reward margin β·Δ(log-ratio) and held-out reward accuracy",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad))
        .map_err(plot_err)?
        .set_secondary_coord(0f64..max_step, 0f64..1.0);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("reward margin")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    chart
        .configure_secondary_axes()
        .y_desc("reward accuracy")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(LineSeries::new(ema, BLUE.stroke_width(2)))
        .map_err(plot_err)?
        .label("train margin (EMA)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(
                eval.iter().map(|t| (t.0, t.1)),
                RED.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label("held-out margin")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .draw_secondary_series(LineSeries::new(
                eval.iter().map(|t| (t.0, t.2)),
                GREEN.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label("held-out reward accuracy (right axis)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// Draws the training loss (EMA) and held-out bound of several runs on one chart (e.g. an f32
/// and a bf16 run on the same data), each labelled with its folder name, into `out` (PNG).
pub fn plot_compare(runs: &[&Path], out: &Path) -> Result<()> {
    register_font();
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let mut curves = Vec::new();
    for r in runs {
        let (train, eval) = read_metrics(r)?;
        if train.is_empty() {
            return Err(Error::setting(
                "run",
                r.display(),
                "metrics.jsonl has no training steps yet",
            ));
        }
        let mut e = train[0].1;
        let ema: Vec<(f64, f64)> = train
            .iter()
            .map(|&(s, l, _)| {
                e = 0.9 * e + 0.1 * l;
                (s, e)
            })
            .collect();
        let name = r
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| r.display().to_string());
        curves.push((name, ema, eval));
    }
    let pts = || {
        curves
            .iter()
            .flat_map(|(_, t, e)| t.iter().chain(e.iter()).copied())
    };
    let max_step = pts().map(|p| p.0).fold(1.0, f64::max);
    let lo = pts().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = pts().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let root = BitMapBackend::new(out, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = loss_chart(
        &root,
        "training loss (EMA) and held-out bound".into(),
        "loss (nats / token bound)",
        max_step,
        (lo, hi),
    )?;
    for (i, (name, ema, eval)) in curves.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(ema.iter().copied(), c.stroke_width(2)))
            .map_err(plot_err)?
            .label(format!("{name}: train loss (EMA)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        if !eval.is_empty() {
            chart
                .draw_series(eval.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(plot_err)?
                .label(format!("{name}: held-out bound"))
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}
