//! `ModelConfig`: presets, overrides, validation and TOML.

use vit_model::{BlockKind, Gelu, ModelConfig, ModelError, ParamCounts, Pool, PosEmb, VisionTransformer, KEYS};
use vit_tensor::{DType, Device, Tensor};

#[test]
fn preset_names_are_case_insensitive_with_optional_vit_prefix() {
    let b16 = ModelConfig::preset("B/16").unwrap();
    for name in ["b/16", "ViT-B/16", "vit-b/16", "VIT-B/16", " B/16 "] {
        assert_eq!(ModelConfig::preset(name).unwrap(), b16, "{name}");
    }
    assert_eq!(ModelConfig::preset("vit-22b/14").unwrap(), ModelConfig::preset("22B/14").unwrap());
    assert_eq!(ModelConfig::preset("ti/16").unwrap().width, 192);
    assert_eq!(ModelConfig::preset("CUSTOM").unwrap(), ModelConfig::custom());
}

#[test]
fn giant_and_gigantic_differ_by_case() {
    assert_eq!(ModelConfig::preset("g/14").unwrap().width, 1408);
    assert_eq!(ModelConfig::preset("ViT-g/14").unwrap().width, 1408);
    assert_eq!(ModelConfig::preset("G/14").unwrap().width, 1664);
    assert_eq!(ModelConfig::preset("vit-G/14").unwrap().width, 1664);
}

#[test]
fn presets_use_the_scaling_vit_layout() {
    // The V-MoE presets use the paper's layout (class token, 1000 or 29,593 classes): tests/moe.rs
    // and tests/param_counts.rs check them.
    for name in ModelConfig::preset_names().into_iter().filter(|n| !n.starts_with("V-MoE")) {
        let cfg = ModelConfig::preset(name).unwrap();
        cfg.validate().unwrap();
        assert_eq!((cfg.image_size, cfg.channels, cfg.classes), (224, 3, 1000), "{name}");
        assert_eq!((cfg.pool, cfg.posemb, cfg.gelu), (Pool::Map, PosEmb::Learn, Gelu::Tanh), "{name}");
        assert_eq!(cfg.prelogits, None);
        assert!(!cfg.remat);
        let is_22b = name == "22B/14";
        assert_eq!(cfg.block == BlockKind::Parallel, is_22b, "{name}");
        assert_eq!(cfg.qk_norm, is_22b, "{name}");
        assert_eq!(cfg.qkv_bias, !is_22b, "{name}");
        assert_eq!(cfg.norm_bias, !is_22b, "{name}");
    }
}

#[test]
fn preset_shapes() {
    let shapes = [
        ("Ti/16", 192, 12, 768, 3, 16, 64),
        ("S/16", 384, 12, 1536, 6, 16, 64),
        ("S/32", 384, 12, 1536, 6, 32, 64),
        ("B/16", 768, 12, 3072, 12, 16, 64),
        ("B/32", 768, 12, 3072, 12, 32, 64),
        ("L/16", 1024, 24, 4096, 16, 16, 64),
        ("H/14", 1280, 32, 5120, 16, 14, 80),
        ("g/14", 1408, 40, 6144, 16, 14, 88),
        ("G/14", 1664, 48, 8192, 16, 14, 104),
        ("e/14", 1792, 56, 15360, 16, 14, 112),
        ("22B/14", 6144, 48, 24576, 48, 14, 128),
    ];
    for (name, d, l, m, h, p, dh) in shapes {
        let cfg = ModelConfig::preset(name).unwrap();
        assert_eq!((cfg.width, cfg.depth, cfg.mlp_dim, cfg.heads, cfg.patch), (d, l, m, h, p), "{name}");
        assert_eq!(cfg.head_dim(), dh, "{name}");
    }
    let g = ModelConfig::preset("G/14").unwrap();
    assert_eq!((g.grid(), g.num_patches(), g.seq_len()), (16, 256, 256));
}

#[test]
fn unknown_preset_lists_the_known_names() {
    let err = ModelConfig::preset("B/8").unwrap_err();
    assert!(matches!(err, ModelError::UnknownPreset { .. }));
    let msg = err.to_string();
    assert!(msg.contains("\"B/8\""), "{msg}");
    for name in ModelConfig::preset_names() {
        assert!(msg.contains(name), "{msg}");
    }
    assert!(!msg.contains('\n'));
}

#[test]
fn set_applies_typed_overrides() {
    let mut cfg = ModelConfig::custom();
    cfg.set("width=256").unwrap();
    cfg.set("heads = 4").unwrap();
    cfg.set("mlp-dim=1024").unwrap();
    cfg.set("pool=\"tok\"").unwrap();
    cfg.set("posemb=sincos2d").unwrap();
    cfg.set("block=parallel").unwrap();
    cfg.set("gelu=erf").unwrap();
    cfg.set("qk_norm=true").unwrap();
    cfg.set("prelogits=256").unwrap();
    cfg.set_value("remat", "true").unwrap();
    assert_eq!((cfg.width, cfg.heads, cfg.mlp_dim), (256, 4, 1024));
    assert_eq!(
        (cfg.pool, cfg.posemb, cfg.block, cfg.gelu),
        (Pool::Tok, PosEmb::Sincos2d, BlockKind::Parallel, Gelu::Erf)
    );
    assert!(cfg.qk_norm && cfg.remat);
    assert_eq!(cfg.prelogits, Some(256));
    assert_eq!(cfg.seq_len(), 197);
    cfg.validate().unwrap();
    cfg.set("prelogits=none").unwrap();
    assert_eq!(cfg.prelogits, None);
}

#[test]
fn set_rejects_unknown_keys_listing_the_valid_ones() {
    let mut cfg = ModelConfig::custom();
    let err = cfg.set("hidden_size=768").unwrap_err();
    assert!(matches!(err, ModelError::UnknownKey { .. }));
    let msg = err.to_string();
    assert!(msg.contains("hidden_size"), "{msg}");
    for key in KEYS {
        assert!(msg.contains(key), "{msg}");
    }
    assert!(matches!(cfg.set("width").unwrap_err(), ModelError::MalformedOverride(_)));
    assert_eq!(cfg, ModelConfig::custom(), "failed overrides change nothing");
}

#[test]
fn set_rejects_bad_values_naming_key_value_and_type() {
    let mut cfg = ModelConfig::custom();
    let cases = [
        ("width=-1", "width", "-1", "unsigned integer"),
        ("depth=twelve", "depth", "twelve", "unsigned integer"),
        ("pool=cls", "pool", "cls", "tok, gap, map"),
        ("posemb=sincos", "posemb", "sincos", "learn, sincos2d"),
        ("block=fused", "block", "fused", "sequential, parallel"),
        ("gelu=relu", "gelu", "relu", "tanh, erf"),
        ("qk_norm=yes", "qk_norm", "yes", "true or false"),
        ("prelogits=big", "prelogits", "big", "or none"),
    ];
    for (assignment, key, value, expected) in cases {
        let err = cfg.set(assignment).unwrap_err();
        assert!(matches!(err, ModelError::BadValue { .. }), "{assignment}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(key) && msg.contains(value) && msg.contains(expected), "{msg}");
    }
    assert_eq!(cfg, ModelConfig::custom());
}

fn invalid(overrides: &[&str]) -> String {
    let mut cfg = ModelConfig::custom();
    for o in overrides {
        cfg.set(o).unwrap();
    }
    let err = cfg.validate().unwrap_err();
    assert!(matches!(err, ModelError::InvalidConfig { .. }), "{err}");
    err.to_string()
}

#[test]
fn validate_names_field_value_and_expectation() {
    for key in ["image_size", "patch", "channels", "width", "depth", "mlp_dim", "heads"] {
        let msg = invalid(&[&format!("{key}=0")]);
        assert!(msg.contains(&format!("{key} = 0")) && msg.contains("positive"), "{msg}");
    }
    let msg = invalid(&["image_size=225"]);
    assert!(msg.contains("image_size = 225") && msg.contains("multiple of patch (16)"), "{msg}");
    let msg = invalid(&["width=100"]);
    assert!(msg.contains("width = 100") && msg.contains("multiple of heads (3)"), "{msg}");
    let msg = invalid(&["posemb=sincos2d", "width=6", "heads=1"]);
    assert!(msg.contains("width = 6") && msg.contains("sincos2d"), "{msg}");
    let msg = invalid(&["prelogits=0"]);
    assert!(msg.contains("prelogits = 0"), "{msg}");
    let msg = invalid(&["patch=448"]);
    assert!(msg.contains("image_size = 224"), "{msg}");
}

#[test]
fn classes_zero_means_no_classifier() {
    // D = 32, M = 64, patch 4 on 16×16×3 (N = 16 tokens), one sequential block, GAP:
    //   patch embedding p²·C·D + D = 16·3·32 + 32  = 1,568
    //   position embedding N·D    = 16·32          =   512
    //   block 4D² + 2DM + 9D + M  = 4,096 + 4,096 + 288 + 64 = 8,544
    //   final LayerNorm 2D                         =    64
    // = 10,688 without a classifier; 10 classes add D·10 + 10 = 330.
    for (classes, want) in [(0usize, 10_688usize), (10, 11_018)] {
        let mut cfg = ModelConfig::custom();
        for s in ["image_size=16", "patch=4", "width=32", "depth=1", "mlp_dim=64", "heads=2", "pool=gap"] {
            cfg.set(s).unwrap();
        }
        cfg.set(&format!("classes={classes}")).unwrap();
        cfg.validate().unwrap();
        let model = VisionTransformer::new(&cfg, DType::F32, Device::Cpu).unwrap();
        let params = model.init_params(0, DType::F32, Device::Cpu).unwrap();
        let heads: Vec<(String, Vec<usize>)> = params
            .iter()
            .filter(|(n, _)| n.starts_with("head"))
            .map(|(n, t)| (n.to_string(), t.dims().to_vec()))
            .collect();
        if classes == 0 {
            assert!(heads.is_empty(), "classes = 0 still has {heads:?}");
        } else {
            assert_eq!(heads, [("head.weight".to_string(), vec![10, 32]), ("head.bias".to_string(), vec![10])]);
        }
        let n: usize = params.iter().map(|(_, t)| t.numel()).sum();
        assert_eq!(n, want, "classes = {classes}");
        assert_eq!(ParamCounts::of(&cfg).unwrap().total, want as u64, "classes = {classes}");
        // The forward pass ends at the pooled features: [batch, D].
        let x = Tensor::randn([2, 3, 16, 16], 0.0, 1.0, 1, DType::F32, Device::Cpu).unwrap();
        assert_eq!(model.predict(&params, &x).unwrap().dims(), &[2, if classes == 0 { 32 } else { 10 }]);
    }
}

#[test]
fn patch_kernel_parses_round_trips_and_is_checked() {
    let mut cfg = ModelConfig::custom();
    cfg.set("patch_kernel=24").unwrap();
    assert_eq!(cfg.patch_kernel, Some(24));
    let win = cfg.patch_window();
    assert_eq!((win.kernel, win.stride, win.pad), (24, 16, 4));
    assert_eq!(win.out_side(cfg.image_size), Some(cfg.grid()), "the same token grid");
    let text = cfg.to_toml().unwrap();
    assert!(text.lines().any(|l| l == "patch_kernel = 24"), "{text}");
    assert_eq!(ModelConfig::from_toml(&text).unwrap(), cfg);
    cfg.set("patch_kernel=none").unwrap();
    assert_eq!(cfg.patch_kernel, None);
    assert!(!cfg.to_toml().unwrap().contains("patch_kernel"), "none is left out");
    for bad in ["patch_kernel=17", "patch_kernel=8"] {
        let msg = invalid(&[bad]);
        assert!(msg.contains(&bad.replace('=', " = ")) && msg.contains("patch (16)"), "{msg}");
    }
    let msg = invalid(&["patch=4", "image_size=28", "stem=[8, 16]", "patch_kernel=8"]);
    assert!(msg.contains("patch_kernel = 8") && msg.contains("conv stem ([8, 16])"), "{msg}");
    let err = cfg.set("patch_kernel=wide").unwrap_err().to_string();
    assert!(err.contains("patch_kernel") && err.contains("wide"), "{err}");
}

#[test]
fn conv_stem_parses_round_trips_and_is_checked() {
    let mut cfg = ModelConfig::custom();
    for (value, want) in
        [("[64, 128, 256, 512]", vec![64, 128, 256, 512]), ("16,32", vec![16, 32]), ("none", vec![]), ("[]", vec![])]
    {
        cfg.set(&format!("stem={value}")).unwrap();
        assert_eq!(cfg.stem, want, "{value}");
    }
    // The ViT-B/16 stem of Xiao et al. 2021: four halvings for patch 16.
    cfg.set("stem=[64, 128, 256, 512]").unwrap();
    cfg.validate().unwrap();
    let text = cfg.to_toml().unwrap();
    assert!(text.lines().any(|l| l == "stem = [64, 128, 256, 512]"), "{text}");
    assert_eq!(ModelConfig::from_toml(&text).unwrap(), cfg);
    assert!(!ModelConfig::custom().to_toml().unwrap().contains("stem"), "no stem is left out");
    let msg = invalid(&["stem=[16, 32]"]);
    assert!(msg.contains("stem = [16, 32]") && msg.contains("patch (16)") && msg.contains("2^"), "{msg}");
    let msg = invalid(&["stem=[16, 0, 32, 64]"]);
    assert!(msg.contains("stem = [16, 0, 32, 64]") && msg.contains("positive"), "{msg}");
    let err = cfg.set("stem=[16, big]").unwrap_err();
    assert!(matches!(err, ModelError::BadValue { .. }) && err.to_string().contains("[16, big]"), "{err}");
}

#[test]
fn toml_round_trips_every_preset() {
    for name in ModelConfig::preset_names() {
        let mut cfg = ModelConfig::preset(name).unwrap();
        let text = cfg.to_toml().unwrap();
        assert!(!text.contains("prelogits"), "None is left out");
        assert_eq!(ModelConfig::from_toml(&text).unwrap(), cfg, "{name}");
        cfg.prelogits = Some(cfg.width);
        assert_eq!(ModelConfig::from_toml(&cfg.to_toml().unwrap()).unwrap(), cfg, "{name}");
    }
}

#[test]
fn toml_uses_the_listed_spellings() {
    let text = ModelConfig::preset("22B/14").unwrap().to_toml().unwrap();
    for line in [
        "pool = \"map\"",
        "posemb = \"learn\"",
        "block = \"parallel\"",
        "gelu = \"tanh\"",
        "qk_norm = true",
        "qkv_bias = false",
        "mlp_dim = 24576",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
}

#[test]
fn toml_missing_fields_come_from_custom() {
    let cfg = ModelConfig::from_toml("width = 384\nheads = 6\npool = \"gap\"\nposemb = \"sincos2d\"\n").unwrap();
    let mut expected = ModelConfig::custom();
    expected.width = 384;
    expected.heads = 6;
    expected.pool = Pool::Gap;
    expected.posemb = PosEmb::Sincos2d;
    assert_eq!(cfg, expected);
}

#[test]
fn toml_errors_are_one_line_with_the_line_number() {
    let cases = [
        ("width = 384\nhidden = 3\n", "hidden", Some(2)),
        ("width = 384\n\npool = \"cls\"\n", "cls", Some(3)),
        ("depth = -2\n", "-2", Some(1)),
        ("depth = \"12\"\n", "usize", Some(1)),
        ("width = [\n", "", None),
    ];
    for (text, needle, line) in cases {
        let err = ModelConfig::from_toml(text).unwrap_err();
        let ModelError::Toml { line: got, .. } = &err else { panic!("{text:?}: {err}") };
        if line.is_some() {
            assert_eq!(*got, line, "{text:?}: {err}");
        }
        let msg = err.to_string();
        assert!(msg.contains(needle) && !msg.contains('\n'), "{msg}");
    }
    // Parsed but invalid: validation runs too.
    let err = ModelConfig::from_toml("width = 100\n").unwrap_err();
    assert!(matches!(err, ModelError::InvalidConfig { field: "width", .. }), "{err}");
}
