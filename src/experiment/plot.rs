//! The experiment's chart.

use std::path::Path;

use super::ReversalReport;
use crate::error::{Error, Result};

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
