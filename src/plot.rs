//! Small, dependency-free SVG charts for the tuning commands and the run report.
//!
//! The output is a self-contained `<svg>` element (no scripts, no external fonts), so it can be
//! written as a file or inlined into an HTML page.
use std::fmt::Write;

/// Canvas size and margins, in SVG user units.
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 56.0;

/// Series colours (colour-blind safe, Okabe–Ito).
const PALETTE: [&str; 7] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
];

/// A named polyline.
pub type Series<'a> = (&'a str, Vec<(f64, f64)>);

/// A line chart: each series is drawn as a polyline with point markers; each marker is a
/// vertical dashed line at an x value with a label (e.g. the chosen knee).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    markers: &[(f64, &str)],
) -> String {
    let points = series.iter().flat_map(|(_, p)| p.iter().copied());
    let (x_range, y_range) = data_ranges(points, markers.iter().map(|m| m.0));
    let frame = Frame::new(x_range, y_range);
    let mut svg = frame.open(title, x_label, y_label);
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.2},{:.2}", frame.px(x), frame.py(y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for p in &path {
            let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                svg,
                r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>"#
            );
        }
        if series.len() > 1 {
            legend_entry(&mut svg, i, name, colour);
        }
    }
    for &(x, label) in markers {
        frame.vertical_marker(&mut svg, x, label);
    }
    svg.push_str("</svg>\n");
    svg
}

/// A named series of bar heights, one per category.
pub type Bars<'a> = (&'a str, Vec<f64>);

/// A grouped bar chart: one group per category, one bar per series in each group, a legend
/// when there are several series. Category labels are thinned out when there are many.
pub fn bar_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    categories: &[String],
    series: &[Bars<'_>],
) -> String {
    let n = categories.len().max(1) as f64;
    let heights = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite());
    let (lo, hi) = heights.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (_, y_range) = data_ranges([(0.0, lo), (0.0, hi)].into_iter(), std::iter::empty());
    let y_range = (if lo >= 0.0 { 0.0 } else { y_range.0 }, y_range.1);
    let frame = Frame::new((0.0, n), y_range);
    let mut svg = frame.open_with(title, x_label, y_label, false);
    let group = frame.px(1.0) - frame.px(0.0);
    let width = group * 0.8 / series.len().max(1) as f64;
    let base = frame.py(0.0_f64.clamp(y_range.0, y_range.1));
    for (s, (name, values)) in series.iter().enumerate() {
        let colour = PALETTE[s % PALETTE.len()];
        for (c, &v) in values.iter().enumerate().filter(|(_, v)| v.is_finite()) {
            let x = frame.px(c as f64) + group * 0.1 + width * s as f64;
            let y = frame.py(v);
            let _ = writeln!(
                svg,
                r#"<rect class="bar" x="{x:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{colour}"><title>{}: {}</title></rect>"#,
                y.min(base),
                width.max(0.5),
                (y - base).abs().max(0.5),
                escape(categories.get(c).map_or("", String::as_str)),
                tick_label(v)
            );
        }
        if series.len() > 1 {
            legend_entry(&mut svg, s, name, colour);
        }
    }
    category_labels(&mut svg, &frame, categories);
    svg.push_str("</svg>\n");
    svg
}

/// Labels under the groups of a categorical chart, thinned out when there are many.
fn category_labels(svg: &mut String, frame: &Frame, categories: &[String]) {
    let every = (categories.len() / 20).max(1);
    for (c, label) in categories.iter().enumerate().step_by(every) {
        let x = frame.px(c as f64 + 0.5);
        let y = frame.bottom() + 14.0;
        let _ = writeln!(
            svg,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="10" text-anchor="end" transform="rotate(-30 {x:.1} {y:.1})">{}</text>"#,
            escape(label)
        );
    }
}

/// A named series of (low, centre, high) values, one per category.
pub type Ranges<'a> = (&'a str, Vec<(f64, f64, f64)>);

/// A categorical dot-and-range chart: in each category's group, one dot per series at its
/// centre value with a vertical line from its low to its high value (e.g. the mean loss of a
/// selection and the range over seeds). The y axis spans the data, not zero.
pub fn range_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    categories: &[String],
    series: &[Ranges<'_>],
) -> String {
    let n = categories.len().max(1) as f64;
    let values = series
        .iter()
        .flat_map(|(_, v)| v.iter().flat_map(|&(lo, mid, hi)| [lo, mid, hi]))
        .map(|v| (0.0, v));
    let (_, y_range) = data_ranges(values, std::iter::empty());
    let frame = Frame::new((0.0, n), y_range);
    let mut svg = frame.open_with(title, x_label, y_label, false);
    let group = frame.px(1.0) - frame.px(0.0);
    let step = group * 0.8 / series.len().max(1) as f64;
    for (s, (name, values)) in series.iter().enumerate() {
        let colour = PALETTE[s % PALETTE.len()];
        for (c, &(lo, mid, hi)) in values.iter().enumerate() {
            if !(lo.is_finite() && mid.is_finite() && hi.is_finite()) {
                continue;
            }
            let x = frame.px(c as f64) + group * 0.1 + step * (s as f64 + 0.5);
            let _ = writeln!(
                svg,
                r#"<line class="range" x1="{x:.2}" y1="{:.2}" x2="{x:.2}" y2="{:.2}" stroke="{colour}" stroke-width="2"/><circle class="centre" cx="{x:.2}" cy="{:.2}" r="4" fill="{colour}"><title>{}: {} ({} to {})</title></circle>"#,
                frame.py(lo),
                frame.py(hi),
                frame.py(mid),
                escape(categories.get(c).map_or("", String::as_str)),
                tick_label(mid),
                tick_label(lo),
                tick_label(hi)
            );
        }
        if series.len() > 1 {
            legend_entry(&mut svg, s, name, colour);
        }
    }
    category_labels(&mut svg, &frame, categories);
    svg.push_str("</svg>\n");
    svg
}

/// A histogram of `values` in `bins` equal-width bins, with labelled vertical markers (e.g. a
/// threshold).
pub fn histogram(
    title: &str,
    x_label: &str,
    values: &[f64],
    bins: usize,
    markers: &[(f64, &str)],
) -> String {
    let bins = bins.max(1);
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let (x_range, _) = data_ranges(
        finite.iter().map(|&v| (v, 0.0)),
        markers.iter().map(|m| m.0),
    );
    let step = (x_range.1 - x_range.0) / bins as f64;
    let mut counts = vec![0u64; bins];
    for v in &finite {
        let b = (((v - x_range.0) / step) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let frame = Frame::new(x_range, (0.0, top * 1.05));
    let mut svg = frame.open(title, x_label, "documents");
    for (b, &count) in counts.iter().enumerate().filter(|(_, c)| **c > 0) {
        let x0 = frame.px(x_range.0 + step * b as f64);
        let x1 = frame.px(x_range.0 + step * (b + 1) as f64);
        let y = frame.py(count as f64);
        let _ = writeln!(
            svg,
            r##"<rect class="bar" x="{x0:.2}" y="{y:.2}" width="{:.2}" height="{:.2}" fill="{}" stroke="white" stroke-width="0.5"><title>{count}</title></rect>"##,
            (x1 - x0).max(0.5),
            (frame.bottom() - y).max(0.5),
            PALETTE[0]
        );
    }
    for &(x, label) in markers {
        frame.vertical_marker(&mut svg, x, label);
    }
    svg.push_str("</svg>\n");
    svg
}

fn legend_entry(svg: &mut String, i: usize, name: &str, colour: &str) {
    let ly = TOP + 14.0 + 16.0 * i as f64;
    let lx = WIDTH - RIGHT - 150.0;
    let _ = writeln!(
        svg,
        r#"<rect x="{lx}" y="{:.1}" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
        ly - 9.0,
        lx + 14.0,
        ly,
        escape(name)
    );
}

/// The extent of the data, padded so that no point sits on the frame, and never empty.
pub fn data_ranges(
    points: impl Iterator<Item = (f64, f64)>,
    extra_x: impl Iterator<Item = f64>,
) -> ((f64, f64), (f64, f64)) {
    let mut xs = (f64::INFINITY, f64::NEG_INFINITY);
    let mut ys = (f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        xs = (xs.0.min(x), xs.1.max(x));
        ys = (ys.0.min(y), ys.1.max(y));
    }
    for x in extra_x.filter(|x| x.is_finite()) {
        xs = (xs.0.min(x), xs.1.max(x));
    }
    (pad(xs), pad(ys))
}

fn pad((lo, hi): (f64, f64)) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let d = if lo.abs() > 1e-12 {
            lo.abs() * 0.1
        } else {
            1.0
        };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * 0.05;
    (lo - d, hi + d)
}

/// Axes, ticks and labels of one chart, and the data-to-pixel mapping.
pub struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    pub fn new(x: (f64, f64), y: (f64, f64)) -> Frame {
        Frame { x, y }
    }

    pub fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x.0) / (self.x.1 - self.x.0) * (WIDTH - LEFT - RIGHT)
    }

    pub fn py(&self, y: f64) -> f64 {
        HEIGHT - BOTTOM - (y - self.y.0) / (self.y.1 - self.y.0) * (HEIGHT - TOP - BOTTOM)
    }

    /// The plot's bottom edge in pixels (the baseline of bars).
    pub fn bottom(&self) -> f64 {
        HEIGHT - BOTTOM
    }

    /// Opens the `<svg>` element and draws the frame, ticks, title and axis labels.
    pub fn open(&self, title: &str, x_label: &str, y_label: &str) -> String {
        self.open_with(title, x_label, y_label, true)
    }

    /// As `open`; without numeric x ticks when `x_ticks` is false (categorical charts draw
    /// their own labels).
    fn open_with(&self, title: &str, x_label: &str, y_label: &str, x_ticks: bool) -> String {
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif">"#
        );
        let _ = writeln!(
            svg,
            r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
            WIDTH / 2.0,
            escape(title)
        );
        let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM);
        let _ = writeln!(
            svg,
            r##"<rect x="{x0}" y="{y0}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/>"##,
            x1 - x0,
            y1 - y0
        );
        for t in ticks(self.x.0, self.x.1).into_iter().filter(|_| x_ticks) {
            let x = self.px(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{y1}" x2="{x:.1}" y2="{:.1}" stroke="#444"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
                y1 + 5.0,
                y1 + 18.0,
                tick_label(t)
            );
        }
        for t in ticks(self.y.0, self.y.1) {
            let y = self.py(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{x0}" y2="{y:.1}" stroke="#444"/><line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
                x0 - 5.0,
                x0 - 8.0,
                y + 4.0,
                tick_label(t)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">{}</text>"#,
            (x0 + x1) / 2.0,
            HEIGHT - 14.0,
            escape(x_label)
        );
        let _ = writeln!(
            svg,
            r#"<text x="16" y="{:.1}" font-size="13" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
            (y0 + y1) / 2.0,
            (y0 + y1) / 2.0,
            escape(y_label)
        );
        svg
    }

    /// A dashed vertical line at data x with a label at its top.
    pub fn vertical_marker(&self, svg: &mut String, x: f64, label: &str) {
        if !x.is_finite() {
            return;
        }
        let px = self.px(x);
        let _ = writeln!(
            svg,
            r##"<line class="marker" x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#D55E00" stroke-dasharray="5,4" stroke-width="1.5"/><text x="{:.1}" y="{:.1}" font-size="12" fill="#D55E00">{}</text>"##,
            HEIGHT - BOTTOM,
            px + 4.0,
            TOP + 14.0,
            escape(label)
        );
    }
}

/// About five round tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return vec![lo];
    }
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..)
        .map(|i| first + i as f64 * step)
        .take_while(|t| *t <= hi + step * 1e-9)
        .collect()
}

fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e6).contains(&a) {
        format!("{v:.1e}")
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Escapes text for SVG/HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Writes a tuning command's outputs into `dir` (created if missing): `NAME.svg` and the
/// report as pretty JSON in `NAME.json`.
pub fn write_chart_and_report<T: serde::Serialize>(
    dir: &std::path::Path,
    name: &str,
    svg: &str,
    report: &T,
) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let svg_path = dir.join(format!("{name}.svg"));
    std::fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;
    let json_path = dir.join(format!("{name}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_chart_draws_every_series_and_marker() {
        let a = ("wcss", vec![(1.0, 10.0), (2.0, 5.0), (4.0, 3.0)]);
        let b = ("other", vec![(1.0, 1.0), (4.0, 2.0)]);
        let svg = line_chart("WCSS <k>", "k", "WCSS", &[a, b], &[(2.0, "knee k=2")]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 5);
        assert_eq!(svg.matches(r#"class="marker""#).count(), 1);
        assert!(svg.contains("WCSS &lt;k&gt;"), "title is escaped");
    }

    #[test]
    fn points_land_inside_the_frame() {
        let f = Frame::new(pad((0.0, 10.0)), pad((-1.0, 1.0)));
        for (x, y) in [(0.0, -1.0), (10.0, 1.0), (5.0, 0.0)] {
            let (px, py) = (f.px(x), f.py(y));
            assert!((LEFT..=WIDTH - RIGHT).contains(&px), "x {x} -> {px}");
            assert!((TOP..=HEIGHT - BOTTOM).contains(&py), "y {y} -> {py}");
        }
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(0.013, 0.087);
        assert!(t.len() >= 3 && t.len() <= 7, "{t:?}");
        assert!(t.iter().all(|v| (0.013..=0.087).contains(v)));
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(1_000_000.0), "1.0e6");
    }

    #[test]
    fn bar_chart_draws_one_bar_per_value_and_labels() {
        let cats: Vec<String> = ["news", "tweets", "a<b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let svg = bar_chart(
            "mix",
            "source",
            "share",
            &cats,
            &[
                ("pool", vec![0.5, 0.3, 0.2]),
                ("selected", vec![0.7, 0.1, 0.2]),
            ],
        );
        assert_eq!(svg.matches(r#"class="bar""#).count(), 6);
        assert!(svg.contains("a&lt;b"));
        assert!(!svg.contains("NaN"));
        // Taller value, taller bar: heights are proportional from a zero baseline.
        let heights: Vec<f64> = svg
            .match_indices(r#"class="bar""#)
            .map(|(i, _)| {
                let rest = &svg[i..];
                let h = rest.split("height=\"").nth(1).unwrap();
                h[..h.find('"').unwrap()].parse().unwrap()
            })
            .collect();
        assert!(
            (heights[0] / heights[1] - 0.5 / 0.3).abs() < 0.01,
            "{heights:?}"
        );
    }

    #[test]
    fn range_chart_draws_a_dot_and_a_range_per_value() {
        let cats: Vec<String> = ["random", "quad"].iter().map(|s| s.to_string()).collect();
        let svg = range_chart(
            "loss",
            "selection",
            "nats/token",
            &cats,
            &[
                ("news", vec![(5.0, 5.1, 5.3), (4.8, 4.9, 5.0)]),
                ("other", vec![(6.0, 6.1, 6.2), (f64::NAN, 6.0, 6.1)]),
            ],
        );
        assert_eq!(svg.matches(r#"class="centre""#).count(), 3, "NaN skipped");
        assert_eq!(svg.matches(r#"class="range""#).count(), 3);
        assert!(!svg.contains("NaN"));
        // The higher value is drawn higher (smaller y).
        let cy: Vec<f64> = svg
            .match_indices(r#"cy=""#)
            .map(|(i, _)| {
                let rest = &svg[i + 4..];
                rest[..rest.find('"').unwrap()].parse().unwrap()
            })
            .collect();
        assert!(cy[0] > cy[2], "{cy:?}");
    }

    #[test]
    fn histogram_counts_every_value_and_marks_tau() {
        let values: Vec<f64> = (0..100).map(|i| i as f64 / 100.0).collect();
        let svg = histogram("influence", "I(z)", &values, 10, &[(0.25, "tau")]);
        let total: u64 = svg
            .match_indices("<title>")
            .map(|(i, _)| {
                let rest = &svg[i + 7..];
                rest[..rest.find('<').unwrap()].parse::<u64>().unwrap()
            })
            .sum();
        assert_eq!(total, 100);
        assert_eq!(svg.matches(r#"class="marker""#).count(), 1);
        let empty = histogram("h", "x", &[], 20, &[]);
        assert!(!empty.contains("NaN"));
    }

    #[test]
    fn degenerate_data_still_gives_a_frame() {
        let svg = line_chart("t", "x", "y", &[("s", vec![(3.0, 3.0)])], &[]);
        assert!(!svg.contains("NaN"));
        let empty = line_chart("t", "x", "y", &[], &[]);
        assert!(!empty.contains("NaN"));
    }
}
