//! [`ModelConfig`]: the shape and layout of a Vision Transformer, as read from TOML, built
//! from a named preset and adjusted by command-line overrides (`--set key=value`).
//!
//! Field names are the same in TOML, on the command line and in Rust:
//!
//! ```toml
//! image_size = 224     # input side in pixels (square images)
//! patch = 16           # patch side in pixels; image_size must be a multiple
//! channels = 3         # input channels
//! width = 768          # D, the token width
//! depth = 12           # L, the number of blocks
//! mlp_dim = 3072       # M, the hidden width of the MLP
//! heads = 12           # attention heads; width must be a multiple
//! classes = 1000       # K, classifier outputs; 0 = no classifier (features only)
//! pool = "map"         # "tok" | "gap" | "map"
//! posemb = "learn"     # "learn" | "sincos2d"
//! stem = []            # conv stem channels, e.g. [16, 32] for patch 4; empty = patch projection
//! block = "sequential" # "sequential" | "parallel"
//! qk_norm = false
//! qkv_bias = true
//! norm_bias = true
//! gelu = "tanh"        # "tanh" | "erf"
//! # prelogits = 768    # optional pre-logits width (big_vision `rep_size`); absent = none
//! remat = false
//! # [moe]              # optional: sparse mixture-of-experts MLPs (V-MoE), see MoeConfig
//! ```
//!
//! Fields missing from a TOML file take their value from [`ModelConfig::custom`]; unknown
//! fields are an error.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::moe_config::{MoeConfig, MOE_KEYS};

/// How the encoded tokens become one feature vector for the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// A learned class token is prepended to the patch tokens; its output is the feature
    /// (original ViT, timm). The class token has its own learned position embedding.
    Tok,
    /// Global average pooling: the mean of the patch tokens after the final LayerNorm.
    Gap,
    /// Multihead attention pooling (big_vision `MAPHead`): a learned probe attends over the
    /// encoded tokens, then LayerNorm and an MLP with a residual.
    Map,
}

/// The position embedding added to the patch tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PosEmb {
    /// Learned, one D-vector per patch position (and one for the class token with `tok`).
    Learn,
    /// Fixed 2-D sine/cosine features (big_vision `posemb_sincos_2d`); no parameters.
    /// Needs `width` to be a multiple of 4 and at least 8.
    Sincos2d,
}

/// The residual layout of a Transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Pre-LN ViT block: `x += Attn(LN1(x)); x += MLP(LN2(x))`. Two LayerNorms.
    Sequential,
    /// ViT-22B / PaLM block: `x + Attn(LN(x)) + MLP(LN(x))`. One LayerNorm; the input
    /// projections fuse into one D→(3D+M) matmul and the outputs into one (D+M)→D.
    Parallel,
}

/// The GELU used in the MLPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gelu {
    /// The tanh approximation (big_vision, flax default).
    Tanh,
    /// The exact form with erf (timm, PyTorch default).
    Erf,
}

/// Implements `Display` and `FromStr` with the serde spellings, plus a list of them.
macro_rules! names {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value's spelling, as accepted in TOML and on the command line.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            /// The spelling used in TOML and on the command line.
            pub fn name(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = String;

            /// Parses the exact lowercase spelling; the error says what was expected.
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(format!("one of {}", $ty::NAMES.join(", "))),
                }
            }
        }
    };
}

names!(Pool { Tok => "tok", Gap => "gap", Map => "map" });
names!(PosEmb { Learn => "learn", Sincos2d => "sincos2d" });
names!(BlockKind { Sequential => "sequential", Parallel => "parallel" });
names!(Gelu { Tanh => "tanh", Erf => "erf" });

/// The shape and layout of a Vision Transformer.
///
/// Build one with [`ModelConfig::preset`] (or [`ModelConfig::custom`]), adjust it with
/// [`ModelConfig::set`], and check it with [`ModelConfig::validate`] before use.
/// [`ModelConfig::from_toml`] validates for you. Sizes are in elements (pixels, channels,
/// features); nothing here allocates tensors.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Input image side in pixels; images are `image_size × image_size × channels`.
    pub image_size: usize,
    /// Patch side p in pixels. The image is cut into `(image_size / p)²` patches.
    pub patch: usize,
    /// Side k of the patch projection's window when it is larger than `patch`: overlapping
    /// patches (a k×k stride-p convolution with `(k − p) / 2` zero pixels of padding, as the
    /// overlapping patch embeddings of PVTv2 and CvT), so each of the `(image_size / p)²` tokens
    /// sees a k×k neighbourhood of its patch. `k − p` must be even, and with k > p there is no
    /// `stem`. `None` (absent in TOML): k = p, ViT's non-overlapping patches. The kernel is
    /// stored `[D, C, k, k]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_kernel: Option<usize>,
    /// Input channels C (3 for RGB).
    pub channels: usize,
    /// Token width D (hidden size).
    pub width: usize,
    /// Number of Transformer blocks L.
    pub depth: usize,
    /// Hidden width M of every MLP (blocks and MAP head).
    pub mlp_dim: usize,
    /// Number of attention heads; the head dimension is `width / heads`.
    pub heads: usize,
    /// Classifier outputs K. `0` means no classifier: the model outputs its pre-logit
    /// features (big_vision `num_classes = 0`).
    pub classes: usize,
    /// How tokens are pooled for the head.
    pub pool: Pool,
    /// Position embedding kind.
    pub posemb: PosEmb,
    /// A convolutional stem in place of the p×p patch projection (Xiao et al. 2021, "Early
    /// convolutions help transformers see better"): the output channels of its 3×3 stride-2
    /// convolutions (padding 1, no bias), each followed by a LayerNorm over its channels and
    /// GELU, then a 1×1 convolution with bias to `width` (`patch_embed.proj`). `patch` must be
    /// `2^len`, so the stem gives the same `(image_size / patch)²` tokens. Empty (the default,
    /// absent in TOML): the plain patch projection of ViT.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stem: Vec<usize>,
    /// Residual layout of the blocks.
    pub block: BlockKind,
    /// LayerNorm over the head dimension on q and k in every encoder block (ViT-22B). One
    /// scale (and bias, with `norm_bias`) of size `width / heads` for q and one for k,
    /// shared across heads as in flax.
    pub qk_norm: bool,
    /// Bias on the q, k and v projections of the encoder blocks' attention. Output
    /// projections, MLPs and the MAP head's attention (big_vision `MAPHead`, timm
    /// `AttentionPoolLatent`) always have biases.
    pub qkv_bias: bool,
    /// Bias (centring offset) on every LayerNorm; without it a LayerNorm has a scale only.
    pub norm_bias: bool,
    /// GELU form in the MLPs.
    pub gelu: Gelu,
    /// Optional pre-logits layer: a `Dense(width → P)` + tanh between the pooled feature
    /// and the classifier, as big_vision's `rep_size` / vmoe's `representation_size`.
    /// `None` (absent in TOML) means no such layer; big_vision's `rep_size = True` is
    /// `Some(width)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prelogits: Option<usize>,
    /// Activation checkpointing per block: keep each block's input and recompute the block
    /// in backward. Saves memory, costs one extra forward; no effect on the parameters.
    pub remat: bool,
    /// Sparse mixture-of-experts MLPs (V-MoE) in some blocks; `None` (no `[moe]` table) for a
    /// dense model. Needs `block = "sequential"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
}

impl Default for ModelConfig {
    /// The same as [`ModelConfig::custom`].
    fn default() -> Self {
        Self::custom()
    }
}

/// `(name, width D, depth L, mlp_dim M, heads, patch)` per preset; reference.md §1.
const PRESETS: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("Ti/16", 192, 12, 768, 3, 16),
    ("S/16", 384, 12, 1536, 6, 16),
    ("S/32", 384, 12, 1536, 6, 32),
    ("B/16", 768, 12, 3072, 12, 16),
    ("B/32", 768, 12, 3072, 12, 32),
    ("L/16", 1024, 24, 4096, 16, 16),
    ("H/14", 1280, 32, 5120, 16, 14),
    ("g/14", 1408, 40, 6144, 16, 14),
    ("G/14", 1664, 48, 8192, 16, 14),
    ("e/14", 1792, 56, 15360, 16, 14),
    ("22B/14", 6144, 48, 24576, 48, 14),
];

/// `(name, dense base, depth override)` of the V-MoE presets (reference §4): class token,
/// MoE in every other block, E = 32, k = 2, C = 1.05. `V-MoE-15B` is D 1408, L 48, M 6400,
/// 16 heads, patch 14 with a 29,593-class head.
const MOE_PRESETS: &[&str] = &["V-MoE-S/32", "V-MoE-B/32", "V-MoE-B/16", "V-MoE-L/16", "V-MoE-H/14", "V-MoE-15B"];

/// The name of the base config for overrides.
const CUSTOM: &str = "custom";

/// Every key accepted by [`ModelConfig::set`], in field order.
pub const KEYS: &[&str] = &[
    "image_size",
    "patch",
    "patch_kernel",
    "channels",
    "width",
    "depth",
    "mlp_dim",
    "heads",
    "classes",
    "pool",
    "posemb",
    "stem",
    "block",
    "qk_norm",
    "qkv_bias",
    "norm_bias",
    "gelu",
    "prelogits",
    "remat",
];

impl ModelConfig {
    /// The base config for `--set` overrides (preset name `custom`): the Ti/16 shape
    /// (D 192, L 12, M 768, 3 heads, patch 16) in the Scaling-ViT layout of the presets,
    /// small enough to train on a CPU if an override is forgotten.
    pub fn custom() -> Self {
        ModelConfig {
            image_size: 224,
            patch: 16,
            patch_kernel: None,
            channels: 3,
            width: 192,
            depth: 12,
            mlp_dim: 768,
            heads: 3,
            classes: 1000,
            pool: Pool::Map,
            posemb: PosEmb::Learn,
            stem: Vec::new(),
            block: BlockKind::Sequential,
            qk_norm: false,
            qkv_bias: true,
            norm_bias: true,
            gelu: Gelu::Tanh,
            prelogits: None,
            remat: false,
            moe: None,
        }
    }

    /// The canonical names of the presets, then `custom`.
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.0).chain(MOE_PRESETS.iter().copied()).chain(std::iter::once(CUSTOM)).collect()
    }

    /// A V-MoE preset by its canonical name, case-insensitive (`V-MoE-B/16`, `v-moe-15b`).
    fn moe_preset(name: &str) -> Option<Self> {
        let canonical = MOE_PRESETS.iter().find(|p| p.eq_ignore_ascii_case(name))?;
        let mut cfg = match *canonical {
            "V-MoE-15B" => ModelConfig {
                width: 1408,
                depth: 48,
                mlp_dim: 6400,
                heads: 16,
                patch: 14,
                classes: 29_593,
                ..Self::custom()
            },
            other => Self::preset(&other["V-MoE-".len()..]).ok()?,
        };
        cfg.pool = Pool::Tok;
        cfg.moe = Some(MoeConfig::default());
        Some(cfg)
    }

    /// A named model: `Ti/16`, `S/16`, `S/32`, `B/16`, `B/32`, `L/16`, `H/14`, `g/14`,
    /// `G/14`, `e/14`, `22B/14`, the V-MoE models `V-MoE-S/32`, `V-MoE-B/32`, `V-MoE-B/16`,
    /// `V-MoE-L/16`, `V-MoE-H/14`, `V-MoE-15B` (the dense shape with a class token and MoE in
    /// every other block: E = 32, k = 2, C = 1.05; reference §4), or `custom` (see
    /// [`ModelConfig::custom`]).
    ///
    /// Names are case-insensitive and may start with `ViT-` (`vit-b/16`, `ViT-L/16`). The
    /// one clash, `g/14` (giant) against `G/14` (gigantic), is decided by exact case.
    ///
    /// Presets follow the Scaling-ViT layout: 224×224×3 input, learned position embedding
    /// over the patch tokens, no class token, MAP head, 1000 classes, sequential blocks
    /// with all biases and tanh GELU. `22B/14` uses the parallel block, QK-norm and no QKV
    /// or LayerNorm biases (MLP and output-projection biases stay).
    pub fn preset(name: &str) -> Result<Self> {
        let trimmed = name.trim();
        let bare = match trimmed.get(..4) {
            Some(prefix) if prefix.eq_ignore_ascii_case("vit-") => &trimmed[4..],
            _ => trimmed,
        };
        if bare.eq_ignore_ascii_case(CUSTOM) {
            return Ok(Self::custom());
        }
        if let Some(cfg) = Self::moe_preset(trimmed) {
            return Ok(cfg);
        }
        let exact = PRESETS.iter().find(|p| p.0 == bare);
        let found = exact.or_else(|| {
            let mut folded = PRESETS.iter().filter(|p| p.0.eq_ignore_ascii_case(bare));
            match (folded.next(), folded.next()) {
                (Some(one), None) => Some(one),
                _ => None,
            }
        });
        let Some(&(canonical, width, depth, mlp_dim, heads, patch)) = found else {
            return Err(ModelError::UnknownPreset { name: name.to_string(), known: Self::preset_names().join(", ") });
        };
        let mut cfg = ModelConfig { width, depth, mlp_dim, heads, patch, ..Self::custom() };
        if canonical == "22B/14" {
            cfg.block = BlockKind::Parallel;
            cfg.qk_norm = true;
            cfg.qkv_bias = false;
            cfg.norm_bias = false;
        }
        Ok(cfg)
    }

    /// Applies one command-line override of the form `key=value`, e.g. `width=256`,
    /// `pool=tok`, `qk_norm=true`, `prelogits=none`. Whitespace around the key and value
    /// and quotes around the value are ignored; `-` in a key reads as `_`.
    ///
    /// Only the type of the value is checked here; call [`ModelConfig::validate`] after the
    /// last override, since overrides may be inconsistent until all are applied.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let Some((key, value)) = assignment.split_once('=') else {
            return Err(ModelError::MalformedOverride(assignment.to_string()));
        };
        self.set_value(key, value)
    }

    /// Sets the field `key` from its textual `value`; see [`ModelConfig::set`].
    ///
    /// Integers are unsigned decimal; booleans are `true`/`false`; enums take the
    /// lowercase names of [`Pool`], [`PosEmb`], [`BlockKind`] and [`Gelu`]; `prelogits`
    /// takes a width or `none`; `stem` a list of channels (`[16, 32]` or `16,32`) or `none`.
    /// An unknown key lists the valid keys; a bad value names the key, the value and the
    /// expected type.
    pub fn set_value(&mut self, key: &str, value: &str) -> Result<()> {
        let key = key.trim().replace('-', "_");
        let value = unquote(value.trim());
        if key == "moe" {
            return self.set_moe_table(value);
        }
        if let Some(&key) = MOE_KEYS.iter().find(|k| **k == key) {
            return self.moe.get_or_insert_with(MoeConfig::default).set_value(key, value);
        }
        let Some(&key) = KEYS.iter().find(|k| **k == key) else {
            return Err(ModelError::UnknownKey { key, valid: valid_keys() });
        };
        match key {
            "image_size" => self.image_size = parse_uint(key, value)?,
            "patch" => self.patch = parse_uint(key, value)?,
            "patch_kernel" => {
                self.patch_kernel = match value {
                    "none" => None,
                    _ => Some(parse_uint(key, value)?),
                }
            }
            "channels" => self.channels = parse_uint(key, value)?,
            "width" => self.width = parse_uint(key, value)?,
            "depth" => self.depth = parse_uint(key, value)?,
            "mlp_dim" => self.mlp_dim = parse_uint(key, value)?,
            "heads" => self.heads = parse_uint(key, value)?,
            "classes" => self.classes = parse_uint(key, value)?,
            "pool" => self.pool = parse_enum(key, value)?,
            "posemb" => self.posemb = parse_enum(key, value)?,
            "stem" => self.stem = parse_channels(key, value)?,
            "block" => self.block = parse_enum(key, value)?,
            "qk_norm" => self.qk_norm = parse_bool(key, value)?,
            "qkv_bias" => self.qkv_bias = parse_bool(key, value)?,
            "norm_bias" => self.norm_bias = parse_bool(key, value)?,
            "gelu" => self.gelu = parse_enum(key, value)?,
            "prelogits" => {
                self.prelogits = match value {
                    "none" => None,
                    _ => Some(value.parse().map_err(|_| {
                        ModelError::bad_value(key, value, "a positive integer (the pre-logits width) or none")
                    })?),
                }
            }
            "remat" => self.remat = parse_bool(key, value)?,
            // KEYS and this match list the same names; a test keeps them in step.
            _ => return Err(ModelError::UnknownKey { key: key.to_string(), valid: valid_keys() }),
        }
        Ok(())
    }

    /// `moe=none` (no MoE layers) or `moe={ experts = 8, k = 1 }` (a TOML inline table, as a
    /// train config's `[model.moe]` arrives here): the table's keys are set one by one on the
    /// defaults.
    fn set_moe_table(&mut self, value: &str) -> Result<()> {
        if value == "none" {
            self.moe = None;
            return Ok(());
        }
        let expected = "none or a table of moe keys such as { experts = 8, k = 1 }";
        let table = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .and_then(|v| v.as_table().cloned())
            .ok_or_else(|| ModelError::bad_value("moe", value, expected))?;
        self.moe = Some(MoeConfig::default());
        for (k, v) in table {
            let text = match v {
                toml::Value::String(s) => s,
                other => other.to_string(),
            };
            self.set_value(&format!("moe.{k}"), &text)?;
        }
        Ok(())
    }

    /// Checks every field and their combinations; the error names the field, its value
    /// and what was expected. Also checks that the token and parameter counts fit in 64
    /// bits, so the size helpers and [`crate::ParamCounts`] are exact for a valid config.
    pub fn validate(&self) -> Result<()> {
        let positive: [(&'static str, usize); 7] = [
            ("image_size", self.image_size),
            ("patch", self.patch),
            ("channels", self.channels),
            ("width", self.width),
            ("depth", self.depth),
            ("mlp_dim", self.mlp_dim),
            ("heads", self.heads),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ModelError::invalid(field, value, "a positive integer"));
            }
        }
        if !self.image_size.is_multiple_of(self.patch) {
            return Err(ModelError::invalid(
                "image_size",
                self.image_size,
                format!("a multiple of patch ({})", self.patch),
            ));
        }
        if !self.width.is_multiple_of(self.heads) {
            return Err(ModelError::invalid("width", self.width, format!("a multiple of heads ({})", self.heads)));
        }
        if let Some(k) = self.patch_kernel {
            if k < self.patch || !(k - self.patch).is_multiple_of(2) {
                return Err(ModelError::invalid(
                    "patch_kernel",
                    k,
                    format!("at least patch ({}) and larger by an even number of pixels", self.patch),
                ));
            }
            if k > self.patch && !self.stem.is_empty() {
                return Err(ModelError::invalid(
                    "patch_kernel",
                    k,
                    format!(
                        "patch ({}) or none with a conv stem ({:?}), whose projection is 1x1",
                        self.patch, self.stem
                    ),
                ));
            }
        }
        if !self.stem.is_empty() {
            let stem = format!("{:?}", self.stem);
            if self.stem.contains(&0) {
                return Err(ModelError::invalid("stem", stem, "positive channel counts"));
            }
            // Each 3×3 stride-2 convolution halves the side: `patch` must be 2^len.
            if u32::try_from(self.stem.len()).ok().and_then(|n| 1usize.checked_shl(n)) != Some(self.patch) {
                return Err(ModelError::invalid(
                    "stem",
                    stem,
                    format!(
                        "one stride-2 convolution per halving of patch ({}): patch = 2^(number of stem channels)",
                        self.patch
                    ),
                ));
            }
        }
        if self.posemb == PosEmb::Sincos2d && (!self.width.is_multiple_of(4) || self.width < 8) {
            return Err(ModelError::invalid(
                "width",
                self.width,
                "a multiple of 4 and at least 8 for posemb = \"sincos2d\"",
            ));
        }
        if self.prelogits == Some(0) {
            return Err(ModelError::invalid("prelogits", 0, "a positive width, or no prelogits field for none"));
        }
        let grid = (self.image_size / self.patch) as u64;
        grid.checked_mul(grid)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(ModelError::Overflow { what: "the number of tokens" })?;
        if let Some(moe) = &self.moe {
            moe.validate(self.depth)?;
            if self.block != BlockKind::Sequential {
                return Err(ModelError::invalid(
                    "block",
                    self.block,
                    "\"sequential\" with moe (MoE MLPs replace the sequential block's MLP)",
                ));
            }
        }
        crate::params::ParamBreakdown::count(self)?;
        Ok(())
    }

    /// Parses a TOML model config and validates it. Missing fields take the values of
    /// [`ModelConfig::custom`]; unknown fields and ill-typed values are errors that give
    /// the line.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: ModelConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| text.bytes().take(span.start).filter(|&b| b == b'\n').count() + 1);
            ModelError::Toml { line, message: e.message().trim().replace('\n', " ") }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the config as TOML, one `key = value` line per field in the order of
    /// [`KEYS`]; `prelogits` is left out when `None`. [`ModelConfig::from_toml`] reads it
    /// back to an equal config.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| ModelError::Toml { line: None, message: e.to_string() })
    }

    /// Patches per image side, `image_size / patch` (0 if `patch` is 0).
    pub fn grid(&self) -> usize {
        self.image_size.checked_div(self.patch).unwrap_or(0)
    }

    /// The patch projection's window: k×k (`patch_kernel`, or `patch` without it), stride
    /// `patch`, padding `(k − patch) / 2`, so it gives `grid()²` tokens.
    pub fn patch_window(&self) -> vit_tensor::ops::ConvWindow {
        let kernel = self.patch_kernel.unwrap_or(self.patch);
        vit_tensor::ops::ConvWindow { kernel, stride: self.patch, pad: kernel.saturating_sub(self.patch) / 2 }
    }

    /// Number of patch tokens N = `grid()²`. Exact for a validated config.
    pub fn num_patches(&self) -> usize {
        self.grid().saturating_mul(self.grid())
    }

    /// Sequence length through the encoder: N patch tokens, plus 1 for the class token
    /// with `pool = "tok"`.
    pub fn seq_len(&self) -> usize {
        self.num_patches().saturating_add(usize::from(self.pool == Pool::Tok))
    }

    /// Head dimension dh = `width / heads` (0 if `heads` is 0).
    pub fn head_dim(&self) -> usize {
        self.width.checked_div(self.heads).unwrap_or(0)
    }
}

/// The keys of [`KEYS`] and [`MOE_KEYS`], comma separated, for an unknown-key message.
fn valid_keys() -> String {
    KEYS.iter().chain(MOE_KEYS).copied().collect::<Vec<_>>().join(", ")
}

/// Strips one pair of matching single or double quotes.
fn unquote(value: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner;
        }
    }
    value
}

fn parse_uint(key: &'static str, value: &str) -> Result<usize> {
    value.parse().map_err(|_| ModelError::bad_value(key, value, "an unsigned integer"))
}

/// `none`, `[]`, `[16, 32]` or `16,32`: a list of channel counts.
fn parse_channels(key: &'static str, value: &str) -> Result<Vec<usize>> {
    let inner = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')).unwrap_or(value).trim();
    if inner.is_empty() || inner == "none" {
        return Ok(Vec::new());
    }
    inner
        .split(',')
        .map(|c| c.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| ModelError::bad_value(key, value, "a list of unsigned integers such as [16, 32], or none"))
}

fn parse_bool(key: &'static str, value: &str) -> Result<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ModelError::bad_value(key, value, "true or false")),
    }
}

fn parse_enum<T: FromStr<Err = String>>(key: &'static str, value: &str) -> Result<T> {
    value.parse().map_err(|expected| ModelError::bad_value(key, value, expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_settable_and_round_trips() {
        let mut cfg = ModelConfig::custom();
        for key in KEYS {
            let value = match *key {
                "pool" => "gap",
                "posemb" => "sincos2d",
                "block" => "parallel",
                "gelu" => "erf",
                "qk_norm" | "qkv_bias" | "norm_bias" | "remat" => "true",
                "image_size" => "256",
                "width" => "256",
                "heads" => "4",
                "stem" => "[8, 8, 8, 8, 16]", // patch 32: five halvings
                _ => "32",
            };
            cfg.set(&format!("{key}={value}")).unwrap();
        }
        assert_eq!(cfg.prelogits, Some(32));
        assert_eq!(cfg.pool, Pool::Gap);
        assert_eq!(cfg.block, BlockKind::Parallel);
        assert_eq!(cfg.stem, [8, 8, 8, 8, 16]);
        cfg.validate().unwrap();
        let text = cfg.to_toml().unwrap();
        assert_eq!(ModelConfig::from_toml(&text).unwrap(), cfg);
        // Serialized keys come out in KEYS order.
        let keys: Vec<&str> = text.lines().filter_map(|l| l.split_once(" = ").map(|kv| kv.0)).collect();
        assert_eq!(keys, KEYS);
    }

    #[test]
    fn enum_names_parse_and_print() {
        for name in Pool::NAMES {
            assert_eq!(name.parse::<Pool>().unwrap().to_string(), *name);
        }
        for name in PosEmb::NAMES {
            assert_eq!(name.parse::<PosEmb>().unwrap().to_string(), *name);
        }
        for name in BlockKind::NAMES {
            assert_eq!(name.parse::<BlockKind>().unwrap().to_string(), *name);
        }
        for name in Gelu::NAMES {
            assert_eq!(name.parse::<Gelu>().unwrap().to_string(), *name);
        }
    }
}
