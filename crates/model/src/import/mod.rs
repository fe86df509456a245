//! Importers that map other frameworks' parameter layouts onto vitrs names (design §3).

pub mod timm;
