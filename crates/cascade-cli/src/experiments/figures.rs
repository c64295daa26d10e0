//! The figures of a grid: per dataset, the cost–accuracy curve beside the
//! paper's points, and the case analysis of one run (who answered over the stream).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::grid::{DatasetSpec, GridRun, RunKind};

/// A dataset's curve and case analysis, each as SVG and PNG, in `figures`.
pub(super) fn draw_dataset(
    figures: &Path,
    dataset: &str,
    runs: &[&GridRun],
    paper: Option<&DatasetSpec>,
) -> Result<()> {
    let curve = figures.join(format!("{dataset}-curve"));
    let case = figures.join(format!("{dataset}-case"));
    let (svg, png) = (curve.with_extension("svg"), curve.with_extension("png"));
    draw_curve(
        SVGBackend::new(&svg, CURVE_SIZE).into_drawing_area(),
        dataset,
        runs,
        paper,
    )?;
    draw_curve(
        BitMapBackend::new(&png, CURVE_SIZE).into_drawing_area(),
        dataset,
        runs,
        paper,
    )?;
    if let Some(run) = case_run(runs) {
        let (svg, png) = (case.with_extension("svg"), case.with_extension("png"));
        draw_case(
            SVGBackend::new(&svg, CASE_SIZE).into_drawing_area(),
            dataset,
            run,
        )?;
        draw_case(
            BitMapBackend::new(&png, CASE_SIZE).into_drawing_area(),
            dataset,
            run,
        )?;
    }
    Ok(())
}

/// The middle-budget cascade run (the paper's case analysis shows one run).
fn case_run<'a>(runs: &[&'a GridRun]) -> Option<&'a GridRun> {
    let cascades: Vec<&GridRun> = runs
        .iter()
        .copied()
        .filter(|r| {
            r.kind == RunKind::Cascade && r.report.seed.is_none() && !r.report.timeline.is_empty()
        })
        .collect();
    cascades.get(cascades.len() / 2).copied()
}

/// Registers the figures' font: the one `scripts/setup.sh` fetches, or a
/// system DejaVu Sans.
pub(super) fn register_font() -> Result<PathBuf> {
    let models = std::env::var_os("CASCADE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"));
    let candidates = [
        models.join("fonts/OpenSans-Regular.ttf"),
        PathBuf::from("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    ];
    let path = candidates.iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "no font for the figures at {}; run scripts/setup.sh font",
            candidates[0].display()
        )
    })?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    // plotters keeps fonts for the process's lifetime.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable font", path.display()))?;
    Ok(path.clone())
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws the legend and writes the figure.
fn finish<'a, DB: DrawingBackend + 'a>(
    mut chart: Chart<'a, DB>,
    root: DrawingArea<DB, Shift>,
    legend: SeriesLabelPosition,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(legend)
        .draw()?;
    root.present()?;
    Ok(())
}

const CURVE_SIZE: (u32, u32) = (900, 560);
const CASE_SIZE: (u32, u32) = (900, 480);

/// Accuracy against LLM calls: our runs by kind, the LLM alone, and the
/// paper's points where they apply.
fn draw_curve<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    dataset: &str,
    runs: &[&GridRun],
    paper: Option<&DatasetSpec>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let point = |r: &GridRun| {
        r.report
            .summary
            .accuracy
            .map(|a| (r.report.total_llm_calls() as f64, 100.0 * a))
    };
    let paper: Vec<(f64, f64)> = paper
        .iter()
        .flat_map(|g| {
            g.budgets
                .iter()
                .zip(g.paper_accuracy)
                .map(|(&b, a)| (b as f64, a))
        })
        .collect();
    let all: Vec<(f64, f64)> = runs
        .iter()
        .filter_map(|r| point(r))
        .chain(paper.clone())
        .collect();
    let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let y_min = all.iter().map(|p| p.1).fold(100.0, f64::min);
    let y_max = all.iter().map(|p| p.1).fold(0.0, f64::max);
    let pad = ((y_max - y_min) * 0.08).max(0.5);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{dataset}: accuracy against LLM calls"),
            ("sans-serif", 24),
        )
        .margin(14)
        .x_label_area_size(42)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))?;
    chart
        .configure_mesh()
        .x_desc("LLM calls")
        .y_desc("accuracy (%)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    // The paper's points first, so ours are drawn over them.
    if !paper.is_empty() {
        chart
            .draw_series(paper.iter().map(|&p| Cross::new(p, 7, RED.stroke_width(3))))?
            .label("paper (GPT-3.5, BERT-base)")
            .legend(|(x, y)| Cross::new((x + 10, y), 6, RED.stroke_width(3)));
    }
    let kinds = [
        RunKind::Cascade,
        RunKind::PaperRules,
        RunKind::Larger,
        RunKind::MuSweep,
        RunKind::DistilledLr,
        RunKind::DistilledTransformer,
        RunKind::OnlineEnsemble,
        RunKind::Shift,
    ];
    for (i, kind) in kinds.into_iter().enumerate() {
        let mut points: Vec<(f64, f64)> = runs
            .iter()
            // One seed per cell: the config's own.
            .filter(|r| r.kind == kind && r.report.seed.is_none())
            .filter_map(|r| point(r))
            .collect();
        if points.is_empty() {
            continue;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(kind.label())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    if let Some(llm) = runs
        .iter()
        .find(|r| r.kind == RunKind::LlmOnly)
        .and_then(|r| point(r))
    {
        chart
            .draw_series(std::iter::once(TriangleMarker::new(llm, 7, BLACK.filled())))?
            .label("LLM only")
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, BLACK.filled()));
    }
    finish(chart, root, SeriesLabelPosition::LowerRight)
}

/// The paper's case analysis: who answered in each window of the stream
/// (stacked shares) and the running accuracy.
fn draw_case<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    dataset: &str,
    run: &GridRun,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let timeline = &run.report.timeline;
    let names: Vec<&str> = run
        .report
        .summary
        .per_level
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    let x_max = timeline.last().map_or(1, |w| w.end) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{dataset}: who answered, {} LLM calls",
                run.report.total_llm_calls()
            ),
            ("sans-serif", 24),
        )
        .margin(14)
        .x_label_area_size(42)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..100.0)?;
    chart
        .configure_mesh()
        .x_desc("items of the stream")
        .y_desc("share of the window / running accuracy (%)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    // Stacked bands: each window is a bar from its start to its end.
    for (k, name) in names.iter().enumerate() {
        let color = if k + 1 == names.len() {
            RGBColor(150, 150, 150).to_rgba()
        } else {
            Palette99::pick(k).to_rgba()
        };
        let mut start = 0.0;
        let bars: Vec<Rectangle<(f64, f64)>> = timeline
            .iter()
            .map(|w| {
                let total = w.answered.iter().sum::<u64>().max(1) as f64;
                let below: u64 = w.answered[..k].iter().sum();
                let lo = 100.0 * below as f64 / total;
                let hi = lo + 100.0 * w.answered[k] as f64 / total;
                let rect =
                    Rectangle::new([(start, lo), (w.end as f64, hi)], color.mix(0.75).filled());
                start = w.end as f64;
                rect
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(format!("answered by {name}"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.filled()));
    }
    let accuracy: Vec<(f64, f64)> = timeline
        .iter()
        .filter_map(|w| w.running_accuracy.map(|a| (w.end as f64, 100.0 * a)))
        .collect();
    chart
        .draw_series(LineSeries::new(accuracy, BLACK.stroke_width(3)))?
        .label("running accuracy")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(3)));
    finish(chart, root, SeriesLabelPosition::LowerLeft)
}
