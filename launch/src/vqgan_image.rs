//! Pixels in and out of the VQGAN: image files read and prepared as dalle-mini's encoding
//! notebook prepares them (shorter side resized to the VQGAN's resolution with a Lanczos filter,
//! then a centred square crop, values in [0, 1]), decoded activations turned into 8-bit RGB
//! (clipped to [0, 1] as dalle-mini does), and sample grids with each prompt under its image.

use anyhow::{bail, Context, Result};
use dm_data::RgbImage;
use dm_model::vqgan::Activation;
use std::path::Path;

/// Width of a grid tile's caption strip at least, so short images still get readable captions.
const MIN_TILE_WIDTH: usize = 192;
/// Caption lines kept under each image (longer captions end in "...").
const CAPTION_LINES: usize = 3;
/// Pixels between tiles (and around the grid).
const GAP: usize = 4;
/// Pixels kept free at the right of each caption, so neighbouring captions never touch.
const CAPTION_MARGIN: usize = 12;
const BACKGROUND: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [20, 20, 20];

/// Reads an image file (any format the `image` crate was built with: PNG, JPEG) and prepares it
/// for a VQGAN of `resolution`.
pub fn load_image(path: &Path, resolution: usize) -> Result<Activation> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading {}", path.display()))?
        .decode()
        .with_context(|| format!("{}: not a readable PNG or JPEG image", path.display()))?;
    Ok(prepare(&img.to_rgb8(), resolution))
}

/// Shorter side resized to `resolution` (Lanczos3), centred square crop, RGB in [0, 1].
pub fn prepare(img: &image::RgbImage, resolution: usize) -> Activation {
    let (w, h) = (img.width().max(1) as f64, img.height().max(1) as f64);
    let r = resolution as f64;
    let scale = r / w.min(h);
    let (nw, nh) =
        (((w * scale).round() as u32).max(resolution as u32), ((h * scale).round() as u32).max(resolution as u32));
    let resized = image::imageops::resize(img, nw, nh, image::imageops::FilterType::Lanczos3);
    let (x0, y0) = ((nw - resolution as u32) / 2, (nh - resolution as u32) / 2);
    let crop = image::imageops::crop_imm(&resized, x0, y0, resolution as u32, resolution as u32).to_image();
    let data = crop.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Activation { side: resolution, channels: 3, data }
}

/// A decoded `[R, R, 3]` activation as 8-bit RGB, values clipped to [0, 1].
pub fn to_rgb(a: &Activation) -> Result<RgbImage> {
    if a.channels != 3 || a.data.len() != a.side * a.side * 3 {
        bail!("the VQGAN produced {} channels; an RGB image needs out_ch 3", a.channels);
    }
    let pixels = a.data.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    Ok(RgbImage { width: a.side, height: a.side, pixels })
}

/// Font scale of captions under tiles `tile_w` pixels wide.
pub fn caption_scale(tile_w: usize) -> i64 {
    (tile_w / 160).clamp(1, 4) as i64
}

/// `caption` word-wrapped into at most [`CAPTION_LINES`] lines that fit `width` pixels at `scale`.
pub fn caption_lines(caption: &str, width: usize, scale: i64) -> Vec<String> {
    let per_line = ((width as i64 + scale) / (6 * scale)).max(1) as usize;
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in caption.split_whitespace() {
        let mut word: String = word.chars().take(per_line).collect();
        if !current.is_empty() && current.chars().count() + 1 + word.chars().count() > per_line {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(&std::mem::take(&mut word));
    }
    if !current.is_empty() {
        lines.push(current);
    }
    if lines.len() > CAPTION_LINES {
        lines.truncate(CAPTION_LINES);
        let last = &mut lines[CAPTION_LINES - 1];
        let keep = per_line.saturating_sub(3);
        *last = last.chars().take(keep).collect::<String>() + "...";
    }
    lines
}

/// Geometry of a captioned grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridLayout {
    pub cols: usize,
    pub rows: usize,
    pub tile_w: usize,
    pub image_h: usize,
    /// Height of the caption strip under each image.
    pub caption_h: usize,
    pub scale: i64,
}

impl GridLayout {
    pub fn new(n: usize, image_w: usize, image_h: usize) -> Self {
        let cols = (1..=n.max(1)).find(|c| c * c >= n).unwrap_or(1);
        let tile_w = image_w.max(MIN_TILE_WIDTH);
        let scale = caption_scale(tile_w);
        let caption_h = CAPTION_LINES * 9 * scale as usize + GAP;
        GridLayout { cols, rows: n.div_ceil(cols).max(1), tile_w, image_h, caption_h, scale }
    }
    pub fn width(&self) -> usize {
        self.cols * self.tile_w + (self.cols + 1) * GAP
    }
    pub fn height(&self) -> usize {
        self.rows * (self.image_h + self.caption_h) + (self.rows + 1) * GAP
    }
    /// Width the caption lines wrap to.
    pub fn caption_width(&self) -> usize {
        self.tile_w - CAPTION_MARGIN
    }
    /// Top-left corner of tile `k` (its image; the caption strip starts `image_h` lower).
    pub fn origin(&self, k: usize) -> (usize, usize) {
        let (r, c) = (k / self.cols, k % self.cols);
        (GAP + c * (self.tile_w + GAP), GAP + r * (self.image_h + self.caption_h + GAP))
    }
}

/// Tiles `images` (row-major, `ceil(√n)` columns) with `captions[k]` written under image `k`
/// and writes one PNG. All images must have one size.
pub fn captioned_grid(images: &[RgbImage], captions: &[String], path: &Path) -> Result<GridLayout> {
    let Some(first) = images.first() else { bail!("{}: no images to tile", path.display()) };
    if captions.len() != images.len() || images.iter().any(|i| (i.width, i.height) != (first.width, first.height)) {
        bail!("{}: need one caption per image and images of one size", path.display());
    }
    let layout = GridLayout::new(images.len(), first.width, first.height);
    let mut canvas = RgbImage::new(layout.width(), layout.height(), BACKGROUND);
    for (k, (img, caption)) in images.iter().zip(captions).enumerate() {
        let (x0, y0) = layout.origin(k);
        canvas.blit(img, x0 + (layout.tile_w - img.width) / 2, y0);
        for (i, line) in caption_lines(caption, layout.caption_width(), layout.scale).iter().enumerate() {
            let y = y0 + layout.image_h + GAP / 2 + i * 9 * layout.scale as usize;
            let (w, h) = (canvas.width, canvas.height);
            crate::plot::draw_text(&mut canvas.pixels, w, h, x0 as i64, y as i64, line, layout.scale, INK);
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    canvas.save_png(path)?;
    Ok(layout)
}
