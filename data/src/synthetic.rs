//! A built-in, learnable text-to-image dataset: two coloured shapes in a spatial relation on a
//! coloured background, e.g. *"a red circle above a blue square on a yellow background"*.
//!
//! # Images and codebook
//!
//! An image is a `g × g` grid of codes (`g = sqrt(image_length)`, `image_length` a square
//! `≥ 16`). Each code indexes a built-in codebook of 8×8-pixel patches:
//! `code = colour × 16 + edges`, where `colour` is one of the 8 [`Colour`]s and `edges` a 4-bit
//! mask (1 top, 2 right, 4 bottom, 8 left) of the sides on which the neighbouring cell belongs
//! to another region (background, first object, second object); those sides get a 1-pixel
//! darker outline. So [`IMAGE_VOCAB`] = 128 codes, and a caption determines its image exactly.
//! [`decode_codes`] turns codes back into pixels.
//!
//! # Layout
//!
//! Each object fills an `s × s` box, `s` the largest odd number `≤ g/2 − 1` (7 for `g = 16`).
//! "above"/"below" put the first object's box in the top/bottom half (centred across), "to the
//! left of"/"to the right of" in the left/right half; the second object takes the other half.
//! Shapes are cell masks in the box: square (all cells), circle (a disc), triangle (apex up),
//! cross (a plus with bars about `s/3` wide). All four shapes differ from `g = 12` up; at
//! smaller grids some coincide (at `g = 4` every object is one cell).
//!
//! # Held-out combinations and splits
//!
//! From the seed, 4 (colour, shape) pairs are held out: 4 distinct object colours matched with
//! the 4 shapes in a random order, so every colour and every shape still occurs in training.
//! Train scenes contain no held-out pair; eval scenes contain at least one (a compositional
//! generalisation test). Scenes are drawn uniformly, with replacement, from each split's set.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::format::{DatasetWriter, Manifest};
use crate::image::RgbImage;
use crate::text::{train_bpe, TextTokenizer};

/// Edge patterns per colour (4-bit neighbour mask).
pub const N_PATTERNS: u32 = 16;
/// Codebook size of the synthetic images: 8 colours × 16 edge patterns.
pub const IMAGE_VOCAB: u32 = Colour::ALL.len() as u32 * N_PATTERNS;
/// Pixels per side of one code's patch.
pub const PATCH: usize = 8;
/// Vocabulary size requested when training the synthetic captions' BPE tokenizer (training
/// stops earlier, once every word is one token).
pub const SYNTHETIC_TEXT_VOCAB: usize = 512;

/// Edge bits of a pattern.
pub const EDGE_TOP: u32 = 1;
pub const EDGE_RIGHT: u32 = 2;
pub const EDGE_BOTTOM: u32 = 4;
pub const EDGE_LEFT: u32 = 8;

/// Colours of objects (the first six) and backgrounds (all eight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Black,
}

impl Colour {
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::White,
        Colour::Black,
    ];
    /// Colours an object can have.
    pub const OBJECT: [Colour; 6] =
        [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow, Colour::Purple, Colour::Orange];

    pub fn index(self) -> u32 {
        self as u32
    }

    pub fn from_index(i: u32) -> Option<Colour> {
        Colour::ALL.get(i as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }

    /// The indefinite article before the colour's name ("a" or "an").
    pub fn article(self) -> &'static str {
        if self.name().starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        }
    }

    pub fn from_name(name: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Fill colour of patches.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [240, 210, 40],
            Colour::Purple => [140, 60, 180],
            Colour::Orange => [245, 130, 30],
            Colour::White => [245, 245, 245],
            Colour::Black => [20, 20, 20],
        }
    }

    /// Outline colour of patches (darker; grey for black).
    pub fn outline_rgb(self) -> [u8; 3] {
        if self == Colour::Black {
            return [90, 90, 90];
        }
        self.rgb().map(|v| (v as u32 * 3 / 5) as u8)
    }

    /// The palette colour nearest to `rgb` (squared RGB distance).
    pub fn nearest(rgb: [u8; 3]) -> Colour {
        let d = |c: Colour| {
            let p = c.rgb();
            (0..3).map(|k| (p[k] as i32 - rgb[k] as i32).pow(2)).sum::<i32>()
        };
        Colour::ALL.into_iter().min_by_key(|&c| d(c)).expect("non-empty")
    }
}

/// Object shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Cross];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Cross => "cross",
        }
    }

    pub fn from_name(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether cell (`x`, `y`) of an `s × s` box belongs to the shape.
    pub fn contains(self, s: usize, x: usize, y: usize) -> bool {
        let c = (s as f32 - 1.0) / 2.0;
        let (dx, dy) = (x as f32 - c, y as f32 - c);
        match self {
            Shape::Square => true,
            Shape::Circle => dx * dx + dy * dy <= (s as f32 / 2.0).powi(2),
            Shape::Triangle => 2.0 * dx.abs() <= y as f32 + 1.0,
            Shape::Cross => {
                let w = (s as f32 / 6.0).max(0.5);
                dx.abs() <= w || dy.abs() <= w
            }
        }
    }
}

/// Where the first object is relative to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    Above,
    Below,
    LeftOf,
    RightOf,
}

impl Relation {
    pub const ALL: [Relation; 4] = [Relation::Above, Relation::Below, Relation::LeftOf, Relation::RightOf];

    /// The words used in captions.
    pub fn phrase(self) -> &'static str {
        match self {
            Relation::Above => "above",
            Relation::Below => "below",
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
        }
    }
}

/// A coloured shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Object {
    pub colour: Colour,
    pub shape: Shape,
}

/// A scene: `first` is `relation` `second`, on `background`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Scene {
    pub first: Object,
    pub relation: Relation,
    pub second: Object,
    pub background: Colour,
}

/// Which region a cell belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    Background,
    First,
    Second,
}

/// Grid side for `image_length`, which must be a perfect square `≥ 16`.
pub fn grid_side(image_length: usize) -> Result<usize> {
    let g = (image_length as f64).sqrt().round() as usize;
    if g * g != image_length || g < 4 {
        return Err(DataError::InvalidArgument(format!(
            "synthetic images need image_length = g × g with g ≥ 4 (16, 64, 256, ...), got {image_length}"
        )));
    }
    Ok(g)
}

/// Side of an object's box on a `g × g` grid: the largest odd number `≤ g/2 − 1` (at least 1).
pub fn object_box_side(g: usize) -> usize {
    let max = (g / 2).saturating_sub(1).max(1);
    if max % 2 == 1 {
        max
    } else {
        max - 1
    }
}

impl Scene {
    /// `"a red circle above a blue square on a yellow background"` ("an" before "orange").
    pub fn caption(&self) -> String {
        format!(
            "{} {} {} {} {} {} {} on {} {} background",
            self.first.colour.article(),
            self.first.colour.name(),
            self.first.shape.name(),
            self.relation.phrase(),
            self.second.colour.article(),
            self.second.colour.name(),
            self.second.shape.name(),
            self.background.article(),
            self.background.name()
        )
    }

    /// Parses a caption in the form [`caption`](Self::caption) writes (case, whitespace and
    /// "a"/"an" ignored, so normalised captions parse too).
    pub fn parse(caption: &str) -> Option<Scene> {
        let lower = caption.to_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        let (rel, rel_len) = match words.get(3..)? {
            ["above", ..] => (Relation::Above, 1),
            ["below", ..] => (Relation::Below, 1),
            ["to", "the", "left", "of", ..] => (Relation::LeftOf, 4),
            ["to", "the", "right", "of", ..] => (Relation::RightOf, 4),
            _ => return None,
        };
        let rest = &words[3 + rel_len..];
        let article = |w: &str| w == "a" || w == "an";
        match (&words[..3], rest) {
            ([a1, c1, s1], [a2, c2, s2, "on", a3, bg, "background"]) if article(a1) && article(a2) && article(a3) => {
                Some(Scene {
                    first: Object { colour: Colour::from_name(c1)?, shape: Shape::from_name(s1)? },
                    relation: rel,
                    second: Object { colour: Colour::from_name(c2)?, shape: Shape::from_name(s2)? },
                    background: Colour::from_name(bg)?,
                })
            }
            _ => None,
        }
    }

    /// Whether the scene is well-formed: distinct objects with object colours, and a background
    /// colour different from both objects'.
    pub fn is_valid(&self) -> bool {
        self.first != self.second
            && Colour::OBJECT.contains(&self.first.colour)
            && Colour::OBJECT.contains(&self.second.colour)
            && self.background != self.first.colour
            && self.background != self.second.colour
    }

    /// Region of every cell of the `g × g` grid, row-major.
    pub fn regions(&self, g: usize) -> Vec<Region> {
        let mut cells = vec![Region::Background; g * g];
        let s = object_box_side(g);
        let half = g / 2;
        // Offsets of the box in the first and second half along the relation's axis (mirrored
        // about the centre), and across it.
        let near = (half - s) / 2;
        let far = g - near - s;
        let across = (g - s) / 2;
        let (first_at, second_at) = match self.relation {
            Relation::Above => ((across, near), (across, far)),
            Relation::Below => ((across, far), (across, near)),
            Relation::LeftOf => ((near, across), (far, across)),
            Relation::RightOf => ((far, across), (near, across)),
        };
        for (obj, (x0, y0), region) in [(self.first, first_at, Region::First), (self.second, second_at, Region::Second)]
        {
            for y in 0..s {
                for x in 0..s {
                    if obj.shape.contains(s, x, y) {
                        cells[(y0 + y) * g + x0 + x] = region;
                    }
                }
            }
        }
        cells
    }

    fn region_colour(&self, r: Region) -> Colour {
        match r {
            Region::Background => self.background,
            Region::First => self.first.colour,
            Region::Second => self.second.colour,
        }
    }

    /// The image codes (`g × g`, row-major) of the scene.
    pub fn render(&self, g: usize) -> Vec<u32> {
        let regions = self.regions(g);
        let mut codes = Vec::with_capacity(g * g);
        for y in 0..g {
            for x in 0..g {
                let r = regions[y * g + x];
                let differs = |nx: usize, ny: usize| regions[ny * g + nx] != r;
                let mut edges = 0;
                if y > 0 && differs(x, y - 1) {
                    edges |= EDGE_TOP;
                }
                if x + 1 < g && differs(x + 1, y) {
                    edges |= EDGE_RIGHT;
                }
                if y + 1 < g && differs(x, y + 1) {
                    edges |= EDGE_BOTTOM;
                }
                if x > 0 && differs(x - 1, y) {
                    edges |= EDGE_LEFT;
                }
                codes.push(self.region_colour(r).index() * N_PATTERNS + edges);
            }
        }
        codes
    }
}

/// The colour a synthetic code encodes, or `None` for codes outside the codebook.
pub fn code_colour(code: u32) -> Option<Colour> {
    Colour::from_index(code / N_PATTERNS)
}

/// For each region of the scene (background, first object, second object): its cell indices
/// (row-major in the `g × g` grid) and the colour those cells should be.
pub fn expected_colour_regions(scene: &Scene, g: usize) -> Vec<(Vec<usize>, Colour)> {
    let regions = scene.regions(g);
    [Region::Background, Region::First, Region::Second]
        .into_iter()
        .map(|r| {
            let cells = (0..g * g).filter(|&i| regions[i] == r).collect();
            (cells, scene.region_colour(r))
        })
        .collect()
}

/// The most common palette colour (each pixel classified to the nearest) over the given cells
/// of an image decoded from a `g × g` code grid. `None` if `cells` is empty.
pub fn dominant_colour(image: &RgbImage, g: usize, cells: &[usize]) -> Option<Colour> {
    if cells.is_empty() || g == 0 {
        return None;
    }
    let (pw, ph) = (image.width / g, image.height / g);
    let mut votes = [0usize; 8];
    for &cell in cells {
        let (cx, cy) = (cell % g, cell / g);
        for y in cy * ph..(cy + 1) * ph {
            for x in cx * pw..(cx + 1) * pw {
                votes[Colour::nearest(image.get(x, y)).index() as usize] += 1;
            }
        }
    }
    let best = (0..8).max_by_key(|&i| (votes[i], std::cmp::Reverse(i)))?;
    Colour::from_index(best as u32)
}

/// How well generated codes match a scene.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SampleScore {
    /// Fraction of cells whose code has the expected colour.
    pub cell_colour_accuracy: f32,
    /// How many of the 3 regions (background, first, second) have the expected dominant colour.
    pub regions_correct: usize,
    /// Codes identical to the scene's rendering.
    pub exact: bool,
}

/// Scores `codes` (a `g × g` grid) against `scene`.
pub fn score_codes(scene: &Scene, codes: &[u32], g: usize) -> Result<SampleScore> {
    if codes.len() != g * g {
        return Err(DataError::InvalidArgument(format!("{} codes for a {g}×{g} grid", codes.len())));
    }
    let expected = expected_colour_regions(scene, g);
    let mut right = 0;
    for (cells, colour) in &expected {
        right += cells.iter().filter(|&&i| code_colour(codes[i]) == Some(*colour)).count();
    }
    let image = decode_codes(codes, g)?;
    let regions_correct =
        expected.iter().filter(|(cells, colour)| dominant_colour(&image, g, cells) == Some(*colour)).count();
    Ok(SampleScore {
        cell_colour_accuracy: right as f32 / (g * g) as f32,
        regions_correct,
        exact: scene.render(g) == codes,
    })
}

/// The 8×8 patch of a synthetic code; codes outside the codebook are magenta.
pub fn code_patch(code: u32) -> [[[u8; 3]; PATCH]; PATCH] {
    let Some(colour) = code_colour(code) else {
        return [[[255, 0, 255]; PATCH]; PATCH];
    };
    let edges = code % N_PATTERNS;
    let (fill, line) = (colour.rgb(), colour.outline_rgb());
    let mut patch = [[fill; PATCH]; PATCH];
    for (y, row) in patch.iter_mut().enumerate() {
        for (x, px) in row.iter_mut().enumerate() {
            let on_edge = (edges & EDGE_TOP != 0 && y == 0)
                || (edges & EDGE_BOTTOM != 0 && y == PATCH - 1)
                || (edges & EDGE_LEFT != 0 && x == 0)
                || (edges & EDGE_RIGHT != 0 && x == PATCH - 1);
            if on_edge {
                *px = line;
            }
        }
    }
    patch
}

/// Decodes a `g × g` grid of synthetic codes to an `8g × 8g` image.
pub fn decode_codes(codes: &[u32], g: usize) -> Result<RgbImage> {
    if codes.len() != g * g || g == 0 {
        return Err(DataError::InvalidArgument(format!("{} codes do not form a {g}×{g} grid", codes.len())));
    }
    let mut image = RgbImage::new(g * PATCH, g * PATCH, [0, 0, 0]);
    for (i, &code) in codes.iter().enumerate() {
        let (cx, cy) = (i % g, i / g);
        let patch = code_patch(code);
        for (y, row) in patch.iter().enumerate() {
            for (x, &px) in row.iter().enumerate() {
                image.put(cx * PATCH + x, cy * PATCH + y, px);
            }
        }
    }
    Ok(image)
}

/// The held-out (colour, shape) pairs for a seed: 4 distinct object colours matched with the 4
/// shapes in a seed-dependent order.
pub fn held_out_pairs(seed: u64) -> Vec<Object> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut colours = Colour::OBJECT.to_vec();
    colours.shuffle(&mut rng);
    let mut shapes = Shape::ALL.to_vec();
    shapes.shuffle(&mut rng);
    let mut pairs: Vec<Object> =
        shapes.into_iter().zip(colours).map(|(shape, colour)| Object { colour, shape }).collect();
    pairs.sort();
    pairs
}

/// Every valid scene, in a fixed order.
pub fn all_scenes() -> Vec<Scene> {
    let objects: Vec<Object> = Colour::OBJECT
        .into_iter()
        .flat_map(|colour| Shape::ALL.into_iter().map(move |shape| Object { colour, shape }))
        .collect();
    let mut scenes = Vec::new();
    for &first in &objects {
        for relation in Relation::ALL {
            for &second in &objects {
                for background in Colour::ALL {
                    let scene = Scene { first, relation, second, background };
                    if scene.is_valid() {
                        scenes.push(scene);
                    }
                }
            }
        }
    }
    scenes
}

/// Valid scenes of one split: train has no held-out pair, eval at least one.
pub fn split_scenes(held_out: &[Object], eval: bool) -> Vec<Scene> {
    all_scenes().into_iter().filter(|s| (held_out.contains(&s.first) || held_out.contains(&s.second)) == eval).collect()
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    pub train_rows: usize,
    pub eval_rows: usize,
    /// Codes per image: a perfect square `≥ 16` (256 = 16×16 by default).
    pub image_length: usize,
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec { train_rows: 20_000, eval_rows: 1_000, image_length: 256, seed: 0 }
    }
}

/// Contents of `held_out.json`, also returned by [`generate_synthetic`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyntheticInfo {
    pub spec: SyntheticSpec,
    /// Grid side `g`.
    pub grid: usize,
    pub image_vocab: u32,
    pub patch_pixels: usize,
    /// (colour, shape) pairs that occur only in the eval split.
    pub held_out_pairs: Vec<Object>,
    pub rule: String,
    pub train_distinct_captions: usize,
    pub eval_distinct_captions: usize,
    /// Longest caption in tokens including `<s>` and `</s>`: a `max_text_length` at least this
    /// long never truncates.
    pub max_caption_tokens: usize,
    /// Size of the trained tokenizer's vocabulary.
    pub text_vocab: usize,
}

/// Paths inside a generated synthetic folder.
#[derive(Debug, Clone)]
pub struct SyntheticPaths {
    pub train: PathBuf,
    pub eval: PathBuf,
    pub tokenizer: PathBuf,
    pub held_out: PathBuf,
}

impl SyntheticPaths {
    pub fn new(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        SyntheticPaths {
            train: dir.join("train"),
            eval: dir.join("eval"),
            tokenizer: dir.join("tokenizer.json"),
            held_out: dir.join("held_out.json"),
        }
    }
}

/// Result of [`generate_synthetic`].
#[derive(Debug, Clone)]
pub struct SyntheticReport {
    pub info: SyntheticInfo,
    pub paths: SyntheticPaths,
    pub train_manifest: Manifest,
    pub eval_manifest: Manifest,
}

fn write_split(path: &Path, scenes: &[Scene], rows: usize, g: usize, seed: u64, stream: u64) -> Result<Manifest> {
    let mut writer = DatasetWriter::create(path, g * g, IMAGE_VOCAB)?;
    writer.set_source(format!("dm-data synthetic shapes, seed {seed}, split stream {stream}"));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    for _ in 0..rows {
        let scene = scenes[rng.random_range(0..scenes.len())];
        writer.push(&scene.caption(), &scene.render(g))?;
    }
    writer.finish()
}

/// Writes `dir/train/` and `dir/eval/` (datasets), `dir/tokenizer.json` (a byte-level BPE
/// trained on the train split's distinct captions, with BART's special tokens) and
/// `dir/held_out.json` ([`SyntheticInfo`]). Deterministic for a given spec.
pub fn generate_synthetic(spec: &SyntheticSpec, dir: impl AsRef<Path>) -> Result<SyntheticReport> {
    let dir = dir.as_ref();
    let g = grid_side(spec.image_length)?;
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let paths = SyntheticPaths::new(dir);
    let held_out = held_out_pairs(spec.seed);
    let train_scenes = split_scenes(&held_out, false);
    let eval_scenes = split_scenes(&held_out, true);

    let train_captions: Vec<String> = train_scenes.iter().map(Scene::caption).collect();
    let tokenizer: TextTokenizer =
        train_bpe(train_captions.iter().map(String::as_str), SYNTHETIC_TEXT_VOCAB, &paths.tokenizer)?;
    // Captions are lower-case words separated by single spaces, and the byte-level
    // pre-tokeniser splits at spaces, so a caption's token count is the sum of its words'.
    let mut word_tokens = std::collections::HashMap::new();
    let mut max_caption_tokens = 0;
    for scene in train_scenes.iter().chain(&eval_scenes) {
        let mut n = 2; // <s> and </s>
        for word in scene.caption().split(' ') {
            if !word_tokens.contains_key(word) {
                word_tokens.insert(word.to_string(), tokenizer.token_ids(word)?.len());
            }
            n += word_tokens[word];
        }
        max_caption_tokens = max_caption_tokens.max(n);
    }

    let train_manifest = write_split(&paths.train, &train_scenes, spec.train_rows, g, spec.seed, 1)?;
    let eval_manifest = write_split(&paths.eval, &eval_scenes, spec.eval_rows, g, spec.seed, 2)?;

    let info = SyntheticInfo {
        spec: *spec,
        grid: g,
        image_vocab: IMAGE_VOCAB,
        patch_pixels: PATCH,
        held_out_pairs: held_out,
        rule: "train scenes contain none of held_out_pairs; eval scenes contain at least one".into(),
        train_distinct_captions: train_scenes.len(),
        eval_distinct_captions: eval_scenes.len(),
        max_caption_tokens,
        text_vocab: tokenizer.vocab_size(),
    };
    let json = serde_json::to_string_pretty(&info).expect("info serialises") + "\n";
    std::fs::write(&paths.held_out, json).map_err(|e| DataError::io(&paths.held_out, e))?;
    Ok(SyntheticReport { info, paths, train_manifest, eval_manifest })
}
