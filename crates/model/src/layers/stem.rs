//! The convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better";
//! `ModelConfig::stem`): 3×3 stride-2 convolutions, each followed by a LayerNorm over its channels
//! and GELU, that take the image down to the token grid before the 1×1 patch projection. The
//! paper uses BatchNorm and ReLU; a per-position LayerNorm keeps every image independent of its
//! batch (as ConvNeXt's channels-last norms), so results do not depend on how a batch is split.
//! Convolutions run as `im2col` + matmul on channels-last activations `[B, H, W, C]`.

use super::block::gelu_of;
use super::init::{Fill, ParamSink};
use super::norm::{Norm, NormSaved};
use crate::{ModelConfig, ParamStore, Result};
use vit_tensor::{
    ops::{self, ConvWindow, Gelu},
    Tensor,
};

/// The window of every stem convolution: 3×3, stride 2, padding 1 (a side s becomes ⌈s/2⌉).
pub const STEM_WINDOW: ConvWindow = ConvWindow { kernel: 3, stride: 2, pad: 1 };

/// One convolution of the stem: `stem.{i}.conv.weight` `[out, 3, 3, in]` (no bias: the norm
/// follows) and the LayerNorm `stem.{i}.norm` over `out`.
#[derive(Debug, Clone)]
struct StemConv {
    weight: String,
    norm: Norm,
    /// Input channels.
    cin: usize,
    /// Output channels.
    cout: usize,
    /// Input side in pixels; the output side is `side / 2`.
    side: usize,
}

/// The stem of a [`ModelConfig`] with a non-empty `stem`.
#[derive(Debug, Clone)]
pub struct ConvStem {
    convs: Vec<StemConv>,
    gelu: Gelu,
}

/// What one convolution's backward needs.
#[derive(Debug, Clone)]
struct StemConvSaved {
    /// The windows of its input, `[B, side'², 9·in]` (side' the output side).
    cols: Tensor,
    /// The convolution's output, input of the norm, `[B, side'², out]`.
    conv: Tensor,
    /// The norm's statistics.
    norm: NormSaved,
    /// The norm's output, input of GELU, `[B, side'², out]`.
    normed: Tensor,
}

/// What [`ConvStem::backward`] needs, one entry per convolution.
#[derive(Debug, Clone)]
pub struct StemSaved(Vec<StemConvSaved>);

impl ConvStem {
    /// The stem of `cfg`, or `None` without one (`cfg.stem` empty). `cfg` must be valid, so
    /// `image_size` halves exactly `stem.len()` times.
    pub fn new(cfg: &ModelConfig) -> Option<Self> {
        if cfg.stem.is_empty() {
            return None;
        }
        let mut convs = Vec::with_capacity(cfg.stem.len());
        let (mut cin, mut side) = (cfg.channels, cfg.image_size);
        for (i, &cout) in cfg.stem.iter().enumerate() {
            let weight = format!("stem.{i}.conv.weight");
            convs.push(StemConv {
                weight,
                norm: Norm::new(&format!("stem.{i}.norm"), cout, cfg.norm_bias),
                cin,
                cout,
                side,
            });
            (cin, side) = (cout, side / 2);
        }
        Some(ConvStem { convs, gelu: gelu_of(cfg) })
    }

    /// Channels of the stem's output, the input of the 1×1 patch projection.
    pub fn out_channels(&self) -> usize {
        self.convs.last().map_or(0, |c| c.cout)
    }

    /// Adds every convolution kernel (normal, std `1/√(9·in)`) and norm (scale 1, bias 0).
    pub fn init(&self, sink: &mut dyn ParamSink) -> Result<()> {
        for c in &self.convs {
            let fan_in = 9 * c.cin;
            sink.add(&c.weight, &[c.cout, 3, 3, c.cin], Fill::Normal { std: (fan_in as f32).powf(-0.5) })?;
            c.norm.init(sink)?;
        }
        Ok(())
    }

    /// `images [B, C, H, W] -> [B, (H/2^n)·(W/2^n), stem.last()]`, row-major over the token grid.
    pub fn forward(&self, p: &ParamStore, images: &Tensor) -> Result<(Tensor, StemSaved)> {
        let b = images.dims()[0];
        let mut x = to_channels_last(images)?;
        let mut saved = Vec::with_capacity(self.convs.len());
        for c in &self.convs {
            let cols = ops::im2col(&x, STEM_WINDOW)?;
            let w = p.get(&c.weight)?.reshape([c.cout, 9 * c.cin])?;
            let conv = ops::linear(&cols, &w, None, None, None)?.y;
            let (normed, norm) = c.norm.forward(p, &conv)?;
            let y = ops::gelu_fwd(&normed, self.gelu)?;
            x = y.reshape([b, c.side / 2, c.side / 2, c.cout])?;
            saved.push(StemConvSaved { cols, conv, norm, normed });
        }
        let tokens = x.dims()[1] * x.dims()[2];
        Ok((x.reshape([b, tokens, self.out_channels()])?, StemSaved(saved)))
    }

    /// Accumulates the kernels' and norms' gradients from `dy [B, N, stem.last()]`; returns the
    /// gradient of the images `[B, C, H, W]`.
    pub fn backward(&self, p: &ParamStore, s: &StemSaved, dy: &Tensor, g: &mut ParamStore) -> Result<Tensor> {
        let b = dy.dims()[0];
        let mut dy = dy.clone();
        for (c, cs) in self.convs.iter().zip(&s.0).rev() {
            let dnormed = ops::gelu_bwd(&cs.normed, &dy, self.gelu)?;
            let dconv = c.norm.backward(p, &cs.conv, &cs.norm, &dnormed, g)?;
            ops::linear_wgrad(g, &c.weight, None, &cs.cols, &dconv)?;
            let w = p.get(&c.weight)?.reshape([c.cout, 9 * c.cin])?;
            let dcols = ops::matmul_t(&dconv, &w, false, false)?;
            dy = ops::col2im(&dcols, c.side, c.side, c.cin, STEM_WINDOW)?.reshape([b, c.side * c.side, c.cin])?;
        }
        let (channels, side) = self.convs.first().map_or((0, 0), |c| (c.cin, c.side));
        from_channels_last(&dy.reshape([b, side, side, channels])?)
    }
}

/// `[B, C, H, W] -> [B, H, W, C]` (a reshape for one channel).
pub(super) fn to_channels_last(images: &Tensor) -> Result<Tensor> {
    let d = images.dims();
    Ok(match d[1] {
        1 => images.reshape([d[0], d[2], d[3], 1])?,
        _ => ops::permute(images, &[0, 2, 3, 1])?,
    })
}

/// `[B, H, W, C] -> [B, C, H, W]` (a reshape for one channel).
pub(super) fn from_channels_last(x: &Tensor) -> Result<Tensor> {
    let d = x.dims();
    Ok(match d[3] {
        1 => x.reshape([d[0], 1, d[1], d[2]])?,
        _ => ops::permute(x, &[0, 3, 1, 2])?,
    })
}
