pub use vit_tensor as tensor;
