//! SVG plots (`--plot-dir`): ITL over time with long-prompt arrivals marked, CDFs of TTFT and ITL, and for a sweep
//! the metrics against the rate. SVG only: text is left to the viewer's fonts, so no font files are needed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::report::{Run, rate_label};
use crate::runner::RequestRecord;
use crate::stats::percentile;

/// Time bins of the ITL-over-time plot.
const TIME_BINS: usize = 400;
/// Steps per CDF line at most, so a run of a million gaps still makes a small file.
const CDF_STEPS_MAX: usize = 2000;
const SIZE: (u32, u32) = (1100, 550);
/// Line colours, distinct on white (Tableau 10).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Writes every plot for `runs` into `dir`; returns the files written.
pub fn write_all(dir: &Path, runs: &[Run], long_prompt_tokens: u32, sweep: bool) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    for run in runs {
        let path = dir.join(format!("itl_over_time_{}.svg", slug(run)));
        itl_over_time(&path, run, long_prompt_tokens).with_context(|| format!("plotting {}", path.display()))?;
        files.push(path);
    }
    let path = dir.join("ttft_cdf.svg");
    let ttft = runs.iter().map(|run| {
        (
            legend(run),
            run.requests
                .iter()
                .filter(|r| r.ok())
                .filter_map(|r| r.ttft_ms)
                .collect(),
        )
    });
    cdf(&path, "CDF of TTFT", "TTFT (ms)", ttft.collect()).with_context(|| format!("plotting {}", path.display()))?;
    files.push(path);
    let path = dir.join("itl_cdf.svg");
    let itl = runs.iter().map(|run| {
        (
            legend(run),
            run.requests
                .iter()
                .filter(|r| r.ok())
                .flat_map(|r| r.itl_ms.iter().copied())
                .collect(),
        )
    });
    cdf(&path, "CDF of ITL", "inter-token latency (ms)", itl.collect())
        .with_context(|| format!("plotting {}", path.display()))?;
    files.push(path);
    if sweep {
        let path = dir.join("vs_rate.svg");
        vs_rate(&path, runs).with_context(|| format!("plotting {}", path.display()))?;
        files.push(path);
        let path = dir.join("throughput_per_gpu_vs_per_user.svg");
        per_gpu_vs_per_user(&path, runs).with_context(|| format!("plotting {}", path.display()))?;
        files.push(path);
    }
    Ok(files)
}

fn legend(run: &Run) -> String {
    match run.rate {
        None => format!("{}, trace", run.target),
        Some(_) => format!("{} at {} req/s", run.target, rate_label(run.rate)),
    }
}

/// A file-name part for a run: its target's file stem and its rate.
fn slug(run: &Run) -> String {
    let stem = Path::new(&run.target)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned());
    let name = match stem {
        Some(stem) if !run.target.contains("://") => format!("{stem}_rate{}", rate_label(run.rate)),
        _ => format!("rate{}", rate_label(run.rate)),
    };
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// (time the gap ended, gap) for every gap of every successful request, in seconds from the run's start and ms.
pub fn gap_times(records: &[RequestRecord]) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    for record in records.iter().filter(|r| r.ok()) {
        let Some(ttft_ms) = record.ttft_ms else { continue };
        let mut t_ms = record.sent_s * 1e3 + ttft_ms;
        for &gap in &record.itl_ms {
            t_ms += gap;
            points.push((t_ms / 1e3, gap));
        }
    }
    points
}

fn itl_over_time(path: &Path, run: &Run, long_prompt_tokens: u32) -> Result<()> {
    let points = gap_times(&run.requests);
    let t_max = points
        .iter()
        .map(|p| p.0)
        .fold(run.summary.duration_s, f64::max)
        .max(1e-3);
    let bin_s = t_max / TIME_BINS as f64;
    let mut bins: Vec<Vec<f64>> = vec![Vec::new(); TIME_BINS];
    for &(t, gap) in &points {
        bins[((t / bin_s) as usize).min(TIME_BINS - 1)].push(gap);
    }
    let (mut p50, mut max) = (Vec::new(), Vec::new());
    for (i, bin) in bins.iter_mut().enumerate().filter(|(_, b)| !b.is_empty()) {
        bin.sort_by(f64::total_cmp);
        let t = (i as f64 + 0.5) * bin_s;
        p50.push((t, percentile(bin, 50.0)));
        max.push((t, bin[bin.len() - 1]));
    }
    let long_arrivals: Vec<f64> = run
        .requests
        .iter()
        .filter(|r| r.prompt_tokens.unwrap_or(u64::from(r.input_len)) > u64::from(long_prompt_tokens))
        .map(|r| r.sent_s)
        .collect();
    let y_max = max.iter().map(|p| p.1).fold(1.0, f64::max) * 1.05;

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "ITL over time, {}: p50 and max per {:.0} ms bin; red: prompts over {long_prompt_tokens} tokens sent",
        legend(run),
        bin_s * 1e3
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc("inter-token latency (ms)")
        .draw()?;
    let marker = RED.mix(0.6);
    chart
        .draw_series(
            long_arrivals
                .iter()
                .map(|&t| PathElement::new(vec![(t, 0.0), (t, y_max)], marker)),
        )?
        .label(format!("long prompt sent ({})", long_arrivals.len()))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], marker));
    // Points, not lines: a line would bridge the bins with no tokens.
    chart
        .draw_series(max.into_iter().map(|p| Circle::new(p, 2, BLUE.mix(0.7).filled())))?
        .label("max")
        .legend(|(x, y)| Circle::new((x + 10, y), 2, BLUE.filled()));
    chart
        .draw_series(p50.into_iter().map(|p| Circle::new(p, 2, BLACK.filled())))?
        .label("p50")
        .legend(|(x, y)| Circle::new((x + 10, y), 2, BLACK.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Empirical CDFs as staircases, one per series (every sample up to `CDF_STEPS_MAX`, evenly spaced order statistics
/// past that); the x axis ends at the largest p99.9 so the body stays readable (the table has the max).
fn cdf(path: &Path, title: &str, x_desc: &str, series: Vec<(String, Vec<f64>)>) -> Result<()> {
    let mut lines = Vec::new();
    let mut x_max: f64 = 1e-3;
    for (name, mut values) in series {
        if values.is_empty() {
            continue;
        }
        values.sort_by(f64::total_cmp);
        x_max = x_max.max(percentile(&values, 99.9) * 1.05);
        lines.push((name, staircase(&values)));
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title} (x axis to the largest p99.9)"), ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("fraction at or below")
        .draw()?;
    for (i, (name, line)) in lines.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let clipped = line.into_iter().map(|(x, y)| (x.min(x_max), y));
        chart
            .draw_series(LineSeries::new(clipped, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The empirical CDF of sorted `values` as the corners of a staircase: at each kept order statistic x_(i), up from
/// i/n to (i+1)/n.
pub fn staircase(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len();
    let stride = n.div_ceil(CDF_STEPS_MAX).max(1);
    let mut corners = Vec::with_capacity(2 * n.div_ceil(stride) + 1);
    let mut below = 0; // the fraction reached so far is below / n
    for i in (stride - 1..n)
        .step_by(stride)
        .chain((!n.is_multiple_of(stride)).then_some(n - 1))
    {
        corners.push((sorted[i], below as f64 / n as f64));
        below = i + 1;
        corners.push((sorted[i], below as f64 / n as f64));
    }
    corners
}

/// The runs' targets, each once, in the order they ran.
fn targets(runs: &[Run]) -> Vec<&str> {
    let mut targets: Vec<&str> = Vec::new();
    for run in runs {
        if !targets.contains(&run.target.as_str()) {
            targets.push(&run.target);
        }
    }
    targets
}

/// Three panels against the rate: p99 TTFT, p99 ITL, and SLO attainment (or output tokens/s without SLOs); one line
/// per target.
fn vs_rate(path: &Path, runs: &[Run]) -> Result<()> {
    let targets = targets(runs);
    let with_slo = runs.iter().all(|r| r.summary.slo.is_some());
    type Metric = fn(&Run) -> Option<f64>;
    let panels: [(&str, Metric); 3] = [
        ("p99 TTFT (ms)", |r| r.summary.ttft_ms.as_ref().map(|p| p.p99)),
        ("p99 ITL (ms)", |r| r.summary.itl_ms.as_ref().map(|p| p.p99)),
        if with_slo {
            ("SLO attainment (%)", |r| {
                r.summary.slo.as_ref().map(|s| s.attainment * 100.0)
            })
        } else {
            ("output tokens/s", |r| Some(r.summary.output_tokens_per_s))
        },
    ];
    let finite_rates = runs.iter().filter_map(|r| r.rate).filter(|r| r.is_finite());
    let rate_max = finite_rates.fold(1e-3, f64::max) * 1.05;
    let root = SVGBackend::new(path, (SIZE.0, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((3, 1));
    for (area, (name, metric)) in areas.iter().zip(panels) {
        let y_max = runs.iter().filter_map(metric).fold(1e-3, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{name} against the request rate"), ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..rate_max, 0.0..y_max)?;
        chart.configure_mesh().x_desc("requests/s").y_desc(name).draw()?;
        for (i, target) in targets.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| r.target == *target)
                .filter_map(|r| Some((r.rate.filter(|x| x.is_finite())?, metric(r)?)))
                .collect();
            chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
            chart
                .draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled())))?
                .label(target.to_string())
                .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// The serving trade-off curve: output tokens/s per GPU against output tokens/s per user, one point per rate (its
/// label), one line per target. Up and to the right is better.
fn per_gpu_vs_per_user(path: &Path, runs: &[Run]) -> Result<()> {
    let targets = targets(runs);
    let point = |r: &Run| {
        (
            r.summary.output_tokens_per_s_per_user,
            r.summary.output_tokens_per_s_per_gpu,
        )
    };
    let x_max = runs.iter().map(|r| point(r).0).fold(1e-3, f64::max) * 1.1;
    let y_max = runs.iter().map(|r| point(r).1).fold(1e-3, f64::max) * 1.1;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Throughput per GPU against throughput per user", ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("output tokens/s per user (1000 / TPOT)")
        .y_desc("output tokens/s per GPU")
        .draw()?;
    for (i, target) in targets.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut on_target: Vec<&Run> = runs.iter().filter(|r| r.target == *target).collect();
        on_target.sort_by(|a, b| point(a).0.total_cmp(&point(b).0));
        chart.draw_series(LineSeries::new(
            on_target.iter().map(|r| point(r)),
            color.stroke_width(2),
        ))?;
        chart
            .draw_series(on_target.iter().map(|r| Circle::new(point(r), 3, color.filled())))?
            .label(target.to_string())
            .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
        chart.draw_series(on_target.iter().map(|r| {
            let label = format!("{} req/s", r.rate.map_or("trace".into(), |x| format!("{x}")));
            Text::new(label, point(r), ("sans-serif", 11).into_font())
        }))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staircase_steps_through_every_sample_or_evenly_spaced_ones() {
        assert_eq!(
            staircase(&[1.0, 2.0, 2.0]),
            vec![
                (1.0, 0.0),
                (1.0, 1.0 / 3.0),
                (2.0, 1.0 / 3.0),
                (2.0, 2.0 / 3.0),
                (2.0, 2.0 / 3.0),
                (2.0, 1.0)
            ]
        );
        let values: Vec<f64> = (0..10_001).map(f64::from).collect();
        let corners = staircase(&values);
        assert!(corners.len() <= 2 * CDF_STEPS_MAX + 2, "{}", corners.len());
        assert_eq!(*corners.last().unwrap(), (10_000.0, 1.0));
        assert!(
            corners.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1),
            "monotone"
        );
    }

    #[test]
    fn gap_times_place_each_gap_when_it_ended() {
        let record = RequestRecord {
            idx: 0,
            scheduled_s: 1.0,
            sent_s: 1.0,
            waited_for_slot: false,
            input_len: 1,
            output_len: 3,
            prompt_tokens: None,
            output_tokens: 3,
            ttft_ms: Some(100.0),
            tpot_ms: Some(15.0),
            e2e_ms: Some(130.0),
            itl_ms: vec![20.0, 10.0],
            error: None,
        };
        let failed = RequestRecord {
            error: Some("x".into()),
            ..record.clone()
        };
        let got = gap_times(&[record, failed]);
        assert_eq!(got.len(), 2);
        assert!((got[0].0 - 1.12).abs() < 1e-9 && got[0].1 == 20.0);
        assert!((got[1].0 - 1.13).abs() < 1e-9 && got[1].1 == 10.0);
    }
}
