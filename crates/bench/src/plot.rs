//! The latency histogram as an SVG chart (plotters): log-scale counts per
//! 1 us bucket, guest and host series on one chart, KVM4NFV targets marked.

use plotters::prelude::*;

use crate::latency::{columns, LatencyReport, Metric};

fn e<E: std::fmt::Display>(err: E) -> String {
    err.to_string()
}

const COLORS: [RGBColor; 6] = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];

/// Renders the chart as SVG text.
pub fn latency_svg(r: &LatencyReport) -> Result<String, String> {
    let mut svg = String::new();
    {
        let cols = columns(r);
        let max_us = cols
            .iter()
            .flat_map(|(_, s)| s.buckets.last().map(|b| b.0))
            .max()
            .unwrap_or(1)
            .max(20)
            + 1;
        let max_count = cols
            .iter()
            .flat_map(|(_, s)| s.buckets.iter().map(|b| b.1))
            .max()
            .unwrap_or(1)
            .max(1)
            * 2;
        let root = SVGBackend::with_string(&mut svg, (1000, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "nfvisor latency ({}; period {} us)",
                    r.environment.kvm_label(),
                    r.period_us
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0u64..max_us, (1u64..max_count).log_scale())
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("latency (us, 1 us buckets)")
            .y_desc("samples (log)")
            .draw()
            .map_err(e)?;
        for (i, (name, s)) in cols.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                // points, not lines: empty buckets have no place on a log axis
                .draw_series(
                    s.buckets
                        .iter()
                        .map(|&(us, n)| Circle::new((us, n), 2, color.filled())),
                )
                .map_err(e)?
                .label(name.as_str())
                .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
        }
        let mut targets = Vec::new();
        if r.results.iter().any(|m| m.metric == Metric::Timer) {
            targets.push((5u64, "timer avg target 5 us"));
            targets.push((15u64, "timer max target 15 us"));
        }
        if r.results.iter().any(|m| m.metric == Metric::Irq) {
            targets.push((20u64, "interrupt max target 20 us"));
        }
        if r.results.iter().any(|m| m.metric == Metric::Preempt) {
            targets.push((20u64, "preemption per 1 ms target 20 us"));
        }
        for (us, label) in targets {
            chart
                .draw_series(LineSeries::new(
                    vec![(us, 1), (us, max_count - 1)],
                    BLACK.mix(0.5),
                ))
                .map_err(e)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}
