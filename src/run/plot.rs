//! PNG line plots of logged metrics: one figure per metric with one line per tag (or per run),
//! drawn by plotters into a pixel buffer with the embedded DejaVu Sans font (no system fonts,
//! no fontconfig), and encoded with the `png` crate.

use super::metrics::{metric_names, series, Point};
use super::summary::{goal, Goal};
use crate::fsutil::write_bytes_atomic;
use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// Figure size in pixels.
const SIZE: (u32, u32) = (1000, 620);

/// Line colours (Tableau 10), in order.
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

/// What the horizontal axis counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    /// The step counter of each record.
    Step,
    /// The epoch counter of each record.
    Epoch,
    /// The record's position in its series (when neither counter moves).
    Index,
}

impl XAxis {
    /// The axis title.
    pub fn label(self) -> &'static str {
        match self {
            XAxis::Step => "step",
            XAxis::Epoch => "epoch",
            XAxis::Index => "record",
        }
    }

    /// Parses `step`, `epoch` or `record`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "step" => Ok(XAxis::Step),
            "epoch" => Ok(XAxis::Epoch),
            "record" | "index" => Ok(XAxis::Index),
            other => bail!("x axis `{other}`: expected step, epoch or record"),
        }
    }

    /// The x value of the `i`-th point.
    fn x(self, i: usize, p: &Point) -> f64 {
        match self {
            XAxis::Step => p.step as f64,
            XAxis::Epoch => p.epoch as f64,
            XAxis::Index => i as f64,
        }
    }
}

/// The finest counter that tells the points of every series apart: step when steps increase
/// within each series, else epoch, else the record index.
pub fn choose_x_axis<'a>(all: impl IntoIterator<Item = &'a [Point]> + Clone) -> XAxis {
    let increasing = |f: fn(&Point) -> u64| {
        all.clone().into_iter().all(|pts| pts.windows(2).all(|w| f(&w[0]) < f(&w[1])))
            && all.clone().into_iter().any(|pts| pts.iter().any(|p| f(p) > 0))
    };
    if increasing(|p| p.step) {
        XAxis::Step
    } else if increasing(|p| p.epoch) {
        XAxis::Epoch
    } else {
        XAxis::Index
    }
}

/// One line of a figure.
#[derive(Clone, Debug)]
pub struct Line {
    /// Its legend entry.
    pub label: String,
    /// Its points; non-finite values are skipped.
    pub points: Vec<(f64, f64)>,
}

/// A figure: lines over one pair of axes.
#[derive(Clone, Debug)]
pub struct Figure {
    /// Title above the plot.
    pub title: String,
    /// Horizontal axis title.
    pub x_label: String,
    /// Vertical axis title.
    pub y_label: String,
    /// The lines.
    pub lines: Vec<Line>,
    /// Where the legend goes: lower right for metrics that rise (accuracy), upper right for
    /// metrics that fall (loss).
    pub goal: Goal,
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans is a valid TrueType font; should it ever fail to parse, text is simply missing.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// A range covering `values` with a little margin (a unit range around a single value).
fn padded_range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let d = if hi == 0.0 { 0.5 } else { hi.abs() * 0.05 };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * pad;
    (lo - d, hi + d)
}

/// Draws `fig` into an RGB pixel buffer.
fn draw(fig: &Figure, buf: &mut [u8]) -> Result<()> {
    register_font();
    let lines: Vec<Line> = fig
        .lines
        .iter()
        .map(|l| Line {
            label: l.label.clone(),
            points: l.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect(),
        })
        .collect();
    let (x0, x1) = padded_range(lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)), 0.02);
    let (y0, y1) = padded_range(lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)), 0.06);
    let e = |e: &dyn std::fmt::Display| anyhow!("drawing the plot `{}`: {e}", fig.title);
    let root = BitMapBackend::with_buffer(buf, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&fig.title, ("sans-serif", 30))
        .margin(24)
        .x_label_area_size(60)
        .y_label_area_size(90)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(&fig.x_label)
        .y_desc(&fig.y_label)
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 22))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(205, 205, 205))
        .x_label_formatter(&|v| format_tick(*v))
        .y_label_formatter(&|v| format_tick(*v))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, line) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dots = if line.points.len() <= 60 { 3 } else { 0 };
        chart
            .draw_series(LineSeries::new(line.points.iter().copied(), color.stroke_width(2)).point_size(dots))
            .map_err(|x| e(&x))?
            .label(line.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    if lines.iter().any(|l| !l.label.is_empty()) {
        let position = legend_corner(&lines, (x0, x1), (y0, y1), fig.goal);
        chart
            .configure_series_labels()
            .position(position)
            .margin(12)
            .label_font(("sans-serif", 20))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(160, 160, 160))
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// The corner where the legend covers the fewest points of the lines (sampled along each
/// segment); ties go to the right side, below for rising metrics and above for falling ones.
fn legend_corner(lines: &[Line], (x0, x1): (f64, f64), (y0, y1): (f64, f64), goal: Goal) -> SeriesLabelPosition {
    let longest = lines.iter().map(|l| l.label.chars().count()).max().unwrap_or(0) as f64;
    // The legend's size as a share of the plotting area (about 11 px per character at size 20).
    let w = ((longest * 11.0 + 70.0) / 860.0).min(0.9);
    let h = ((lines.len() as f64 * 26.0 + 20.0) / 480.0).min(0.9);
    let mut samples = Vec::new();
    for l in lines {
        for seg in l.points.windows(2) {
            for k in 0..=16 {
                let t = k as f64 / 16.0;
                samples.push((seg[0].0 + t * (seg[1].0 - seg[0].0), seg[0].1 + t * (seg[1].1 - seg[0].1)));
            }
        }
        if l.points.len() == 1 {
            samples.push(l.points[0]);
        }
    }
    let norm = |(x, y): (f64, f64)| ((x - x0) / (x1 - x0).max(1e-300), (y - y0) / (y1 - y0).max(1e-300));
    let covered = |right: bool, top: bool| {
        samples
            .iter()
            .map(|&p| norm(p))
            .filter(|&(x, y)| (if right { x >= 1.0 - w } else { x <= w }) && (if top { y >= 1.0 - h } else { y <= h }))
            .count()
    };
    let low_first = goal == Goal::Max;
    let order = [(true, !low_first), (true, low_first), (false, !low_first), (false, low_first)];
    let (right, top) = order.into_iter().min_by_key(|&(r, t)| covered(r, t)).unwrap_or((true, true));
    match (right, top) {
        (true, true) => SeriesLabelPosition::UpperRight,
        (true, false) => SeriesLabelPosition::LowerRight,
        (false, true) => SeriesLabelPosition::UpperLeft,
        (false, false) => SeriesLabelPosition::LowerLeft,
    }
}

/// A tick label: plain for ordinary numbers, scientific for very large or small ones.
fn format_tick(v: f64) -> String {
    let a = v.abs();
    // Ticks computed across zero come out as ±1e-16 or so: that is zero.
    if a < 1e-12 {
        "0".into()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{v:.1e}")
    } else if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Renders `fig` as a PNG file at `path`, atomically.
pub fn render_png(fig: &Figure, path: &Path) -> Result<()> {
    let (w, h) = SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    draw(fig, &mut buf)?;
    write_png(&buf, path)
}

/// Encodes an RGB buffer of [`SIZE`] as a PNG file at `path`, atomically.
fn write_png(buf: &[u8], path: &Path) -> Result<()> {
    let (w, h) = SIZE;
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("encoding the PNG")?;
        writer.write_image_data(buf).context("encoding the PNG")?;
    }
    write_bytes_atomic(path, &bytes)
}

/// Renders a heatmap of `values[j][i]` over (xs[i], ys[j]) as a PNG (a 2-D loss landscape):
/// blue for the lowest value, yellow for the highest, with a title naming the range.
pub fn render_heatmap_png(title: &str, xs: &[f64], ys: &[f64], values: &[Vec<f64>], path: &Path) -> Result<()> {
    register_font();
    let (w, h) = SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let finite = values.iter().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo, hi.max(lo + 1e-12)) } else { (0.0, 1.0) };
    let e = |e: &dyn std::fmt::Display| anyhow!("drawing the heatmap `{title}`: {e}");
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (x0, x1) = (xs.first().copied().unwrap_or(0.0), xs.last().copied().unwrap_or(1.0));
        let (y0, y1) = (ys.first().copied().unwrap_or(0.0), ys.last().copied().unwrap_or(1.0));
        let caption = format!("{title} (loss {} to {})", format_tick(lo), format_tick(hi));
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 26))
            .margin(24)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1.max(x0 + 1e-12), y0..y1.max(y0 + 1e-12))
            .map_err(|x| e(&x))?;
        chart.configure_mesh().label_style(("sans-serif", 18)).draw().map_err(|x| e(&x))?;
        let dx = if xs.len() > 1 { (x1 - x0) / (xs.len() - 1) as f64 } else { 1.0 };
        let dy = if ys.len() > 1 { (y1 - y0) / (ys.len() - 1) as f64 } else { 1.0 };
        let cells = ys.iter().enumerate().flat_map(|(j, &y)| {
            xs.iter().enumerate().map(move |(i, &x)| {
                let v = values.get(j).and_then(|r| r.get(i)).copied().unwrap_or(f64::NAN);
                let t = if v.is_finite() { ((v - lo) / (hi - lo)).clamp(0.0, 1.0) } else { 1.0 };
                // From dark blue (low) through green to yellow (high).
                let color = RGBColor((t * 250.0) as u8, (40.0 + t * 190.0) as u8, ((1.0 - t) * 160.0 + 40.0) as u8);
                Rectangle::new([(x - dx / 2.0, y - dy / 2.0), (x + dx / 2.0, y + dy / 2.0)], color.filled())
            })
        });
        chart.draw_series(cells).map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    write_png(&buf, path)
}

/// A file-name-safe version of a metric name.
pub fn file_stem(metric: &str) -> String {
    metric.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

impl Figure {
    /// A figure of one metric against `x`, titled by the metric.
    fn of_metric(metric: &str, x: XAxis, lines: Vec<Line>) -> Self {
        Self {
            title: metric.to_string(),
            x_label: x.label().into(),
            y_label: metric.to_string(),
            lines,
            goal: goal(metric),
        }
    }
}

/// The figure of `metric` over `records`, one line per tag (only the tags in `tags`, when given),
/// against `x` (chosen from the data when `None`). `None` when no record has the metric.
pub fn metric_figure(records: &[Value], metric: &str, tags: Option<&[String]>, x: Option<XAxis>) -> Option<Figure> {
    let all: Vec<(String, Vec<Point>)> =
        series(records, metric).into_iter().filter(|(t, _)| tags.is_none_or(|ts| ts.contains(t))).collect();
    if all.is_empty() {
        return None;
    }
    let x = x.unwrap_or_else(|| choose_x_axis(all.iter().map(|(_, p)| p.as_slice())));
    let lines = all
        .iter()
        .map(|(tag, pts)| Line {
            label: tag.clone(),
            points: pts.iter().enumerate().map(|(i, p)| (x.x(i, p), p.value)).collect(),
        })
        .collect();
    Some(Figure::of_metric(metric, x, lines))
}

/// Writes `<dir>/<metric>.png` for every numeric metric of `records`; returns the files written.
pub fn plot_all(records: &[Value], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for metric in metric_names(records) {
        if let Some(fig) = metric_figure(records, &metric, None, None) {
            let path = dir.join(format!("{}.png", file_stem(&metric)));
            render_png(&fig, &path)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// One run for [`compare_figure`]: its label and its records.
pub struct RunSeries {
    /// The legend label of the run.
    pub label: String,
    /// Its metric records.
    pub records: Vec<Value>,
}

/// One figure overlaying `metric` of several runs: a line per run (per run and tag when a run
/// logged the metric under several tags; per tag alone when there is one run).
pub fn compare_figure(runs: &[RunSeries], metric: &str, x: Option<XAxis>) -> Option<Figure> {
    type TagSeries = Vec<(String, Vec<Point>)>;
    let per_run: Vec<(&str, TagSeries)> = runs.iter().map(|r| (r.label.as_str(), series(&r.records, metric))).collect();
    let x = x.unwrap_or_else(|| choose_x_axis(per_run.iter().flat_map(|(_, s)| s.iter().map(|(_, p)| p.as_slice()))));
    let mut lines = Vec::new();
    for (label, tags) in &per_run {
        for (tag, pts) in tags {
            let label = match (runs.len(), tags.len()) {
                (1, _) => tag.clone(),
                (_, 1) => label.to_string(),
                _ => format!("{label}: {tag}"),
            };
            lines.push(Line { label, points: pts.iter().enumerate().map(|(i, p)| (x.x(i, p), p.value)).collect() });
        }
    }
    if lines.is_empty() {
        return None;
    }
    Some(Figure::of_metric(metric, x, lines))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn records() -> Vec<Value> {
        let mut r = Vec::new();
        for e in 1..=5u64 {
            r.push(json!({"tag": "sgd", "epoch": e, "step": e * 10, "accuracy": 0.5 + 0.05 * e as f64, "loss": 2.0 / e as f64}));
            r.push(json!({"tag": "sam", "epoch": e, "step": e * 10, "accuracy": 0.52 + 0.06 * e as f64}));
        }
        r
    }

    #[test]
    fn one_png_per_metric_with_a_line_per_tag() {
        let tmp = tempfile::tempdir().unwrap();
        let written = plot_all(&records(), tmp.path()).unwrap();
        let names: Vec<_> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["accuracy.png", "loss.png"]);
        let fig = metric_figure(&records(), "accuracy", None, None).unwrap();
        assert_eq!(fig.lines.len(), 2);
        assert_eq!(fig.x_label, "step");
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&written[0]).unwrap()));
        let info = decoder.read_info().unwrap();
        assert_eq!((info.info().width, info.info().height), SIZE);
    }

    #[test]
    fn the_axis_is_the_finest_counter_that_moves() {
        let p = |step, epoch| Point { step, epoch, value: 0.0 };
        assert_eq!(choose_x_axis([&[p(1, 0), p(2, 0)][..]]), XAxis::Step);
        assert_eq!(choose_x_axis([&[p(5, 1), p(5, 2)][..]]), XAxis::Epoch);
        assert_eq!(choose_x_axis([&[p(0, 0), p(0, 0)][..]]), XAxis::Index);
        assert_eq!(format_tick(0.25), "0.25");
        assert_eq!(format_tick(3.0), "3");
        assert_eq!(format_tick(1e-5), "1.0e-5");
        let rising = [Line { label: "a".into(), points: vec![(0.0, 0.0), (1.0, 1.0)] }];
        assert!(matches!(legend_corner(&rising, (0.0, 1.0), (0.0, 1.0), Goal::Max), SeriesLabelPosition::LowerRight));
        let ends_high = [Line { label: "a".into(), points: vec![(0.0, 0.0), (0.5, 0.0), (1.0, 1.0)] }];
        assert!(matches!(
            legend_corner(&ends_high, (0.0, 1.0), (0.0, 1.0), Goal::Min),
            SeriesLabelPosition::LowerRight
        ));
    }
}
