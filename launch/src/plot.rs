//! Small, self-contained line charts for training curves.
//!
//! A [`Chart`] holds named [`Series`] (e.g. training and eval loss against step) and dashed horizontal reference
//! lines (e.g. a unigram baseline). Both outputs draw the same picture: a title, a framed plot area with light grid
//! lines, "nice" ticks (1-2-5 steps) with numeric labels, axis labels, the curves and a legend in the top-right corner
//! with a colour swatch and the name of every curve and reference line.
//!
//! * [`write_svg`] writes an 800×500 SVG; its text uses the viewer's sans-serif font.
//! * [`write_png`] rasterises here: anti-aliased lines on a white background, text drawn from an embedded 5×7 bitmap
//!   font (so no system fonts are needed), scaled up for large images.
//!
//! Non-finite points are skipped and break a curve; a lone finite point is drawn as a dot; an empty chart still draws
//! its frame. The x axis spans exactly [min x, max x]; the y axis covers every point and reference line, padded by 5 %
//! of its range on both sides.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;

/// One named curve; its points are joined in the order given.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub colour: [u8; 3],
}

/// A line chart. `hlines` are dashed horizontal reference lines `(name, y, colour)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub hlines: Vec<(String, f64, [u8; 3])>,
}

/// Writes `chart` as an 800×500 SVG document.
pub fn write_svg(chart: &Chart, path: &Path) -> io::Result<()> {
    std::fs::write(path, svg_string(chart))
}

/// Writes `chart` as a `width`×`height` 8-bit RGB PNG.
pub fn write_png(chart: &Chart, path: &Path, width: u32, height: u32) -> io::Result<()> {
    if width == 0 || height == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "plot: image size must be non-zero"));
    }
    let rgb = rasterise(chart, width, height);
    let mut encoder = png::Encoder::new(BufWriter::new(File::create(path)?), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(io::Error::other)?;
    writer.write_image_data(&rgb).map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)
}

/// Sizes, in output pixels, that the layout depends on.
struct Metrics {
    /// Advance and height of one character of tick-label text.
    cw: f64,
    ch: f64,
    title_h: f64,
    tick: f64,
    pad: f64,
}

/// The plot rectangle (`l`, `t`, `r`, `b` in pixels), the data ranges it maps and the labelled ticks.
struct Frame {
    l: f64,
    t: f64,
    r: f64,
    b: f64,
    x: (f64, f64),
    y: (f64, f64),
    xt: Vec<(f64, String)>,
    yt: Vec<(f64, String)>,
}

impl Frame {
    fn new(chart: &Chart, w: f64, h: f64, m: &Metrics) -> Frame {
        let (x, y) = ranges(chart);
        let t = (m.pad + if chart.title.is_empty() { 0.0 } else { m.title_h + m.pad }).round();
        let x_label = if chart.x_label.is_empty() { 0.0 } else { m.ch * 1.8 };
        let b = (h - m.pad - x_label - m.ch * 1.5 - m.tick).round().max(t + 1.0);
        let yt = ticks(y, ((b - t) / (m.ch * 5.0)).max(2.0));
        let label_w = yt.iter().map(|(_, s)| s.chars().count()).max().unwrap_or(1) as f64 * m.cw;
        let y_label = if chart.y_label.is_empty() { 0.0 } else { m.ch * 1.8 };
        let l = (m.pad + y_label + label_w + m.cw * 0.5 + m.tick).round();
        // Leave room for half the widest x tick label to the right of the plot area.
        let x_ticks = |r: f64| ticks(x, ((r - l) / (m.cw * 13.0)).max(2.0));
        let half_label = |t: &[(f64, String)]| t.iter().map(|(_, s)| s.len()).max().unwrap_or(0) as f64 * m.cw / 2.0;
        let r = (w - m.pad - m.cw * 2.0).round().max(l + 1.0);
        let r = (w - m.pad.max(half_label(&x_ticks(r)) + 2.0)).round().max(l + 1.0);
        let xt = x_ticks(r);
        Frame { l, t, r, b, x, y, xt, yt }
    }

    fn px(&self, x: f64) -> f64 {
        self.l + (x - self.x.0) / (self.x.1 - self.x.0) * (self.r - self.l)
    }

    fn py(&self, y: f64) -> f64 {
        self.b - (y - self.y.0) / (self.y.1 - self.y.0) * (self.b - self.t)
    }

    /// Each series' runs of consecutive finite points, in pixels, with the series' colour.
    fn runs<'a>(&'a self, chart: &'a Chart) -> impl Iterator<Item = (Vec<(f64, f64)>, [u8; 3])> + 'a {
        chart.series.iter().flat_map(move |s| {
            s.points
                .split(|(x, y)| !(x.is_finite() && y.is_finite()))
                .filter(|run| !run.is_empty())
                .map(move |run| (run.iter().map(|&(x, y)| (self.px(x), self.py(y))).collect(), s.colour))
        })
    }
}

/// Data ranges: x exactly spans the finite points, y also covers the reference lines and is padded.
fn ranges(chart: &Chart) -> ((f64, f64), (f64, f64)) {
    let (mut x, mut y) = ((f64::INFINITY, f64::NEG_INFINITY), (f64::INFINITY, f64::NEG_INFINITY));
    let points = chart.series.iter().flat_map(|s| s.points.iter().copied());
    for (px, py) in points.filter(|(a, b)| a.is_finite() && b.is_finite()) {
        x = (x.0.min(px), x.1.max(px));
        y = (y.0.min(py), y.1.max(py));
    }
    for &(_, v, _) in chart.hlines.iter().filter(|h| h.1.is_finite()) {
        y = (y.0.min(v), y.1.max(v));
    }
    let widen = |(lo, hi): (f64, f64), frac: f64| match (lo <= hi, hi > lo) {
        (false, _) => (0.0, 1.0),
        (true, true) => (lo - (hi - lo) * frac, hi + (hi - lo) * frac),
        (true, false) if lo == 0.0 => (-1.0, 1.0),
        (true, false) => (lo - lo.abs() * 0.1, hi + lo.abs() * 0.1),
    };
    (widen(x, 0.0), widen(y, 0.05))
}

/// About `target` ticks over `[lo, hi]` at a 1-2-5 step, with their labels.
fn ticks((lo, hi): (f64, f64), target: f64) -> Vec<(f64, String)> {
    let raw = (hi - lo) / target;
    if !(raw.is_finite() && raw > 0.0) {
        return Vec::new();
    }
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag * (1.0 - 1e-9);
    let step = mag
        * if norm <= 1.0 {
            1.0
        } else if norm <= 2.0 {
            2.0
        } else if norm <= 5.0 {
            5.0
        } else {
            10.0
        };
    let first = (lo / step - 1e-9).ceil();
    (0..200)
        .map(|i| (first + i as f64) * step)
        .take_while(|&v| v <= hi + step * 1e-9)
        .map(|v| (v, tick_label(v, step)))
        .collect()
}

/// Formats a tick value with as many digits as the step needs; very large or small values as `2.5e6`, `1e-4`.
fn tick_label(v: f64, step: f64) -> String {
    if v.abs() < step * 1e-6 {
        return "0".into();
    }
    let step_exp = (step.log10() + 1e-9).floor() as i32;
    let exp = (v.abs().log10() + 1e-9).floor() as i32;
    if (-3..6).contains(&exp) {
        format!("{:.*}", (-step_exp).max(0) as usize, v)
    } else {
        format!("{:.*e}", (exp - step_exp).clamp(0, 6) as usize, v)
    }
}

/// The legend's entries: every series (solid) then every reference line (dashed).
fn legend(chart: &Chart) -> Vec<(&str, [u8; 3], bool)> {
    let series = chart.series.iter().map(|s| (s.name.as_str(), s.colour, false));
    series.chain(chart.hlines.iter().map(|(n, _, c)| (n.as_str(), *c, true))).collect()
}

fn svg_string(chart: &Chart) -> String {
    let (w, h) = (800.0, 500.0);
    let m = Metrics { cw: 7.0, ch: 12.0, title_h: 16.0, tick: 5.0, pad: 10.0 };
    let f = Frame::new(chart, w, h, &m);
    let hex = |c: [u8; 3]| format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let (pw, ph) = (f.r - f.l, f.b - f.t);
    let _ = writeln!(o, r#"<clipPath id="plot"><rect x="{}" y="{}" width="{pw}" height="{ph}"/></clipPath>"#, f.l, f.t);
    for (v, label) in &f.xt {
        let x = f.px(*v);
        let _ = writeln!(o, r##"<line x1="{x:.2}" y1="{}" x2="{x:.2}" y2="{}" stroke="#e0e0e0"/>"##, f.t, f.b);
        let _ = writeln!(o, r#"<line x1="{x:.2}" y1="{}" x2="{x:.2}" y2="{}" stroke="black"/>"#, f.b, f.b + m.tick);
        let y = f.b + m.tick + m.ch + 2.0;
        let _ = writeln!(o, r#"<text x="{x:.2}" y="{y}" text-anchor="middle">{}</text>"#, escape(label));
    }
    for (v, label) in &f.yt {
        let y = f.py(*v);
        let _ = writeln!(o, r##"<line x1="{}" y1="{y:.2}" x2="{}" y2="{y:.2}" stroke="#e0e0e0"/>"##, f.l, f.r);
        let _ = writeln!(o, r#"<line x1="{}" y1="{y:.2}" x2="{}" y2="{y:.2}" stroke="black"/>"#, f.l - m.tick, f.l);
        let (x, ty) = (f.l - m.tick - 3.0, y + 4.0);
        let _ = writeln!(o, r#"<text x="{x}" y="{ty:.2}" text-anchor="end">{}</text>"#, escape(label));
    }
    let _ = writeln!(o, r#"<g clip-path="url(#plot)" fill="none" stroke-width="1.5">"#);
    for (run, colour) in f.runs(chart) {
        if let [(x, y)] = run[..] {
            let _ = writeln!(o, r#"<circle cx="{x:.2}" cy="{y:.2}" r="2.5" fill="{}"/>"#, hex(colour));
        } else {
            let pts: Vec<String> = run.iter().map(|(x, y)| format!("{x:.2},{y:.2}")).collect();
            let _ = writeln!(o, r#"<polyline stroke="{}" points="{}"/>"#, hex(colour), pts.join(" "));
        }
    }
    for &(_, v, c) in chart.hlines.iter().filter(|h| h.1.is_finite()) {
        let y = f.py(v);
        let (l, r, c) = (f.l, f.r, hex(c));
        let _ = writeln!(o, r#"<line x1="{l}" y1="{y:.2}" x2="{r}" y2="{y:.2}" stroke="{c}" stroke-dasharray="8 5"/>"#);
    }
    let _ = writeln!(o, "</g>");
    let _ = writeln!(o, r#"<rect x="{}" y="{}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#, f.l, f.t);
    let entries = legend(chart);
    if !entries.is_empty() {
        let text_w = entries.iter().map(|e| e.0.chars().count()).max().unwrap_or(0) as f64 * m.cw;
        let (bw, bh) = (text_w + 44.0, entries.len() as f64 * 18.0 + 8.0);
        let (bx, by) = (f.r - bw - 10.0, f.t + 10.0);
        let _ = writeln!(o, r##"<rect x="{bx}" y="{by}" width="{bw}" height="{bh}" fill="white" stroke="#999999"/>"##);
        for (i, (name, colour, dashed)) in entries.into_iter().enumerate() {
            let y = by + 13.0 + i as f64 * 18.0;
            let dash = if dashed { r#" stroke-dasharray="6 3""# } else { "" };
            let (x1, x2, c) = (bx + 8.0, bx + 30.0, hex(colour));
            let _ = writeln!(
                o,
                r#"<line x1="{x1}" y1="{}" x2="{x2}" y2="{}" stroke="{c}" stroke-width="2"{dash}/>"#,
                y - 4.0,
                y - 4.0
            );
            let _ = writeln!(o, r#"<text x="{}" y="{y}">{}</text>"#, bx + 36.0, escape(name));
        }
    }
    let cx = (f.l + f.r) / 2.0;
    if !chart.title.is_empty() {
        let y = m.pad + m.title_h - 2.0;
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{y}" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
            w / 2.0,
            escape(&chart.title)
        );
    }
    if !chart.x_label.is_empty() {
        let _ =
            writeln!(o, r#"<text x="{cx}" y="{}" text-anchor="middle">{}</text>"#, h - m.pad, escape(&chart.x_label));
    }
    if !chart.y_label.is_empty() {
        let (x, y) = (m.pad + m.ch, (f.t + f.b) / 2.0);
        let label = escape(&chart.y_label);
        let _ =
            writeln!(o, r#"<text x="{x}" y="{y}" text-anchor="middle" transform="rotate(-90 {x} {y})">{label}</text>"#);
    }
    o.push_str("</svg>\n");
    o
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An RGB image being drawn; writes outside it are dropped.
struct Canvas {
    w: i64,
    h: i64,
    px: Vec<u8>,
}

impl Canvas {
    fn blend(&mut self, x: i64, y: i64, c: [u8; 3], a: f64) {
        if x < 0 || y < 0 || x >= self.w || y >= self.h {
            return;
        }
        let i = ((y * self.w + x) * 3) as usize;
        for (p, &c) in self.px[i..i + 3].iter_mut().zip(&c) {
            *p = (*p as f64 * (1.0 - a) + c as f64 * a).round() as u8;
        }
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
        for yy in y.max(0)..(y + h).min(self.h) {
            for xx in x.max(0)..(x + w).min(self.w) {
                self.blend(xx, yy, c, 1.0);
            }
        }
    }

    /// An anti-aliased segment `width` pixels wide (a dot when `a == b`), clipped to `clip` = [l, t, r, b].
    fn line(&mut self, a: (f64, f64), b: (f64, f64), width: f64, c: [u8; 3], clip: [f64; 4]) {
        let hw = width / 2.0;
        let x0 = (a.0.min(b.0) - hw - 1.0).max(clip[0]).floor() as i64;
        let x1 = (a.0.max(b.0) + hw + 1.0).min(clip[2]).ceil() as i64;
        let y0 = (a.1.min(b.1) - hw - 1.0).max(clip[1]).floor() as i64;
        let y1 = (a.1.max(b.1) + hw + 1.0).min(clip[3]).ceil() as i64;
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len2 = dx * dx + dy * dy;
        for y in y0..y1 {
            for x in x0..x1 {
                let (px, py) = (x as f64 + 0.5 - a.0, y as f64 + 0.5 - a.1);
                let t = if len2 > 0.0 { ((px * dx + py * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
                let d = ((px - t * dx).powi(2) + (py - t * dy).powi(2)).sqrt();
                let cover = (hw + 0.5 - d).clamp(0.0, 1.0);
                if cover > 0.0 {
                    self.blend(x, y, c, cover);
                }
            }
        }
    }

    /// A dashed horizontal line from `l` to `r` at height `y`.
    fn dashed(&mut self, (l, r): (f64, f64), y: f64, width: f64, dash: f64, c: [u8; 3], clip: [f64; 4]) {
        let mut x = l;
        while x < r {
            self.line((x, y), ((x + dash).min(r), y), width, c, clip);
            x += dash * 1.6;
        }
    }

    /// Text in the 5×7 font at `scale`; `(x, y)` is its top-left corner, or, when `vertical`, its bottom-left corner
    /// with the text turned to read upwards.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3], vertical: bool) {
        for (i, ch) in s.chars().enumerate() {
            let drop = if "gpqy".contains(ch) { 2 } else { 0 }; // descenders sit two rows lower
            for (r, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (u, v) = ((i as i64 * 6 + col) * scale, (r as i64 + drop) * scale);
                        let (px, py) = if vertical { (x + v, y - u - scale) } else { (x + u, y + v) };
                        self.rect(px, py, scale, scale, c);
                    }
                }
            }
        }
    }
}

/// Draws `s` in the 5×7 font at `scale` into a `width`×`height` RGB buffer, top-left corner at
/// (`x`, `y`), clipped at the edges (for captions under images).
#[allow(clippy::too_many_arguments)]
pub fn draw_text(rgb: &mut Vec<u8>, width: usize, height: usize, x: i64, y: i64, s: &str, scale: i64, colour: [u8; 3]) {
    let mut canvas = Canvas { w: width as i64, h: height as i64, px: std::mem::take(rgb) };
    canvas.text(x, y, s, scale, colour, false);
    *rgb = canvas.px;
}

/// Width in pixels of `s` drawn by [`draw_text`]; a line is `9 · scale` pixels high (descenders included).
pub fn text_width(s: &str, scale: i64) -> i64 {
    text_w(s, scale)
}

/// Width in pixels of `s` in the 5×7 font at `scale`.
fn text_w(s: &str, scale: i64) -> i64 {
    (s.chars().count() as i64 * 6 - 1).max(0) * scale
}

/// The PNG's font scale and layout sizes for a `width`×`height` image.
fn png_metrics(width: u32, height: u32) -> (i64, Metrics) {
    let s = (width.min(height) / 450).clamp(1, 8) as i64;
    let sf = s as f64;
    (s, Metrics { cw: 6.0 * sf, ch: 7.0 * sf, title_h: 14.0 * sf, tick: 4.0 * sf, pad: 8.0 * sf })
}

fn rasterise(chart: &Chart, width: u32, height: u32) -> Vec<u8> {
    const INK: [u8; 3] = [0, 0, 0];
    const GRID: [u8; 3] = [226, 226, 226];
    let (s, m) = png_metrics(width, height);
    let f = Frame::new(chart, width as f64, height as f64, &m);
    let (w, h) = (width as i64, height as i64);
    let mut c = Canvas { w, h, px: vec![255; (w * h * 3) as usize] };
    let (l, t, r, b, tick) = (f.l as i64, f.t as i64, f.r as i64, f.b as i64, m.tick as i64);
    for (v, label) in &f.xt {
        let x = f.px(*v).round() as i64;
        c.rect(x, t, 1, b - t, GRID);
        c.rect(x, b, 1, tick, INK);
        let tw = text_w(label, s);
        c.text((x - tw / 2).min(w - tw).max(0), b + tick + 3 * s, label, s, INK, false);
    }
    for (v, label) in &f.yt {
        let y = f.py(*v).round() as i64;
        c.rect(l, y, r - l, 1, GRID);
        c.rect(l - tick, y, tick, 1, INK);
        c.text(l - tick - 3 * s - text_w(label, s), y - 3 * s, label, s, INK, false);
    }
    let clip = [f.l, f.t, f.r, f.b];
    for (run, colour) in f.runs(chart) {
        if let [p] = run[..] {
            c.line(p, p, 5.0 * s as f64, colour, clip);
        }
        for seg in run.windows(2) {
            c.line(seg[0], seg[1], 1.5 * s as f64, colour, clip);
        }
    }
    for &(_, v, colour) in chart.hlines.iter().filter(|h| h.1.is_finite()) {
        c.dashed((f.l, f.r), f.py(v), 1.5 * s as f64, 8.0 * s as f64, colour, clip);
    }
    for (x, y, w, h) in [(l, t, r - l + 1, 1), (l, b, r - l + 1, 1), (l, t, 1, b - t + 1), (r, t, 1, b - t + 1)] {
        c.rect(x, y, w, h, INK);
    }
    let entries = legend(chart);
    if !entries.is_empty() {
        let (row, swatch) = (11 * s, 18 * s);
        let text = entries.iter().map(|e| text_w(e.0, s)).max().unwrap_or(0);
        let (bw, bh) = (text + swatch + 18 * s, entries.len() as i64 * row + 7 * s);
        let (bx, by) = (r - bw - 8 * s, t + 8 * s);
        c.rect(bx, by, bw, bh, [150; 3]);
        c.rect(bx + 1, by + 1, bw - 2, bh - 2, [255; 3]);
        for (i, (name, colour, dashed)) in entries.into_iter().enumerate() {
            let ty = by + 4 * s + i as i64 * row;
            let (x0, x1, y) = ((bx + 6 * s) as f64, (bx + 6 * s + swatch) as f64, ty as f64 + 3.5 * s as f64);
            let all = [0.0, 0.0, w as f64, h as f64];
            if dashed {
                c.dashed((x0, x1), y, 2.0 * s as f64, 5.0 * s as f64, colour, all);
            } else {
                c.line((x0, y), (x1, y), 2.0 * s as f64, colour, all);
            }
            c.text(bx + 12 * s + swatch, ty, name, s, INK, false);
        }
    }
    if !chart.title.is_empty() {
        let ts = if text_w(&chart.title, 2 * s) <= w - 2 * m.pad as i64 { 2 * s } else { s };
        c.text(((w - text_w(&chart.title, ts)) / 2).max(0), m.pad as i64, &chart.title, ts, INK, false);
    }
    if !chart.x_label.is_empty() {
        c.text(
            ((l + r - text_w(&chart.x_label, s)) / 2).max(0),
            h - m.pad as i64 - 7 * s,
            &chart.x_label,
            s,
            INK,
            false,
        );
    }
    if !chart.y_label.is_empty() {
        let y = ((t + b + text_w(&chart.y_label, s)) / 2).min(h);
        c.text(m.pad as i64, y, &chart.y_label, s, INK, true);
    }
    c.px
}

/// The 5×7 bitmap for `c` (rows top to bottom, bit 4 = leftmost column); `?` for characters the font lacks.
/// `g`, `p`, `q` and `y` are drawn two rows lower, so their bitmaps start at the x-height.
fn glyph(c: char) -> [u8; 7] {
    let find = |c: char| FONT.iter().find(|g| g.0 as char == c).map(|g| g.1);
    find(c).or_else(|| find('?')).unwrap_or([0; 7])
}

#[rustfmt::skip]
const FONT: &[(u8, [u8; 7])] = &[
    (b' ', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]), (b'?', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04]),
    (b'.', [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C]), (b',', [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08]),
    (b'-', [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00]), (b'+', [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00]),
    (b'_', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F]), (b':', [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00]),
    (b'/', [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00]), (b'=', [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00]),
    (b'(', [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02]), (b')', [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08]),
    (b'[', [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E]), (b']', [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E]),
    (b'%', [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03]), (b'*', [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00]),
    (b'\'', [0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00]), (b'#', [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A]),
    (b'0', [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E]), (b'1', [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    (b'2', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F]), (b'3', [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E]),
    (b'4', [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02]), (b'5', [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E]),
    (b'6', [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E]), (b'7', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08]),
    (b'8', [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E]), (b'9', [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C]),
    (b'A', [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11]), (b'B', [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E]),
    (b'C', [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E]), (b'D', [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C]),
    (b'E', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F]), (b'F', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10]),
    (b'G', [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F]), (b'H', [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11]),
    (b'I', [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]), (b'J', [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C]),
    (b'K', [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11]), (b'L', [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F]),
    (b'M', [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11]), (b'N', [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11]),
    (b'O', [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]), (b'P', [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10]),
    (b'Q', [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D]), (b'R', [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11]),
    (b'S', [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E]), (b'T', [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04]),
    (b'U', [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]), (b'V', [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04]),
    (b'W', [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A]), (b'X', [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11]),
    (b'Y', [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04]), (b'Z', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F]),
    (b'a', [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F]), (b'b', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E]),
    (b'c', [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E]), (b'd', [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F]),
    (b'e', [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E]), (b'f', [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08]),
    (b'g', [0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E]), (b'h', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11]),
    (b'i', [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E]), (b'j', [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C]),
    (b'k', [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12]), (b'l', [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    (b'm', [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11]), (b'n', [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11]),
    (b'o', [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E]), (b'p', [0x1E, 0x11, 0x11, 0x11, 0x1E, 0x10, 0x10]),
    (b'q', [0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x01]), (b'r', [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10]),
    (b's', [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E]), (b't', [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06]),
    (b'u', [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D]), (b'v', [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04]),
    (b'w', [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A]), (b'x', [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11]),
    (b'y', [0x11, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E]), (b'z', [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F]),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("dm_plot_{}_{name}", std::process::id()))
    }

    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let file = io::BufReader::new(File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight));
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn chart(series: Vec<Series>) -> Chart {
        let hlines = vec![("unigram baseline".to_string(), 0.5, [90, 90, 90])];
        Chart { title: "Loss".into(), x_label: "step".into(), y_label: "loss".into(), series, hlines }
    }

    #[test]
    fn png_has_requested_size_and_draws_the_series() {
        let colour = [200, 30, 150];
        let points = (0..=100).map(|i| (i as f64, i as f64 / 10.0)).collect();
        let c = chart(vec![Series { name: "train".into(), points, colour }]);
        let path = tmp("size.png");
        write_png(&c, &path, 640, 400).unwrap();
        let (w, h, px) = decode(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!((w, h), (640, 400));
        // The diagonal runs through the left half of the plot area, away from the legend in the top right.
        let f = Frame::new(&c, 640.0, 400.0, &png_metrics(640, 400).1);
        let (l, r, t, b) = (f.l as usize + 1, ((f.l + f.r) / 2.0) as usize, f.t as usize + 1, f.b as usize);
        let hits =
            (t..b).flat_map(|y| (l..r).map(move |x| (y * 640 + x) * 3)).filter(|&i| px[i..i + 3] == colour).count();
        assert!(hits > 50, "only {hits} pixels of the series colour in the plot area");
    }

    #[test]
    fn svg_is_well_formed_and_names_every_curve() {
        let train = Series { name: "train <loss>".into(), points: vec![(0.0, 3.0), (1.0, 2.0)], colour: [1, 2, 3] };
        let eval = Series { name: "eval".into(), points: vec![(0.5, 2.5)], colour: [4, 5, 6] };
        let path = tmp("plot.svg");
        write_svg(&chart(vec![train, eval]), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for needle in ["train &lt;loss&gt;", "eval", "unigram baseline", "<polyline", "<circle", "#010203"] {
            assert!(svg.contains(needle), "{needle} missing from the SVG");
        }
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }

    #[test]
    fn non_finite_empty_and_degenerate_input_do_not_panic() {
        let nan = f64::NAN;
        let points = vec![(0.0, 1.0), (1.0, nan), (2.0, f64::INFINITY), (nan, 2.0), (3.0, 0.5), (4.0, 0.25)];
        let cases = [
            chart(vec![Series { name: "odd".into(), points, colour: [255, 0, 0] }]),
            chart(vec![Series { name: "nothing".into(), points: vec![(nan, nan)], colour: [0, 0, 255] }]),
            chart(vec![Series { name: "one".into(), points: vec![(5.0, 5.0)], colour: [0, 0, 255] }]),
            Chart::default(),
        ];
        for (i, c) in cases.iter().enumerate() {
            for (w, h) in [(320, 200), (1600, 1000), (3, 2)] {
                let path = tmp(&format!("odd{i}_{w}.png"));
                write_png(c, &path, w, h).unwrap();
                assert_eq!(decode(&path).0, w);
                std::fs::remove_file(&path).unwrap();
            }
            let svg = svg_string(c);
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
        assert!(write_png(&Chart::default(), &tmp("zero.png"), 0, 10).is_err());
    }

    #[test]
    fn ticks_use_nice_steps_and_tidy_labels() {
        let labels = |r, n| ticks(r, n).into_iter().map(|t| t.1).collect::<Vec<_>>();
        assert_eq!(labels((0.0, 1.0), 5.0), ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(labels((13.0, 1013.0), 5.0), ["200", "400", "600", "800", "1000"]);
        assert_eq!(labels((-0.07, 0.12), 4.0), ["-0.05", "0", "0.05", "0.10"]);
        assert_eq!(labels((0.0, 3e6), 3.0), ["0", "1e6", "2e6", "3e6"]);
        assert_eq!(tick_label(2.5e-5, 5e-6), "2.5e-5");
    }
}
