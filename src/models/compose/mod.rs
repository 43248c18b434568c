//! Models composed from layers: the layer descriptions a script builds ([`LayerSpec`]), the
//! layers built over named tensors ([`Layer`], [`Sequence`]) and the sequential network
//! ([`SequentialNet`]). Tensor names follow PyTorch's `nn.Sequential` (`0.weight`,
//! `1.0.weight`, ...), so state dicts move both ways.

pub mod layer;
pub mod pool;
pub mod sequential;
pub mod spec;

pub use layer::{Layer, Sequence};
pub use sequential::{SequentialConfig, SequentialNet};
pub use spec::{LayerSpec, ShortcutSpec};
