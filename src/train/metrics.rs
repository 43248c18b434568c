//! Batch metrics.

use candle_core::{DType, Result, Tensor, D};

/// Number of rows of `logits` `[N, K]` whose arg-max equals `labels` `[N]`.
pub fn correct(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let pred = logits.argmax(D::Minus1)?;
    let hits = pred.eq(&labels.to_dtype(DType::U32)?)?;
    Ok(hits.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize)
}

/// Share of correct predictions, or NaN when `logits`/`labels` are not classification shaped.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    match (logits.dims(), labels.dims()) {
        ([n, _], [m]) if n == m && *n > 0 => match correct(logits, labels) {
            Ok(c) => c as f64 / *n as f64,
            Err(_) => f64::NAN,
        },
        _ => f64::NAN,
    }
}
