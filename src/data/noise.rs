//! Synthetic label noise with exact counts, from a seeded ChaCha8 stream (the same corrupted
//! labels on every machine).
//!
//! - symmetric: exactly `round(rate·N)` examples, chosen uniformly, each get a different class
//!   chosen uniformly;
//! - asymmetric: in every class `c` of a class map `c -> t`, exactly `round(rate·N_c)` examples,
//!   chosen uniformly, get label `t` (the CIFAR-10 map by default);
//! - pairflip: the asymmetric rule with the map `c -> c+1 mod K`.

use super::seed::{below, derived_rng, Purpose};
use super::Dataset;
use anyhow::{anyhow, bail, Result};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// The CIFAR-10 map of Patrini et al. (2017): truck -> automobile, bird -> airplane,
/// deer -> horse, cat <-> dog.
pub const CIFAR10_MAP: [(u32, u32); 5] = [(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)];

/// A kind of label noise.
#[derive(Clone, Debug, PartialEq)]
pub enum NoiseKind {
    /// Uniform over the other classes.
    Symmetric,
    /// Class-dependent, by a map `(from, to)`; `None` is the CIFAR-10 map.
    Asymmetric(Option<Vec<(u32, u32)>>),
    /// `c -> c+1 mod K`.
    Pairflip,
}

impl NoiseKind {
    /// `"symmetric"`, `"asymmetric"` (with an optional class map) or `"pairflip"`.
    pub fn parse(name: &str, map: Option<Vec<(u32, u32)>>) -> Result<Self> {
        let kind = match name {
            "symmetric" => NoiseKind::Symmetric,
            "asymmetric" => return Ok(NoiseKind::Asymmetric(map)),
            "pairflip" => NoiseKind::Pairflip,
            other => bail!("unknown label noise `{other}` (symmetric, asymmetric or pairflip)"),
        };
        if map.is_some() {
            bail!("a class map is for asymmetric noise, not {name}");
        }
        Ok(kind)
    }
}

fn class_ref(what: &str, v: &Value, classes: &[String]) -> Result<u32> {
    let k = classes.len();
    let by_name = |s: &str| -> Option<u32> {
        classes.iter().position(|c| c == s).map(|i| i as u32).or_else(|| s.parse::<u32>().ok())
    };
    let i = match v {
        Value::String(s) => {
            by_name(s).ok_or_else(|| anyhow!("{what}: no class named `{s}` (classes: {})", classes.join(", ")))?
        }
        _ => v.as_u64().ok_or_else(|| anyhow!("{what}: a class is a name or an index, got {v}"))? as u32,
    };
    if i as usize >= k {
        bail!("{what}: class {i} is outside the {k} classes");
    }
    Ok(i)
}

/// A class map from a JSON object whose keys and values are class names or indices
/// (`{"truck": "automobile", "2": 0}`).
pub fn parse_class_map(map: &serde_json::Map<String, Value>, classes: &[String]) -> Result<Vec<(u32, u32)>> {
    map.iter()
        .map(|(from, to)| {
            let f = class_ref("class map", &Value::String(from.clone()), classes)?;
            Ok((f, class_ref(&format!("class map `{from}`"), to, classes)?))
        })
        .collect()
}

fn check_map(map: &[(u32, u32)], k: usize) -> Result<()> {
    let mut seen = vec![false; k];
    for &(f, t) in map {
        if f as usize >= k || t as usize >= k {
            bail!("class map {f} -> {t}: outside the {k} classes");
        }
        if f == t {
            bail!("class map {f} -> {t}: a class mapped to itself");
        }
        if std::mem::replace(&mut seen[f as usize], true) {
            bail!("class map: class {f} is mapped twice");
        }
    }
    Ok(())
}

/// Moves `items[..m]` to a uniformly random `m`-subset of `items` (partial Fisher-Yates).
fn choose(items: &mut [usize], m: usize, rng: &mut ChaCha8Rng) {
    for i in 0..m {
        let j = i + below(rng, items.len() - i);
        items.swap(i, j);
    }
}

/// Corrupted copies of `clean` labels (classes `0..k`) by `kind` at `rate`, seeded by `seed`.
pub fn corrupt_labels(clean: &[u32], k: usize, kind: &NoiseKind, rate: f64, seed: u64) -> Result<Vec<u32>> {
    if !(0.0..=1.0).contains(&rate) {
        bail!("the noise rate must be in [0, 1], got {rate}");
    }
    if k < 2 {
        bail!("label noise needs at least 2 classes, the dataset has {k}");
    }
    if let Some(&l) = clean.iter().find(|&&l| l as usize >= k) {
        bail!("label {l} is outside the {k} classes");
    }
    let mut rng = derived_rng(seed, Purpose::Noise, 0, 0);
    let mut noisy = clean.to_vec();
    let map: Vec<(u32, u32)> = match kind {
        NoiseKind::Symmetric => {
            let m = (rate * clean.len() as f64).round() as usize;
            let mut idx: Vec<usize> = (0..clean.len()).collect();
            choose(&mut idx, m, &mut rng);
            for &i in &idx[..m] {
                let r = below(&mut rng, k - 1) as u32;
                noisy[i] = if r >= clean[i] { r + 1 } else { r };
            }
            return Ok(noisy);
        }
        NoiseKind::Pairflip => (0..k as u32).map(|c| (c, (c + 1) % k as u32)).collect(),
        NoiseKind::Asymmetric(Some(m)) => m.clone(),
        NoiseKind::Asymmetric(None) => {
            if k != 10 {
                bail!("the default asymmetric map is CIFAR-10's (10 classes); this dataset has {k}: give a class map");
            }
            CIFAR10_MAP.to_vec()
        }
    };
    check_map(&map, k)?;
    let mut sorted = map;
    sorted.sort();
    for (from, to) in sorted {
        let mut members: Vec<usize> = (0..clean.len()).filter(|&i| clean[i] == from).collect();
        let m = (rate * members.len() as f64).round() as usize;
        choose(&mut members, m, &mut rng);
        for &i in &members[..m] {
            noisy[i] = to;
        }
    }
    Ok(noisy)
}

impl Dataset {
    /// This dataset with corrupted training labels; the clean labels and the noise mask are
    /// kept. Fails on a dataset that already has label noise.
    pub fn with_label_noise(&self, kind: &NoiseKind, rate: f64, seed: u64) -> Result<Dataset> {
        if self.is_noisy() {
            bail!("the dataset already has label noise; add noise to the clean dataset");
        }
        let noisy = corrupt_labels(&self.labels(), self.num_classes(), kind, rate, seed)?;
        self.with_labels(noisy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_counts_are_exact() {
        let clean: Vec<u32> = (0..1000).map(|i| i % 10).collect();
        let noisy = corrupt_labels(&clean, 10, &NoiseKind::Symmetric, 0.37, 5).unwrap();
        assert_eq!(noisy.iter().zip(&clean).filter(|(a, b)| a != b).count(), 370);
        assert_eq!(noisy, corrupt_labels(&clean, 10, &NoiseKind::Symmetric, 0.37, 5).unwrap());
        assert!(corrupt_labels(&clean, 10, &NoiseKind::Symmetric, 1.2, 5).is_err());
        assert!(corrupt_labels(&clean, 10, &NoiseKind::Symmetric, f64::NAN, 5).is_err());
    }

    #[test]
    fn class_maps_resolve_names_and_reject_nonsense() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let m: serde_json::Map<String, Value> = serde_json::from_str(r#"{"a": "b", "2": 0}"#).unwrap();
        let mut parsed = parse_class_map(&m, &classes).unwrap();
        parsed.sort();
        assert_eq!(parsed, vec![(0, 1), (2, 0)]);
        let bad: serde_json::Map<String, Value> = serde_json::from_str(r#"{"a": "z"}"#).unwrap();
        assert!(parse_class_map(&bad, &classes).unwrap_err().to_string().contains("no class named `z`"));
        assert!(check_map(&[(1, 1)], 3).is_err());
    }
}
