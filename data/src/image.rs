//! A minimal RGB image and PNG output (for looking at decoded codes and samples).

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use crate::error::{DataError, Result};

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `height × width × 3` bytes.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// A `width × height` image filled with `fill`.
    pub fn new(width: usize, height: usize, fill: [u8; 3]) -> Self {
        let mut pixels = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            pixels.extend_from_slice(&fill);
        }
        RgbImage { width, height, pixels }
    }

    /// Pixel at column `x`, row `y`. Panics when out of bounds.
    pub fn get(&self, x: usize, y: usize) -> [u8; 3] {
        assert!(x < self.width && y < self.height, "pixel ({x}, {y}) out of bounds");
        let i = 3 * (y * self.width + x);
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Sets the pixel at column `x`, row `y`. Panics when out of bounds.
    pub fn put(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        assert!(x < self.width && y < self.height, "pixel ({x}, {y}) out of bounds");
        let i = 3 * (y * self.width + x);
        self.pixels[i..i + 3].copy_from_slice(&rgb);
    }

    /// Copies `src` with its top-left corner at (`x0`, `y0`), clipping at the edges.
    pub fn blit(&mut self, src: &RgbImage, x0: usize, y0: usize) {
        for y in 0..src.height.min(self.height.saturating_sub(y0)) {
            for x in 0..src.width.min(self.width.saturating_sub(x0)) {
                self.put(x0 + x, y0 + y, src.get(x, y));
            }
        }
    }

    /// Writes the image as an 8-bit RGB PNG.
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<()> {
        write_png(path.as_ref(), self)
    }
}

fn write_png(path: &Path, image: &RgbImage) -> Result<()> {
    let png_err = |e: png::EncodingError| DataError::Png { path: path.to_path_buf(), msg: e.to_string() };
    if image.width == 0 || image.height == 0 {
        return Err(DataError::Png { path: path.to_path_buf(), msg: "image has no pixels".into() });
    }
    let file = File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), image.width as u32, image.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(&image.pixels).map_err(png_err)?;
    writer.finish().map_err(png_err)
}

/// Gap between tiles in [`save_png_grid`], in pixels.
pub const GRID_GAP: usize = 2;
const GRID_GAP_COLOUR: [u8; 3] = [128, 128, 128];

/// Tiles `images` (row-major, `ceil(sqrt(n))` columns, a 2-pixel grey gap between tiles, each
/// tile the size of the largest image) and writes one PNG.
pub fn save_png_grid(images: &[RgbImage], path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    if images.is_empty() {
        return Err(DataError::InvalidArgument(format!("{}: no images to tile", path.display())));
    }
    let n = images.len();
    let cols = (1..=n).find(|c| c * c >= n).unwrap_or(n);
    let rows = n.div_ceil(cols);
    let tile_w = images.iter().map(|i| i.width).max().unwrap_or(0);
    let tile_h = images.iter().map(|i| i.height).max().unwrap_or(0);
    let mut canvas =
        RgbImage::new(cols * tile_w + (cols + 1) * GRID_GAP, rows * tile_h + (rows + 1) * GRID_GAP, GRID_GAP_COLOUR);
    for (k, img) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        canvas.blit(img, GRID_GAP + c * (tile_w + GRID_GAP), GRID_GAP + r * (tile_h + GRID_GAP));
    }
    write_png(path, &canvas)
}
