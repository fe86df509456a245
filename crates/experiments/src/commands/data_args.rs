//! The options shared by `vit eval` and `vit fewshot`: the checkpoint, where the data comes
//! from, batch size, device and output format.

use super::CliError;
use std::path::{Path, PathBuf};
use vit_experiments::train::{
    config::{DataSection, TrainConfig},
    data::{self, Data},
};
use vit_model::{checkpoint, checkpoint::Checkpoint, VisionTransformer};
use vit_tensor::{DType, Device};

/// A checkpoint to evaluate and how.
#[derive(clap::Args)]
pub struct CheckpointArgs {
    /// A checkpoint written by `vit train` (`step-N.safetensors`) or `vit convert`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The CPU's GEMMs: `f32`, or `bf16` (inputs rounded, f32 sums; on AMX tiles where the CPU
    /// has them), as `train.matmul_precision`. CPU only.
    #[arg(long, default_value = "f32")]
    pub matmul_precision: vit_tensor::cpu::MatmulPrecision,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What [`CheckpointArgs::load`] opens.
pub struct Loaded {
    pub device: Device,
    pub checkpoint: Checkpoint,
    pub model: VisionTransformer,
    pub data: Data,
}

impl CheckpointArgs {
    /// The device, the checkpoint (checked against its model's parameter names and shapes), the
    /// model and the data.
    pub fn load(&self) -> Result<Loaded, CliError> {
        let device: Device = self.device.parse()?;
        if self.matmul_precision != vit_tensor::cpu::MatmulPrecision::F32 && device != Device::Cpu {
            return Err(CliError::Usage(format!(
                "--matmul-precision {} on {device}: expected it with --device cpu only",
                self.matmul_precision
            )));
        }
        vit_tensor::cpu::set_matmul_precision(self.matmul_precision);
        let ckpt = checkpoint::load_checkpoint(&self.checkpoint, device)?;
        let model = VisionTransformer::new(&ckpt.config, DType::F32, device)?;
        ckpt.check_against_model(&model)?;
        let data = data::load(&self.data.section(&self.checkpoint)?)?;
        Ok(Loaded { device, checkpoint: ckpt, model, data })
    }

    /// The batch size, at least 1.
    pub fn batch(&self) -> usize {
        self.batch_size.max(1)
    }
}

/// Where evaluation data comes from: explicit options, else the `[data]` of the `config.toml`
/// beside the checkpoint (a run directory).
#[derive(clap::Args)]
pub struct DataArgs {
    /// Dataset directory (default: the checkpoint's run config).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// `idx`, `cifar10`, `cifar100` or `folder`.
    #[arg(long, default_value = "idx")]
    pub format: String,
    /// Training split (IDX prefix / file / folder).
    #[arg(long)]
    pub train_split: Option<String>,
    /// Test split.
    #[arg(long)]
    pub test_split: Option<String>,
    /// Use only the first N examples of each split.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl DataArgs {
    /// The data section for `checkpoint`.
    pub fn section(&self, checkpoint: &Path) -> Result<DataSection, CliError> {
        let mut d = match &self.data {
            Some(path) => DataSection {
                format: self.format.clone(),
                path: path.to_string_lossy().into_owned(),
                train: "train".into(),
                test: "t10k".into(),
                train_limit: None,
                test_limit: None,
                augment: Vec::new(),
                eval_augment: Vec::new(),
                on_bad_example: Default::default(),
                max_bad_fraction: 0.001,
                mixup: None,
            },
            None => {
                let cfg =
                    checkpoint.parent().map(|d| d.join("config.toml")).filter(|p| p.exists()).ok_or_else(|| {
                        CliError::Usage(format!(
                            "{}: no --data given and no config.toml beside the checkpoint",
                            checkpoint.display()
                        ))
                    })?;
                TrainConfig::from_file(&cfg, &[])?.data
            }
        };
        if let Some(s) = &self.train_split {
            d.train = s.clone();
        }
        if let Some(s) = &self.test_split {
            d.test = s.clone();
        }
        if self.limit.is_some() {
            (d.train_limit, d.test_limit) = (self.limit, self.limit);
        }
        Ok(d)
    }
}
