//! Patch embedding (a p×p projection, an overlapping k×k one, or a convolutional stem then a 1×1
//! projection), position embedding (learned or sincos2d) and the class token (reference §2).

use super::init::{Fill, ParamSink};
use super::stem::{from_channels_last, to_channels_last, ConvStem, StemSaved};
use crate::{ModelConfig, ModelError, ParamStore, Pool, PosEmb, Result};
use vit_tensor::{
    ops::{self, ConvWindow, RowIndex},
    DType, Device, Tensor,
};

/// `patch_embed.proj` (a p×p stride-p convolution with bias, stored `[D, C, p, p]` as in timm;
/// with `patch_kernel` k, a k×k stride-p convolution `[D, C, k, k]`; with a conv stem, a 1×1
/// convolution `[D, stem.last(), 1, 1]` on its output),
/// `cls_token` `[1, 1, D]` with `pool = "tok"`, `pos_embed` `[1, T, D]` when learned.
#[derive(Debug, Clone)]
pub struct Embedding {
    patch: usize,
    channels: usize,
    width: usize,
    tokens: usize,
    cls: bool,
    learned: bool,
    /// The fixed sincos2d table `[N, D]`, built once (no parameters).
    sincos: Option<Tensor>,
    /// The convolutional stem, if the config has one.
    stem: Option<ConvStem>,
    /// The window of overlapping patches (`patch_kernel` larger than `patch`), if any.
    overlap: Option<ConvWindow>,
}

/// What [`Embedding::backward`] needs, for images `[B, C, H, W]` cut into N patches of p×p.
#[derive(Debug, Clone)]
pub struct EmbedSaved {
    /// The input of the patch projection, `[B, N, F]` (or `[rows, F]`, the kept rows only,
    /// under PatchDropout): the flattened patches (`F = C·p·p`, features ordered `(c, py, px)`),
    /// the overlapping windows (`F = k·k·C`, ordered `(ky, kx, c)`) or the stem's output
    /// (`F = stem.last()`).
    patches: Tensor,
    /// The patch rows projected under PatchDropout, an index into the `B·N` rows.
    kept: Option<RowIndex>,
    /// The stem's saved activations, with a stem.
    stem: Option<StemSaved>,
    /// The batch size B.
    batch: usize,
}

/// The sincos2d table `[grid·grid, D]` (big_vision `posemb_sincos_2d`, temperature 10000):
/// token `(y, x)` row-major; features `[sin(xω), cos(xω), sin(yω), cos(yω)]`, ω_i = 10000^(−i/(D/4−1)).
pub fn sincos2d(grid: usize, width: usize) -> Vec<f32> {
    let q = width / 4;
    let omega: Vec<f64> = (0..q).map(|i| 1.0 / 10000f64.powf(i as f64 / (q as f64 - 1.0).max(1.0))).collect();
    let mut out = vec![0.0f32; grid * grid * width];
    for y in 0..grid {
        for x in 0..grid {
            let row = &mut out[(y * grid + x) * width..][..width];
            for (i, w) in omega.iter().enumerate() {
                row[i] = (x as f64 * w).sin() as f32;
                row[q + i] = (x as f64 * w).cos() as f32;
                row[2 * q + i] = (y as f64 * w).sin() as f32;
                row[3 * q + i] = (y as f64 * w).cos() as f32;
            }
        }
    }
    out
}

/// Bilinear resampling of a learned position embedding `[1, T, D]` from an `old × old` grid to
/// `new × new` (half-pixel centres, as `jax.image.resize`), keeping a leading class-token
/// position unchanged when `cls` is set: how a model is fine-tuned at another resolution.
pub fn resample_posemb(pos: &Tensor, old: usize, new: usize, cls: bool) -> Result<Tensor> {
    let (t, d) = (pos.dims().get(1).copied().unwrap_or(0), pos.shape().last());
    let extra = usize::from(cls);
    if pos.rank() != 3 || pos.dims()[0] != 1 || t != old * old + extra {
        return Err(ModelError::Param {
            name: "pos_embed".into(),
            msg: format!("expected [1, {}, D] for a {old}x{old} grid, found {}", old * old + extra, pos.shape()),
        });
    }
    let v = pos.to_f32_vec()?;
    let mut out = v[..extra * d].to_vec();
    let src = |y: usize, x: usize, c: usize| v[(extra + y * old + x) * d + c];
    let coord = |i: usize| ((i as f64 + 0.5) * old as f64 / new as f64 - 0.5).clamp(0.0, (old - 1) as f64);
    for y in 0..new {
        let fy = coord(y);
        let (y0, wy) = (fy.floor() as usize, fy - fy.floor());
        let y1 = (y0 + 1).min(old - 1);
        for x in 0..new {
            let fx = coord(x);
            let (x0, wx) = (fx.floor() as usize, fx - fx.floor());
            let x1 = (x0 + 1).min(old - 1);
            for c in 0..d {
                let top = src(y0, x0, c) as f64 * (1.0 - wx) + src(y0, x1, c) as f64 * wx;
                let bottom = src(y1, x0, c) as f64 * (1.0 - wx) + src(y1, x1, c) as f64 * wx;
                out.push((top * (1.0 - wy) + bottom * wy) as f32);
            }
        }
    }
    Ok(Tensor::from_f32(out, [1, new * new + extra, d], pos.dtype(), pos.device())?)
}

impl Embedding {
    /// The embedding of `cfg`; the sincos2d table (if any) is built in `dtype` on `device`.
    pub fn new(cfg: &ModelConfig, dtype: DType, device: Device) -> Result<Self> {
        let n = cfg.num_patches();
        let sincos = match cfg.posemb {
            PosEmb::Sincos2d => {
                Some(Tensor::from_f32(sincos2d(cfg.grid(), cfg.width), [n * cfg.width], dtype, device)?)
            }
            PosEmb::Learn => None,
        };
        Ok(Embedding {
            patch: cfg.patch,
            channels: cfg.channels,
            width: cfg.width,
            tokens: n,
            cls: cfg.pool == Pool::Tok,
            learned: cfg.posemb == PosEmb::Learn,
            sincos,
            stem: ConvStem::new(cfg),
            overlap: Some(cfg.patch_window()).filter(|w| w.kernel > cfg.patch),
        })
    }

    /// Tokens per image after embedding (patches, plus the class token).
    pub fn seq_len(&self) -> usize {
        self.tokens + usize::from(self.cls)
    }

    /// Adds the patch embedding, class token and learned position embedding to `store`.
    pub fn init(&self, sink: &mut dyn ParamSink) -> Result<()> {
        let d = self.width;
        let dims = match &self.stem {
            Some(stem) => {
                stem.init(sink)?;
                [d, stem.out_channels(), 1, 1]
            }
            None => {
                let k = self.overlap.map_or(self.patch, |w| w.kernel);
                [d, self.channels, k, k]
            }
        };
        let fan_in = dims[1] * dims[2] * dims[3];
        sink.add("patch_embed.proj.weight", &dims, Fill::Normal { std: (fan_in as f32).powf(-0.5) })?;
        sink.add("patch_embed.proj.bias", &[d], Fill::Zeros)?;
        if self.cls {
            sink.add("cls_token", &[1, 1, d], Fill::Zeros)?;
        }
        if self.learned {
            sink.add("pos_embed", &[1, self.seq_len(), d], Fill::Normal { std: (d as f32).powf(-0.5) })?;
        }
        Ok(())
    }

    /// `images [batch, C, H, W] -> tokens [batch, T, D]`.
    pub fn forward(&self, p: &ParamStore, images: &Tensor) -> Result<(Tensor, EmbedSaved)> {
        self.forward_kept(p, images, None)
    }

    /// [`Embedding::forward`] that projects only the patches `kept` (an index into the
    /// `batch · N` patch rows, from [`crate::layers::patch_dropout::kept_patch_rows`]): the other
    /// tokens get the position embedding alone, and PatchDropout drops them next. Under
    /// PatchDropout the projection and its backward cost the kept fraction.
    pub fn forward_kept(
        &self,
        p: &ParamStore,
        images: &Tensor,
        kept: Option<&RowIndex>,
    ) -> Result<(Tensor, EmbedSaved)> {
        let (b, d) = (images.dims()[0], self.width);
        let expect = [self.channels, self.patch * self.grid(), self.patch * self.grid()];
        if images.rank() != 4 || images.dims()[1..] != expect {
            return Err(ModelError::Param {
                name: "images".into(),
                msg: format!("expected [batch, {}, {}, {}], found {}", expect[0], expect[1], expect[2], images.shape()),
            });
        }
        let (patches, stem) = match &self.stem {
            Some(stem) => {
                let (features, saved) = stem.forward(p, images)?;
                (features, Some(saved))
            }
            None => match self.overlap {
                Some(win) => (ops::im2col(&to_channels_last(images)?, win)?, None),
                None => (ops::patchify(images, self.patch)?, None),
            },
        };
        let (n, f) = (self.tokens, patches.shape().last());
        let patches = match kept {
            Some(rows) => ops::gather_rows(&patches.reshape([b * n, f])?, rows)?,
            None => patches,
        };
        let w = self.projection(p)?;
        let mut x = ops::linear(&patches, &w, Some(p.get("patch_embed.proj.bias")?), None, None)?.y;
        if let Some(rows) = kept {
            x = ops::scatter_add_rows(&x, rows)?.reshape([b, n, d])?;
        }
        if let Some(s) = &self.sincos {
            x = ops::bias_add(&x.reshape([b, self.tokens * d])?, s)?.reshape([b, self.tokens, d])?;
        }
        if self.cls {
            let cls = ops::broadcast(&p.get("cls_token")?.reshape([1, d])?, 0, b)?;
            x = ops::concat(&[&cls, &x], 1)?;
        }
        if self.learned {
            let t = self.seq_len();
            x = ops::bias_add(&x.reshape([b, t * d])?, &p.get("pos_embed")?.reshape([t * d])?)?.reshape([b, t, d])?;
        }
        Ok((x, EmbedSaved { patches, kept: kept.cloned(), stem, batch: b }))
    }

    /// Accumulates parameter gradients; returns the gradient of the images.
    pub fn backward(&self, p: &ParamStore, s: &EmbedSaved, dx: &Tensor, g: &mut ParamStore) -> Result<Tensor> {
        let (b, d, t) = (s.batch, self.width, self.seq_len());
        if self.learned {
            g.accumulate("pos_embed", &ops::bias_add_bwd(&dx.reshape([b, t * d])?)?.reshape([1, t, d])?)?;
        }
        let dtok = if self.cls {
            g.accumulate("cls_token", &ops::sum(&ops::slice(dx, 1, 0, 1)?, 0)?.reshape([1, 1, d])?)?;
            ops::slice(dx, 1, 1, self.tokens)?
        } else {
            dx.clone()
        };
        let dtok = match &s.kept {
            Some(rows) => ops::gather_rows(&dtok.reshape([b * self.tokens, d])?, rows)?,
            None => dtok,
        };
        let mut dpatches = ops::matmul_t(&dtok, &self.projection(p)?, false, false)?;
        let (weight, bias) = ("patch_embed.proj.weight", "patch_embed.proj.bias");
        match self.overlap {
            // The kernel `[D, C, k, k]` was permuted to the windows' `(ky, kx, c)` order.
            Some(win) if self.channels > 1 => {
                let (rows, f) = (s.patches.numel() / s.patches.shape().last(), s.patches.shape().last());
                let dw = ops::matmul_t(&dtok.reshape([rows, d])?, &s.patches.reshape([rows, f])?, true, false)?;
                let dw = ops::permute(&dw.reshape([d, win.kernel, win.kernel, self.channels])?, &[0, 3, 1, 2])?;
                g.accumulate(weight, &dw)?;
                g.accumulate(bias, &ops::bias_add_bwd(&dtok)?)?;
            }
            _ => ops::linear_wgrad(g, weight, Some(bias), &s.patches, &dtok)?,
        }
        if let Some(rows) = &s.kept {
            // The dropped patches' gradient is zero.
            let f = s.patches.shape().last();
            dpatches = ops::scatter_add_rows(&dpatches, rows)?.reshape([b, self.tokens, f])?;
        }
        if let (Some(stem), Some(saved)) = (&self.stem, &s.stem) {
            return stem.backward(p, saved, &dpatches, g);
        }
        let side = self.patch * self.grid();
        if let Some(win) = self.overlap {
            let image = ops::col2im(&dpatches, side, side, self.channels, win)?;
            return from_channels_last(&image);
        }
        Ok(ops::unpatchify(&dpatches, self.channels, side, side, self.patch)?)
    }

    /// The patch projection's kernel as `[D, F]` in the order of its input's features: the
    /// stored `[D, C, k, k]` permuted to `[D, k, k, C]` for overlapping windows of several
    /// channels (a reshape for one channel, for the plain patches and for a stem).
    fn projection(&self, p: &ParamStore) -> Result<Tensor> {
        let w = p.get("patch_embed.proj.weight")?;
        let d = self.width;
        let w = match self.overlap {
            Some(_) if self.channels > 1 => ops::permute(w, &[0, 2, 3, 1])?,
            _ => w.clone(),
        };
        Ok(w.reshape([d, w.numel() / d])?)
    }

    fn grid(&self) -> usize {
        (self.tokens as f64).sqrt().round() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(values: Vec<f32>, t: usize, d: usize) -> Tensor {
        Tensor::from_f32(values, [1, t, d], DType::F32, Device::Cpu).unwrap()
    }

    #[test]
    fn resampling_keeps_identity_constants_and_the_class_token() {
        let p = Tensor::randn([1, 1 + 9, 4], 0.0, 1.0, 1, DType::F32, Device::Cpu).unwrap();
        assert_eq!(resample_posemb(&p, 3, 3, true).unwrap().to_f32_vec().unwrap(), p.to_f32_vec().unwrap());
        let c = pos(vec![0.5; 4 * 2], 4, 2);
        let r = resample_posemb(&c, 2, 5, false).unwrap();
        assert_eq!(r.dims(), &[1, 25, 2]);
        assert!(r.to_f32_vec().unwrap().iter().all(|&v| (v - 0.5).abs() < 1e-6));
        let up = resample_posemb(&p, 3, 6, true).unwrap();
        assert_eq!(up.to_f32_vec().unwrap()[..4], p.to_f32_vec().unwrap()[..4], "class token row kept");
        assert!(resample_posemb(&p, 4, 6, true).unwrap_err().to_string().contains("[1, 17, D] for a 4x4 grid"));
    }

    #[test]
    fn upsampling_a_ramp_interpolates_with_half_pixel_centres() {
        // A 2x2 grid [[0, 1], [2, 3]] to 4x4: output centres map to source -0.25, 0.25, 0.75, 1.25 (clamped).
        let r = resample_posemb(&pos(vec![0.0, 1.0, 2.0, 3.0], 4, 1), 2, 4, false).unwrap().to_f32_vec().unwrap();
        let row0 = [0.0, 0.25, 0.75, 1.0];
        for (x, want) in row0.iter().enumerate() {
            assert!((r[x] - want).abs() < 1e-6, "row 0 col {x}: {} vs {want}", r[x]);
            assert!((r[12 + x] - (want + 2.0)).abs() < 1e-6, "row 3 col {x}");
        }
        assert!((r[4 + 1] - (0.25 + 0.5)).abs() < 1e-6, "row 1 col 1");
    }

    #[test]
    fn sincos2d_matches_big_vision_layout() {
        let t = sincos2d(2, 8);
        // Token (y=1, x=0): sin(0)=0, cos(0)=1 for the x half; sin(1·ω), cos(1·ω) for y with ω_0 = 1.
        let tok = &t[2 * 8..3 * 8];
        assert_eq!(tok[0], 0.0);
        assert_eq!(tok[2], 1.0);
        assert!((tok[4] - 1f32.sin()).abs() < 1e-6 && (tok[6] - 1f32.cos()).abs() < 1e-6);
        // ω_1 = 1/10000 with D/4 = 2.
        assert!((tok[5] - (1e-4f32).sin()).abs() < 1e-9);
    }
}
