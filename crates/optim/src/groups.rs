//! Parameter groups by name pattern: per-parameter learning-rate multiplier, weight-decay
//! multiplier and freezing, as big_vision's `config.lr_mults`, `config.wd_mults` and frozen
//! (`schedule = None`) rules (reference §3).
//!
//! # Matching syntax
//!
//! Each list is a sequence of rules `(pattern, value)`. A pattern is a regular expression
//! (the `regex` crate's syntax, close to Python's `re`) that must match the **whole** dotted
//! parameter name, as Python's `re.fullmatch` does in big_vision (`head\.weight` matches
//! `head.weight` only; `.*\.bias` matches every bias). For each parameter, **the first rule of
//! a list whose pattern matches wins**; the three lists are resolved independently. A
//! parameter no rule matches gets learning-rate multiplier 1, weight-decay multiplier 0 (as
//! big_vision: weight decay only where a rule asks for it) and is not frozen.
//!
//! A frozen parameter gets no optimizer state and no update (not even weight decay), and its
//! gradient is left out of the global norm used for clipping (big_vision masks the clipping
//! with the not-frozen mask too).

use crate::OptimError;
use regex::Regex;

/// The Scaling-ViT weight-decay rules (reference §3; big_vision `wd_mults =
/// [('.*head/kernel', 100), ('.*/kernel', 1)]` translated to vitrs names, where norms' scales
/// are also called `weight`):
///
/// | pattern | mult | matches |
/// |---|---|---|
/// | `head\.weight` | 100 | the classifier kernel |
/// | `(.*\.)?[a-z_]*norm[0-9]*\.weight` | 0 | LayerNorm scales: `norm1`, `norm2`, `norm`, `in_norm`, `q_norm`, `k_norm`, `attn_pool.norm` |
/// | `.*\.weight` | 1 | every other kernel (patch embedding, qkv, proj, fc1/fc2, in/out_proj, MAP head, pre-logits) |
/// | `.*` | 0 | biases, `mlp_bias`, `pos_embed`, `cls_token`, `attn_pool.latent` (the probe) |
pub const SCALING_VIT_WD_MULTS: [(&str, f64); 4] =
    [(r"head\.weight", 100.0), (r"(.*\.)?[a-z_]*norm[0-9]*\.weight", 0.0), (r".*\.weight", 1.0), (r".*", 0.0)];

/// Rules by parameter-name pattern; see the module docs for the matching syntax.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroups {
    /// `(pattern, multiplier)`: the learning rate of matching parameters is `lr · multiplier`
    /// (must be > 0; freeze instead of using 0). Unmatched: 1.
    pub lr_mults: Vec<(String, f64)>,
    /// `(pattern, multiplier)`: the weight decay of matching parameters is `weight_decay ·
    /// multiplier` (≥ 0). Unmatched: 0.
    pub wd_mults: Vec<(String, f64)>,
    /// Patterns of parameters that get no state and no update.
    pub frozen: Vec<String>,
}

impl Default for ParamGroups {
    /// [`ParamGroups::scaling_vit`].
    fn default() -> Self {
        Self::scaling_vit()
    }
}

impl ParamGroups {
    /// The Scaling-ViT rules: [`SCALING_VIT_WD_MULTS`], no learning-rate multipliers, nothing frozen.
    pub fn scaling_vit() -> Self {
        ParamGroups {
            lr_mults: Vec::new(),
            wd_mults: SCALING_VIT_WD_MULTS.iter().map(|&(p, m)| (p.to_string(), m)).collect(),
            frozen: Vec::new(),
        }
    }

    /// No rules at all: multiplier 1 for the learning rate, no weight decay anywhere, nothing frozen.
    pub fn none() -> Self {
        ParamGroups { lr_mults: Vec::new(), wd_mults: Vec::new(), frozen: Vec::new() }
    }

    /// Appends a frozen pattern (builder style).
    pub fn freeze(mut self, pattern: impl Into<String>) -> Self {
        self.frozen.push(pattern.into());
        self
    }

    /// Puts an lr-multiplier rule in front of the others, so it wins over them (builder style).
    pub fn with_lr_mult(mut self, pattern: impl Into<String>, mult: f64) -> Self {
        self.lr_mults.insert(0, (pattern.into(), mult));
        self
    }

    /// Puts a weight-decay-multiplier rule in front of the others, so it wins (builder style).
    pub fn with_wd_mult(mut self, pattern: impl Into<String>, mult: f64) -> Self {
        self.wd_mults.insert(0, (pattern.into(), mult));
        self
    }

    /// Checks every pattern and value and compiles the patterns.
    pub fn compile(&self) -> Result<CompiledGroups, OptimError> {
        let rule = |list, index, pattern: &str, msg: String| OptimError::Rule {
            list,
            index,
            pattern: pattern.to_string(),
            msg,
        };
        let re = |list, index, pattern: &str| {
            Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                rule(list, index, pattern, format!("not a valid regular expression: {}", one_line(&e.to_string())))
            })
        };
        let mut lr_mults = Vec::new();
        for (i, (p, m)) in self.lr_mults.iter().enumerate() {
            if !(m.is_finite() && *m > 0.0) {
                return Err(rule(
                    "lr_mults",
                    i,
                    p,
                    format!("multiplier {m}: expected a finite value > 0 (freeze a parameter instead of giving it 0)"),
                ));
            }
            lr_mults.push((re("lr_mults", i, p)?, *m));
        }
        let mut wd_mults = Vec::new();
        for (i, (p, m)) in self.wd_mults.iter().enumerate() {
            if !(m.is_finite() && *m >= 0.0) {
                return Err(rule("wd_mults", i, p, format!("multiplier {m}: expected a finite value >= 0")));
            }
            wd_mults.push((re("wd_mults", i, p)?, *m));
        }
        let frozen = self.frozen.iter().enumerate().map(|(i, p)| re("frozen", i, p)).collect::<Result<_, _>>()?;
        Ok(CompiledGroups { lr_mults, wd_mults, frozen })
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What the rules give one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamSettings {
    /// Multiplier of the learning rate.
    pub lr_mult: f64,
    /// Multiplier of the weight decay.
    pub wd_mult: f64,
    /// No state, no update.
    pub frozen: bool,
}

/// [`ParamGroups`] with compiled patterns.
#[derive(Debug, Clone)]
pub struct CompiledGroups {
    lr_mults: Vec<(Regex, f64)>,
    wd_mults: Vec<(Regex, f64)>,
    frozen: Vec<Regex>,
}

impl CompiledGroups {
    /// The settings of the parameter named `name` (first matching rule of each list wins).
    pub fn settings(&self, name: &str) -> ParamSettings {
        let first = |rules: &[(Regex, f64)], default| {
            rules.iter().find(|(re, _)| re.is_match(name)).map(|&(_, m)| m).unwrap_or(default)
        };
        ParamSettings {
            lr_mult: first(&self.lr_mults, 1.0),
            wd_mult: first(&self.wd_mults, 0.0),
            frozen: self.frozen.iter().any(|re| re.is_match(name)),
        }
    }

    /// `(list, index)` of every `lr_mults` / `wd_mults` rule whose pattern matches none of
    /// `names`, in list order (`lr_mults` first): a typo, or a rule written for another model.
    pub fn unmatched_rules(&self, names: &[&str]) -> Vec<(&'static str, usize)> {
        let unused = |list: &'static str, rules: &[(Regex, f64)]| {
            rules
                .iter()
                .enumerate()
                .filter(|(_, (re, _))| !names.iter().any(|n| re.is_match(n)))
                .map(move |(i, _)| (list, i))
                .collect::<Vec<_>>()
        };
        [unused("lr_mults", &self.lr_mults), unused("wd_mults", &self.wd_mults)].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_that_match_no_name_are_listed_by_list_and_index() {
        let g = ParamGroups::scaling_vit()
            .with_wd_mult(r"haed\.weight", 1.0)
            .with_lr_mult(r"blocks\.0\..*", 0.5)
            .with_lr_mult("pos_embd", 2.0)
            .compile()
            .unwrap();
        let names = ["head.weight", "head.bias", "blocks.0.norm1.weight", "pos_embed"];
        // lr_mults: [pos_embd, blocks.0.*]; wd_mults: [haed.weight, then Scaling ViT's four
        // rules, which all match one of these names].
        assert_eq!(g.unmatched_rules(&names), vec![("lr_mults", 0), ("wd_mults", 0)]);
        // Whole-name matching: a prefix is not a match.
        let g = ParamGroups::none().with_wd_mult("head", 1.0).compile().unwrap();
        assert_eq!(g.unmatched_rules(&names), vec![("wd_mults", 0)]);
        assert_eq!(g.unmatched_rules(&["head"]), vec![]);
    }

    #[test]
    fn scaling_vit_weight_decay_rules_on_every_contract_name() {
        let g = ParamGroups::scaling_vit().compile().unwrap();
        let cases = [
            ("head.weight", 100.0),
            ("head.bias", 0.0),
            ("patch_embed.proj.weight", 1.0),
            ("patch_embed.proj.bias", 0.0),
            ("cls_token", 0.0),
            ("pos_embed", 0.0),
            ("blocks.0.norm1.weight", 0.0),
            ("blocks.0.norm1.bias", 0.0),
            ("blocks.11.attn.qkv.weight", 1.0),
            ("blocks.11.attn.qkv.bias", 0.0),
            ("blocks.3.attn.q_norm.weight", 0.0),
            ("blocks.3.attn.k_norm.weight", 0.0),
            ("blocks.3.attn.k_norm.bias", 0.0),
            ("blocks.3.attn.proj.weight", 1.0),
            ("blocks.3.attn.proj.bias", 0.0),
            ("blocks.3.norm2.weight", 0.0),
            ("blocks.3.mlp.fc1.weight", 1.0),
            ("blocks.3.mlp.fc1.bias", 0.0),
            ("blocks.3.mlp.fc2.weight", 1.0),
            ("blocks.3.mlp.fc2.bias", 0.0),
            ("blocks.7.in_norm.weight", 0.0),
            ("blocks.7.in_proj.weight", 1.0),
            ("blocks.7.out_proj.weight", 1.0),
            ("blocks.7.out_proj.bias", 0.0),
            ("blocks.7.mlp_bias", 0.0),
            ("norm.weight", 0.0),
            ("norm.bias", 0.0),
            ("attn_pool.latent", 0.0),
            ("attn_pool.q.weight", 1.0),
            ("attn_pool.kv.weight", 1.0),
            ("attn_pool.kv.bias", 0.0),
            ("attn_pool.proj.weight", 1.0),
            ("attn_pool.norm.weight", 0.0),
            ("attn_pool.mlp.fc1.weight", 1.0),
            ("attn_pool.mlp.fc2.bias", 0.0),
            ("pre_logits.fc.weight", 1.0),
            ("pre_logits.fc.bias", 0.0),
        ];
        for (name, want) in cases {
            let s = g.settings(name);
            assert_eq!(s.wd_mult, want, "{name}");
            assert_eq!(s.lr_mult, 1.0, "{name}");
            assert!(!s.frozen, "{name}");
        }
    }

    #[test]
    fn first_matching_rule_wins_and_patterns_match_whole_names() {
        let g = ParamGroups::none()
            .with_lr_mult(r"blocks\..*", 0.5)
            .with_lr_mult(r"blocks\.0\..*", 0.1) // in front: wins for block 0
            .with_wd_mult(r".*weight", 2.0)
            .freeze(r"patch_embed\..*")
            .compile()
            .unwrap();
        assert_eq!(g.settings("blocks.0.mlp.fc1.weight").lr_mult, 0.1);
        assert_eq!(g.settings("blocks.10.mlp.fc1.weight").lr_mult, 0.5);
        assert_eq!(g.settings("blocks.10.mlp.fc1.weight").wd_mult, 2.0);
        assert_eq!(g.settings("head.bias"), ParamSettings { lr_mult: 1.0, wd_mult: 0.0, frozen: false });
        assert!(g.settings("patch_embed.proj.weight").frozen);
        // Full match: `head` alone does not match `head.weight`, nor `.*weight` match `weight_x`.
        let g = ParamGroups::none().with_wd_mult("head", 3.0).compile().unwrap();
        assert_eq!(g.settings("head.weight").wd_mult, 0.0);
        assert_eq!(g.settings("head").wd_mult, 3.0);
    }

    #[test]
    fn bad_rules_are_named() {
        let e = ParamGroups::none().with_wd_mult("blocks.(", 1.0).compile().unwrap_err().to_string();
        assert!(e.starts_with("parameter group rule wd_mults[0] \"blocks.(\": not a valid regular expression"), "{e}");
        let e = ParamGroups::none().with_lr_mult("head.*", 0.0).compile().unwrap_err().to_string();
        assert!(e.starts_with("parameter group rule lr_mults[0] \"head.*\": multiplier 0: expected"), "{e}");
        let e = ParamGroups::none().with_wd_mult("x", f64::NAN).compile().unwrap_err().to_string();
        assert!(e.contains("multiplier NaN"), "{e}");
        assert!(ParamGroups::none().freeze("[").compile().is_err());
    }
}
