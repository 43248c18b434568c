//! Parameters that take no gradient in the pass running now: frozen ones, and any a step leaves
//! out (ESAM's second pass). Layers read each parameter through [`param`], which gives such a
//! parameter detached, so the autograd graph never records an op on it: no weight gradient is
//! computed for it, and below the lowest parameter that does take one there is no backward pass
//! at all (a frozen backbone costs its forward pass only).

use candle_core::{Tensor, TensorId};
use std::cell::RefCell;
use std::collections::HashSet;

thread_local! {
    static NO_GRAD: RefCell<Option<HashSet<TensorId>>> = const { RefCell::new(None) };
}

/// `t` as a layer should use it in the pass running now: detached when it takes no gradient.
pub fn param(t: &Tensor) -> Tensor {
    let skip = NO_GRAD.with(|s| s.borrow().as_ref().is_some_and(|ids| ids.contains(&t.id())));
    if skip {
        t.detach()
    } else {
        t.clone()
    }
}

/// While alive, the tensors `ids` are detached wherever a layer reads them ([`param`]) on this
/// thread; dropping it puts back the set that was in force before.
pub struct NoGradScope {
    previous: Option<HashSet<TensorId>>,
}

impl NoGradScope {
    /// Detaches `ids` until the scope is dropped (an empty set changes nothing).
    pub fn new(ids: HashSet<TensorId>) -> Self {
        let next = if ids.is_empty() { None } else { Some(ids) };
        let previous = NO_GRAD.with(|s| std::mem::replace(&mut *s.borrow_mut(), next));
        Self { previous }
    }
}

impl Drop for NoGradScope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        NO_GRAD.with(|s| *s.borrow_mut() = previous);
    }
}
