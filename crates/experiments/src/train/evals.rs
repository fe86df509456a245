//! `[[evals]]`: big_vision's `config.evals`, evaluations run during training. Each entry has a
//! `kind`, a `name` and an `every` (steps; every entry also runs after the last step):
//!
//! ```toml
//! [[evals]]
//! kind = "classification"   # top-1 accuracy and loss of the model's head on a split
//! name = "val"
//! split = "test"            # "test" (data.test, default) or "train" (data.train)
//! every = 100
//!
//! [[evals]]
//! kind = "classification"   # the same with test-time augmentation (crate::train::tta):
//! name = "val_tta"          # the mean logits over each image's mirror image and one-pixel
//! tta = ["flip_lr", "shift"] # shifts; an entry with tta does not replace the plain test one
//! every = 100
//!
//! [[evals]]
//! kind = "fewshot"          # ridge regression on frozen pre-logit features (crate::fewshot)
//! name = "fewshot"
//! shots = [1, 5, 10]
//! seeds = 3                 # seeds per shot count, averaged (default 3)
//! every = 500
//!
//! [[evals]]
//! kind = "linear_probe"     # the same ridge classifier on every training example's features
//! name = "probe"
//! every = 500
//! ```
//!
//! Results go into the step's `metrics.jsonl` line as `eval/<name>/<metric>` and into
//! `summary.json` as `eval.<name>.<metric>` (the last value of each): `accuracy`, `error`
//! (1 − accuracy) and `loss` for `classification`; `<k>shot_accuracy` and `<k>shot_error` for
//! `fewshot`; `accuracy` and `error` for `linear_probe`. `train.eval_every = N` is shorthand for
//! `{ kind = "classification", name = "test", split = "test", every = N }` (added unless an
//! entry already evaluates the test split); the first classification of the test split also
//! writes the legacy `test_accuracy` and `test_loss`.

use crate::{
    fewshot::{fewshot_accuracy, linear_probe_accuracy, Features},
    train::{config::TrainConfig, data::Data, evaluate, tta::TtaOp, TrainError},
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use vit_data::Loader;
use vit_model::{ParamStore, VisionTransformer};
use vit_tensor::{DType, Device};

/// Frozen features `[N, F]` (row-major), `F`, and the `N` labels of one split.
type Extracted = (Vec<f32>, usize, Vec<i32>);

/// `kind` of an `[[evals]]` entry.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum EvalKind {
    /// `classification`: the head's top-1 accuracy and loss on `split`.
    #[serde(rename = "classification")]
    Classification,
    /// `fewshot`: few-shot ridge classifiers on frozen features, for each of `shots`.
    #[serde(rename = "fewshot")]
    Fewshot,
    /// `linear_probe`: a ridge classifier on the frozen features of the whole training split.
    #[serde(rename = "linear_probe")]
    LinearProbe,
}

/// `split` of a classification entry.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum EvalSplit {
    /// `test`: `data.test` (after `data.test_limit`).
    #[default]
    #[serde(rename = "test")]
    Test,
    /// `train`: `data.train` (after `data.train_limit`), with the evaluation preprocessing.
    #[serde(rename = "train")]
    Train,
}

/// One `[[evals]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalEntry {
    pub kind: EvalKind,
    /// The metrics' prefix `eval/<name>/`: letters, digits, `_` and `-`, unique.
    pub name: String,
    /// Evaluate every this many steps (and after the last); 0 = only after the last.
    pub every: u64,
    /// `classification` only: the split (default `test`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<EvalSplit>,
    /// `fewshot` only: training images per class, one classifier each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shots: Vec<usize>,
    /// `fewshot` only: seeds per shot count, averaged (default 3, big_vision's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<u64>,
    /// `classification` only: test-time augmentation, e.g. `["flip_lr"]` (default none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tta: Vec<TtaOp>,
}

impl EvalEntry {
    /// The plain test classification (no TTA): what `train.eval_every` adds and what writes
    /// the legacy `test_accuracy`.
    fn is_test_classification(&self) -> bool {
        self.kind == EvalKind::Classification
            && self.split.unwrap_or_default() == EvalSplit::Test
            && self.tta.is_empty()
    }
}

/// Checks the `[[evals]]` entries of `cfg` (one-line errors naming the entry, the key, the
/// value and what was expected).
pub fn validate(cfg: &TrainConfig) -> Result<(), TrainError> {
    let mut names = std::collections::BTreeSet::new();
    for (i, e) in cfg.evals.iter().enumerate() {
        let bad = |key: &str, value: String, expected: &str| {
            Err(TrainError::Config(format!("evals[{i}] ({:?}): {key} = {value}: expected {expected}", e.name)))
        };
        if e.name.is_empty() || !e.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return bad("name", format!("{:?}", e.name), "a name of letters, digits, _ and -");
        }
        if !names.insert(e.name.as_str()) {
            return bad("name", format!("{:?}", e.name), "a name no other entry has");
        }
        if e.kind != EvalKind::Classification && e.split.is_some() {
            return bad("split", format!("{:?}", e.split.unwrap_or_default()), "no split: it is for classification");
        }
        if e.kind != EvalKind::Classification && !e.tta.is_empty() {
            return bad("tta", format!("{:?}", crate::train::tta::names(&e.tta)), "no tta: it is for classification");
        }
        if let Err(why) = crate::train::tta::check(&e.tta) {
            return bad("tta", format!("{:?}", crate::train::tta::names(&e.tta)), &why);
        }
        match e.kind {
            EvalKind::Fewshot => {
                if e.shots.is_empty() || e.shots.contains(&0) {
                    return bad("shots", format!("{:?}", e.shots), "a list of positive shot counts, e.g. [1, 5, 10]");
                }
                if e.seeds == Some(0) {
                    return bad("seeds", "0".into(), "at least 1");
                }
            }
            _ if !e.shots.is_empty() => {
                return bad("shots", format!("{:?}", e.shots), "no shots: they are for fewshot")
            }
            _ if e.seeds.is_some() => {
                return bad("seeds", format!("{}", e.seeds.unwrap_or(0)), "no seeds: they are for fewshot")
            }
            _ => {}
        }
    }
    if cfg.train.eval_every > 0 && cfg.evals.iter().any(EvalEntry::is_test_classification) {
        return Err(TrainError::Config(format!(
            "train.eval_every = {}: expected 0 when an [[evals]] entry already evaluates the test split (set its every instead)",
            cfg.train.eval_every
        )));
    }
    Ok(())
}

/// The entries a run evaluates: `[[evals]]`, plus `train.eval_every`'s test classification
/// (named `test`) unless an entry evaluates the test split already.
pub fn entries(cfg: &TrainConfig) -> Vec<EvalEntry> {
    let mut out = cfg.evals.clone();
    if !out.iter().any(EvalEntry::is_test_classification) {
        let name = if out.iter().any(|e| e.name == "test") { "test_split" } else { "test" };
        out.insert(
            0,
            EvalEntry {
                kind: EvalKind::Classification,
                name: name.into(),
                every: cfg.train.eval_every,
                split: Some(EvalSplit::Test),
                shots: Vec::new(),
                seeds: None,
                tta: Vec::new(),
            },
        );
    }
    out
}

/// The evaluations of one run: its entries, their loaders, and the last result of each metric.
pub struct Evaluator {
    entries: Vec<EvalEntry>,
    train_loader: Loader,
    test_loader: Loader,
    classes: usize,
    sigmoid: bool,
    device: Device,
    /// `name → metric → value`, the newest of each.
    latest: BTreeMap<String, BTreeMap<String, f64>>,
}

impl Evaluator {
    /// The evaluations of `cfg` over `data`'s splits (evaluation preprocessing, batches of
    /// `batch`) on `device`.
    pub fn new(cfg: &TrainConfig, data: &Data, batch: usize, device: Device) -> Result<Self, TrainError> {
        let classes = data.train.num_classes().max(data.test.num_classes());
        Ok(Evaluator {
            entries: entries(cfg),
            train_loader: data.eval_loader(&data.train, batch)?,
            test_loader: data.eval_loader(&data.test, batch)?,
            classes,
            sigmoid: cfg.train.loss == crate::train::config::LossKind::Sigmoid,
            device,
            latest: BTreeMap::new(),
        })
    }

    /// Whether any entry evaluates after step `done` (`last`: the run's last step).
    pub fn due(&self, done: u64, last: bool) -> bool {
        self.entries.iter().any(|e| last || (e.every > 0 && done.is_multiple_of(e.every)))
    }

    /// Runs the entries due after step `done` on `params` (the compute copy), writes their
    /// metrics into the metrics line `line` (`eval/<name>/<metric>`, and `test_accuracy` /
    /// `test_loss` for the test classification), and returns that `(accuracy, loss)` when it ran.
    pub fn run(
        &mut self,
        model: &VisionTransformer,
        params: &ParamStore,
        done: u64,
        last: bool,
        line: &mut serde_json::Value,
    ) -> Result<Option<(f64, f64)>, TrainError> {
        let mut test = None;
        // Frozen features of both splits, computed once per step for the entries that need them.
        let mut features: Option<(Extracted, Extracted)> = None;
        let entries = self.entries.clone();
        let mut legacy_done = false;
        for e in entries.iter().filter(|e| last || (e.every > 0 && done.is_multiple_of(e.every))) {
            let mut m = BTreeMap::new();
            match e.kind {
                EvalKind::Classification => {
                    let loader = match e.split.unwrap_or_default() {
                        EvalSplit::Test => &self.test_loader,
                        EvalSplit::Train => &self.train_loader,
                    };
                    let (acc, loss) = evaluate(model, params, loader, self.device, self.sigmoid, &e.tta)?;
                    m.insert("accuracy".to_string(), acc);
                    m.insert("error".to_string(), 1.0 - acc);
                    m.insert("loss".to_string(), loss);
                    if e.is_test_classification() && !legacy_done {
                        legacy_done = true;
                        test = Some((acc, loss));
                    }
                }
                EvalKind::Fewshot | EvalKind::LinearProbe => {
                    if features.is_none() {
                        let train = self.features(model, params, &self.train_loader)?;
                        features = Some((train, self.features(model, params, &self.test_loader)?));
                    }
                    let ((xtr, dim, ytr), (xte, _, yte)) = features.as_ref().expect("computed above");
                    let tr = Features { x: xtr, labels: ytr, dim: *dim };
                    let te = Features { x: xte, labels: yte, dim: *dim };
                    let fail = |err: crate::fewshot::FewShotError| {
                        TrainError::Config(format!("evals {:?} at step {done}: {err}", e.name))
                    };
                    if e.kind == EvalKind::LinearProbe {
                        let acc = linear_probe_accuracy(tr, te, self.classes).map_err(fail)?;
                        m.insert("accuracy".to_string(), acc);
                        m.insert("error".to_string(), 1.0 - acc);
                    } else {
                        let seeds = e.seeds.unwrap_or(3);
                        for &shots in &e.shots {
                            let mut sum = 0.0;
                            for seed in 0..seeds {
                                sum += fewshot_accuracy(tr, te, self.classes, shots, seed).map_err(fail)?;
                            }
                            let acc = sum / seeds as f64;
                            m.insert(format!("{shots}shot_accuracy"), acc);
                            m.insert(format!("{shots}shot_error"), 1.0 - acc);
                        }
                    }
                }
            }
            for (k, v) in &m {
                line[format!("eval/{}/{k}", e.name)] = (*v).into();
            }
            self.latest.insert(e.name.clone(), m);
        }
        if let Some((acc, loss)) = test {
            line["test_accuracy"] = acc.into();
            line["test_loss"] = loss.into();
        }
        Ok(test)
    }

    /// The newest value of every metric, `name → metric → value` (`summary.json`'s `eval`).
    pub fn latest(&self) -> &BTreeMap<String, BTreeMap<String, f64>> {
        &self.latest
    }

    /// Pre-logit features `[N, F]` (row-major), their width and the labels of one pass of `loader`.
    fn features(
        &self,
        model: &VisionTransformer,
        params: &ParamStore,
        loader: &Loader,
    ) -> Result<Extracted, TrainError> {
        let dtype = params.iter().next().map_or(DType::F32, |(_, t)| t.dtype());
        let (mut out, mut labels, mut dim) = (Vec::new(), Vec::new(), 0);
        for b in loader.iter() {
            let b = b?;
            let (f, _) = model.features_and_logits(params, &b.images.to_device(self.device)?.cast(dtype)?)?;
            dim = f.dims()[1];
            out.extend(f.to_f32_vec()?);
            labels.extend(b.labels.to_vec::<i32>()?);
        }
        Ok((out, dim, labels))
    }
}

#[cfg(test)]
mod tests {
    use crate::train::config::{TrainConfig, QUICKSTART};

    fn parse(evals: &str, sets: &[&str]) -> Result<TrainConfig, String> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        TrainConfig::from_toml(&format!("{QUICKSTART}\n{evals}"), &sets).map_err(|e| e.to_string())
    }

    #[test]
    fn entries_parse_round_trip_and_eval_every_is_the_test_entry() {
        let text = "[[evals]]\nkind = \"fewshot\"\nname = \"fs\"\nshots = [1, 5]\nevery = 10\n\n\
                    [[evals]]\nkind = \"linear_probe\"\nname = \"probe\"\nevery = 20\n\n\
                    [[evals]]\nkind = \"classification\"\nname = \"train_acc\"\nsplit = \"train\"\nevery = 5\n";
        let cfg = parse(text, &[]).unwrap();
        assert_eq!(cfg.evals.len(), 3);
        assert_eq!(TrainConfig::from_toml(&cfg.to_toml().unwrap(), &[]).unwrap(), cfg, "round trip");
        // quickstart's eval_every = 100 becomes the test classification, first.
        let all = super::entries(&cfg);
        assert_eq!(all.len(), 4);
        assert_eq!((all[0].name.as_str(), all[0].every), ("test", 100));
        assert!(all[0].is_test_classification() && !all[3].is_test_classification());
        // An entry on the test split replaces the shorthand.
        let own = parse("[[evals]]\nkind = \"classification\"\nname = \"val\"\nevery = 7\n", &["train.eval_every=0"]);
        let all = super::entries(&own.unwrap());
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].name.as_str(), all[0].every), ("val", 7));
        // One with test-time augmentation does not: the plain test evaluation stays first.
        let tta = parse(
            "[[evals]]\nkind = \"classification\"\nname = \"test_tta\"\ntta = [\"flip_lr\", \"shift\"]\nevery = 7\n",
            &[],
        );
        let tta = tta.unwrap();
        assert_eq!(TrainConfig::from_toml(&tta.to_toml().unwrap(), &[]).unwrap(), tta, "round trip");
        let all = super::entries(&tta);
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].name.as_str(), all[0].tta.len()), ("test", 0));
        assert_eq!((all[1].name.as_str(), all[1].tta.len()), ("test_tta", 2));
    }

    /// configs/vit-s16-i1k.toml is "Better plain ViT baselines" (Beyer et al. 2022).
    #[test]
    fn the_s16_i1k_recipe_is_the_better_plain_vit_baseline() {
        let cfg = TrainConfig::from_toml(include_str!("../../../../configs/vit-s16-i1k.toml"), &[]).unwrap();
        let m = cfg.model_config().unwrap();
        assert_eq!((m.width, m.depth, m.patch, m.classes), (384, 12, 16, 1000));
        assert_eq!((m.pool, m.posemb), (vit_model::Pool::Gap, vit_model::PosEmb::Sincos2d));
        assert_eq!((cfg.train.batch_size, cfg.train.epochs), (1024, Some(90.0)));
        assert_eq!(cfg.data.mixup.as_ref().map(|m| m.p), Some(0.2));
        assert!(cfg.data.augment.iter().any(|t| matches!(
            t,
            vit_data::Transform::Randaug { num_layers: 2, magnitude, .. } if *magnitude == 10.0
        )));
        let all = super::entries(&cfg);
        assert_eq!((all.len(), all[0].name.as_str(), all[0].every), (1, "val", 2500));
    }

    #[test]
    fn bad_entries_are_one_line_errors_naming_the_entry_and_the_key() {
        let entry = |body: &str| format!("[[evals]]\n{body}\n");
        for (body, sets, want) in [
            ("kind = \"fewshots\"\nname = \"a\"\nevery = 1", &[][..], "fewshots"),
            ("kind = \"fewshot\"\nname = \"a\"", &[][..], "missing field `every`"),
            (
                "kind = \"fewshot\"\nname = \"a\"\nevery = 1",
                &[][..],
                "evals[0] (\"a\"): shots = []: expected a list of positive shot counts",
            ),
            ("kind = \"fewshot\"\nname = \"a\"\nevery = 1\nshots = [0, 5]", &[][..], "shots = [0, 5]"),
            (
                "kind = \"fewshot\"\nname = \"a\"\nevery = 1\nshots = [1]\nseeds = 0",
                &[][..],
                "seeds = 0: expected at least 1",
            ),
            (
                "kind = \"fewshot\"\nname = \"a\"\nevery = 1\nshots = [1]\nsplit = \"test\"",
                &[][..],
                "split = Test: expected no split",
            ),
            (
                "kind = \"linear_probe\"\nname = \"a\"\nevery = 1\nshots = [1]",
                &[][..],
                "shots = [1]: expected no shots",
            ),
            (
                "kind = \"linear_probe\"\nname = \"a b\"\nevery = 1",
                &[][..],
                "name = \"a b\": expected a name of letters",
            ),
            ("kind = \"linear_probe\"\nname = \"a\"\nevery = 1\nevry = 2", &[][..], "evry"),
            ("kind = \"classification\"\nname = \"a\"\nevery = 1\nsplit = \"val\"", &[][..], "val"),
            (
                "kind = \"fewshot\"\nname = \"a\"\nevery = 1\nshots = [1]\ntta = [\"flip_lr\"]",
                &[][..],
                "tta = [\"flip_lr\"]: expected no tta: it is for classification",
            ),
            (
                "kind = \"classification\"\nname = \"a\"\nevery = 1\ntta = [\"flip_lr\", \"flip_lr\"]",
                &["train.eval_every=0"][..],
                "tta = [\"flip_lr\", \"flip_lr\"]: expected each op at most once (flip_lr is listed twice)",
            ),
            ("kind = \"classification\"\nname = \"a\"\nevery = 1\ntta = [\"flip\"]", &[][..], "flip"),
            (
                "kind = \"classification\"\nname = \"a\"\nevery = 1",
                &["train.eval_every=5"][..],
                "train.eval_every = 5: expected 0 when",
            ),
        ] {
            let e = parse(&entry(body), sets).unwrap_err();
            assert!(e.contains(want), "{body:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let twice = format!(
            "{}{}",
            entry("kind = \"linear_probe\"\nname = \"p\"\nevery = 1"),
            entry("kind = \"linear_probe\"\nname = \"p\"\nevery = 2")
        );
        let e = parse(&twice, &[]).unwrap_err();
        assert!(e.contains("evals[1] (\"p\"): name = \"p\": expected a name no other entry has"), "{e}");
    }
}
