//! Parameter gradients handed over beside candle's gradient store.
//!
//! candle's backward pass adds every gradient an op returns into a freshly zero-filled tensor
//! (`GradStore::or_insert` then `add`): for a weight that is a memset and an add over the whole
//! weight on every step, about a tenth of the mlp's step. While [`capture`] runs a backward pass,
//! the custom ops hand the gradients of trainable variables (`Var`s) to this thread's collection
//! instead, where the first one is kept as it is and later ones (a weight used twice) are summed.
//! Outside a capture, or for an operand that is not a variable (a weight computed from others,
//! whose gradient must flow on through candle's graph), the gradient goes to candle as usual.

use candle_core::{Result, Tensor, TensorId};
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    /// The gradients collected by the capture running on this thread (candle runs the backward
    /// ops on the thread that called `backward`).
    static CAPTURED: RefCell<Option<HashMap<TensorId, Tensor>>> = const { RefCell::new(None) };
}

thread_local! {
    /// How many [`CaptureAhead`] scopes are open on this thread.
    static AHEAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// While alive, tells the ops built on this thread that the backward pass of what they build
/// runs inside a [`capture`] (the training code's forward-backward pass): an op may then keep
/// parameters out of candle's graph and hand all their gradients over through [`deliver`]
/// (the fused encoder layer, [`super::encoder_layer`]). Outside one, ops put every parameter in
/// the graph, so a plain `backward()` still sees them.
pub struct CaptureAhead(());

impl CaptureAhead {
    /// Opens the scope until the value is dropped.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        AHEAD.with(|a| a.set(a.get() + 1));
        Self(())
    }
}

impl Drop for CaptureAhead {
    fn drop(&mut self) {
        AHEAD.with(|a| a.set(a.get().saturating_sub(1)));
    }
}

/// Whether a [`CaptureAhead`] scope is open on this thread.
pub fn capture_ahead() -> bool {
    AHEAD.with(|a| a.get() > 0)
}

/// Gradients of variables collected during one backward pass, by tensor id.
pub type Captured = HashMap<TensorId, Tensor>;

/// Ends the capture when dropped, also when the backward pass fails or panics.
struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        CAPTURED.with(|c| c.borrow_mut().take());
    }
}

/// Runs `f` (a backward pass) and returns its result together with the variable gradients the
/// custom ops handed over while it ran. Captures do not nest: an inner one sees only its own.
pub fn capture<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, Captured)> {
    let outer = CAPTURED.with(|c| c.borrow_mut().replace(HashMap::new()));
    let guard = Guard;
    let result = f();
    let captured = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    drop(guard);
    if outer.is_some() {
        CAPTURED.with(|c| *c.borrow_mut() = outer);
    }
    Ok((result?, captured))
}

/// Hands over `grad`, the gradient of the operand `param`: to the running capture when `param` is
/// a variable (then `None` goes back to candle), else back to the caller to return to candle.
pub fn deliver(param: &Tensor, grad: Tensor) -> Result<Option<Tensor>> {
    if !param.is_variable() {
        return Ok(Some(grad));
    }
    CAPTURED.with(|c| match c.borrow_mut().as_mut() {
        None => Ok(Some(grad)),
        Some(map) => {
            match map.remove(&param.id()) {
                None => map.insert(param.id(), grad),
                Some(prev) => map.insert(param.id(), (prev + grad)?),
            };
            Ok(None)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().expect("a vector")
    }

    #[test]
    fn variables_are_captured_and_summed_everything_else_goes_to_candle() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, 2.0], &dev).expect("var");
        let derived = (w.as_tensor() * 2.0).expect("derived");
        let g = Tensor::new(&[0.5f32, -1.0], &dev).expect("grad");
        // Outside a capture: back to candle.
        assert!(deliver(w.as_tensor(), g.clone()).expect("deliver").is_some());
        let ((), captured) = capture(|| {
            assert!(deliver(w.as_tensor(), g.clone())?.is_none());
            assert!(deliver(w.as_tensor(), g.clone())?.is_none());
            // Not a variable: its gradient must flow on through candle's graph.
            assert!(deliver(&derived, g.clone())?.is_some());
            Ok(())
        })
        .expect("capture");
        assert_eq!(captured.len(), 1);
        assert_eq!(values(&captured[&w.as_tensor().id()]), [1.0, -2.0]);
        assert!(deliver(w.as_tensor(), g).expect("deliver").is_some(), "the capture ended");
    }

    #[test]
    fn a_failed_or_nested_capture_leaves_no_state_behind() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32], &dev).expect("var");
        let g = Tensor::new(&[3f32], &dev).expect("grad");
        let failed: Result<((), Captured)> = capture(|| {
            deliver(w.as_tensor(), g.clone())?;
            candle_core::bail!("backward failed")
        });
        assert!(failed.is_err());
        assert!(deliver(w.as_tensor(), g.clone()).expect("deliver").is_some(), "no capture left running");
        let ((), outer) = capture(|| {
            deliver(w.as_tensor(), g.clone())?;
            let ((), inner) = capture(|| deliver(w.as_tensor(), g.clone()).map(|_| ()))?;
            assert_eq!(values(&inner[&w.as_tensor().id()]), [3.0]);
            deliver(w.as_tensor(), g.clone()).map(|_| ())
        })
        .expect("capture");
        // The outer capture keeps its own two deliveries, not the inner one.
        assert_eq!(values(&outer[&w.as_tensor().id()]), [6.0]);
    }
}
