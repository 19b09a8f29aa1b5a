//! Line charts drawn on the server as inline SVG: no chart library, no script, no CDN. The
//! average of each bucket is the line, its min..max the band behind it; a gap in the data
//! (no bucket for more than two bucket widths) breaks the line instead of bridging it.

use std::fmt::Write as _;

use guardian_proto::v1::HistoryPoint;

use super::page::{esc, human};

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 170.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 10.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 22.0;

/// One chart: a metric over `[from_ms, to_ms]` in buckets of `resolution_seconds`.
#[derive(Debug)]
pub struct Chart<'a> {
    /// Catalogue name (`block_lag`), kept in `data-metric`.
    pub metric: &'a str,
    /// Heading.
    pub title: &'a str,
    /// Unit from the catalogue.
    pub unit: &'a str,
    /// Buckets, oldest first.
    pub points: &'a [HistoryPoint],
    /// Range start, Unix ms.
    pub from_ms: i64,
    /// Range end, Unix ms.
    pub to_ms: i64,
    /// Bucket width.
    pub resolution_seconds: u32,
}

fn fmt_coord(v: f64) -> String {
    format!("{v:.1}")
}

/// `HH:MM` for ranges up to a day, `MM-DD HH:MM` beyond.
fn time_label(unix_ms: i64, span_ms: i64) -> String {
    let text = crate::utc(unix_ms);
    if span_ms <= 86_400_000 {
        text[11..16].to_owned()
    } else {
        text[5..16].to_owned()
    }
}

impl Chart<'_> {
    /// The `<figure>` holding the chart, its caption and its SVG.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "<figure class=\"chart\" data-metric=\"{}\" data-points=\"{}\"><figcaption><b>{}</b>",
            esc(self.metric),
            self.points.len(),
            esc(self.title)
        );
        if let Some(last) = self.points.last() {
            let lo = self
                .points
                .iter()
                .map(|p| p.min)
                .fold(f64::INFINITY, f64::min);
            let hi = self
                .points
                .iter()
                .map(|p| p.max)
                .fold(f64::NEG_INFINITY, f64::max);
            let _ = write!(
                out,
                " <span class=\"muted\">now {} · range {} .. {}</span>",
                esc(&human(last.avg, self.unit)),
                esc(&human(lo, self.unit)),
                esc(&human(hi, self.unit))
            );
        }
        out.push_str("</figcaption>");
        let _ = write!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\">",
            esc(self.title)
        );
        out.push_str(&self.body());
        out.push_str("</svg></figure>");
        out
    }

    fn body(&self) -> String {
        let mut out = String::new();
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let _ = write!(
            out,
            "<rect class=\"frame\" x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#c8ccd2\"/>"
        );
        let span_ms = (self.to_ms - self.from_ms).max(1);
        for (x, anchor, at) in [
            (LEFT, "start", self.from_ms),
            (WIDTH - RIGHT, "end", self.to_ms),
        ] {
            let _ = write!(
                out,
                "<text x=\"{x}\" y=\"{}\" text-anchor=\"{anchor}\" font-size=\"11\" fill=\"#5b6470\">{}</text>",
                HEIGHT - 6.0,
                time_label(at, span_ms)
            );
        }
        let values = self
            .points
            .iter()
            .flat_map(|p| [p.min, p.max, p.avg])
            .filter(|v| v.is_finite());
        let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if !lo.is_finite() {
            let _ = write!(
                out,
                "<text class=\"empty\" x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"13\" fill=\"#5b6470\">no samples in this range</text>",
                LEFT + plot_w / 2.0,
                TOP + plot_h / 2.0
            );
            return out;
        }
        // Counts and percentages read best from zero.
        if lo > 0.0 {
            lo = 0.0;
        }
        if hi <= lo {
            hi = lo + 1.0;
        }
        let x_of = |ms: f64| LEFT + (ms - self.from_ms as f64) / span_ms as f64 * plot_w;
        let y_of = |v: f64| TOP + plot_h - (v - lo) / (hi - lo) * plot_h;
        for (value, y) in [
            (hi, TOP),
            (lo + (hi - lo) / 2.0, TOP + plot_h / 2.0),
            (lo, TOP + plot_h),
        ] {
            let _ = write!(
                out,
                "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#eceef1\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"11\" fill=\"#5b6470\">{}</text>",
                WIDTH - RIGHT,
                LEFT - 4.0,
                y + 4.0,
                esc(&human(value, self.unit))
            );
        }
        let width_ms = f64::from(self.resolution_seconds.max(1)) * 1000.0;
        for segment in segments(self.points, width_ms) {
            let centre = |p: &HistoryPoint| x_of(p.start_unix_ms as f64 + width_ms / 2.0);
            let top: Vec<String> = segment
                .iter()
                .map(|p| format!("{},{}", fmt_coord(centre(p)), fmt_coord(y_of(p.max))))
                .collect();
            let bottom: Vec<String> = segment
                .iter()
                .rev()
                .map(|p| format!("{},{}", fmt_coord(centre(p)), fmt_coord(y_of(p.min))))
                .collect();
            let _ = write!(
                out,
                "<polygon class=\"band\" points=\"{} {}\" fill=\"#2f6fdb\" fill-opacity=\"0.15\" stroke=\"none\"/>",
                top.join(" "),
                bottom.join(" ")
            );
            let line: Vec<String> = segment
                .iter()
                .map(|p| format!("{},{}", fmt_coord(centre(p)), fmt_coord(y_of(p.avg))))
                .collect();
            if line.len() == 1 {
                let (x, y) = (centre(segment[0]), y_of(segment[0].avg));
                let _ = write!(
                    out,
                    "<circle class=\"avg\" cx=\"{}\" cy=\"{}\" r=\"2.5\" fill=\"#2f6fdb\"/>",
                    fmt_coord(x),
                    fmt_coord(y)
                );
            } else {
                let _ = write!(
                    out,
                    "<polyline class=\"avg\" points=\"{}\" fill=\"none\" stroke=\"#2f6fdb\" stroke-width=\"1.6\"/>",
                    line.join(" ")
                );
            }
        }
        out
    }
}

/// The points split where two neighbours are further apart than both two bucket widths and
/// three times the usual spacing of the series (a node sampled once a minute draws a line; an
/// outage among one-second samples leaves a gap).
fn segments(points: &[HistoryPoint], width_ms: f64) -> Vec<Vec<&HistoryPoint>> {
    let finite: Vec<&HistoryPoint> = points.iter().filter(|p| p.avg.is_finite()).collect();
    let mut spacings: Vec<i64> = finite
        .windows(2)
        .map(|pair| pair[1].start_unix_ms - pair[0].start_unix_ms)
        .collect();
    spacings.sort_unstable();
    let usual = spacings.get(spacings.len() / 2).copied().unwrap_or(0) as f64;
    let limit = (2.0 * width_ms).max(3.0 * usual);
    let mut out: Vec<Vec<&HistoryPoint>> = Vec::new();
    let mut previous: Option<i64> = None;
    for point in finite {
        let gap = previous.is_some_and(|at| (point.start_unix_ms - at) as f64 > limit);
        if gap || out.is_empty() {
            out.push(Vec::new());
        }
        if let Some(last) = out.last_mut() {
            last.push(point);
        }
        previous = Some(point.start_unix_ms);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(start_unix_ms: i64, avg: f64) -> HistoryPoint {
        HistoryPoint {
            start_unix_ms,
            avg,
            min: avg - 1.0,
            max: avg + 1.0,
            count: 1,
        }
    }

    #[test]
    fn a_gap_breaks_the_line_and_every_point_is_drawn() {
        // Every 10 s, then a minute of nothing.
        let points: Vec<HistoryPoint> = [0, 10_000, 20_000, 30_000, 90_000, 100_000]
            .into_iter()
            .map(|at| point(at, 5.0))
            .collect();
        let chart = Chart {
            metric: "peers",
            title: "Peers",
            unit: "peers",
            points: &points,
            from_ms: 0,
            to_ms: 110_000,
            resolution_seconds: 10,
        };
        let svg = chart.render();
        assert!(svg.contains("data-points=\"6\""), "{svg}");
        assert_eq!(svg.matches("<polyline class=\"avg\"").count(), 2, "{svg}");
        let first = svg
            .split("<polyline class=\"avg\" points=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("a line");
        assert_eq!(first.split(' ').count(), 4, "{first}");
    }

    #[test]
    fn no_points_say_so_instead_of_drawing_a_flat_line() {
        let chart = Chart {
            metric: "peers",
            title: "Peers",
            unit: "peers",
            points: &[],
            from_ms: 0,
            to_ms: 3_600_000,
            resolution_seconds: 10,
        };
        let svg = chart.render();
        assert!(svg.contains("no samples in this range"), "{svg}");
        assert!(!svg.contains("polyline"), "{svg}");
    }
}

#[cfg(test)]
mod spacing {
    use super::*;

    #[test]
    fn sparse_but_regular_samples_draw_one_line() {
        let points: Vec<HistoryPoint> = (0..10)
            .map(|i| HistoryPoint {
                start_unix_ms: i * 60_000,
                avg: 1.0,
                min: 1.0,
                max: 1.0,
                count: 1,
            })
            .collect();
        assert_eq!(segments(&points, 10_000.0).len(), 1);
    }
}
