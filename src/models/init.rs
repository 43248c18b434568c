//! A candle `VarBuilder` backend that creates every variable from the host's seeded generator.
//!
//! candle-nn's layer constructors say how each tensor should be initialised (`Init` hints), but on
//! CPU candle draws from an unseeded thread generator. This backend honours the same hints with
//! [`HostRng`], so `--seed` makes model initialisation reproducible.

use crate::rng::HostRng;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

/// Creates variables in a [`VarMap`] with values drawn from a [`HostRng`].
pub struct SeededBackend {
    varmap: VarMap,
    rng: HostRng,
}

/// A `VarBuilder` that stores new variables in `varmap`, initialised from `rng`.
pub fn seeded_var_builder(varmap: &VarMap, rng: &HostRng, device: &Device) -> VarBuilder<'static> {
    let backend = SeededBackend { varmap: varmap.clone(), rng: rng.clone() };
    VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
}

/// The values of a tensor of `shape` initialised as `init` says.
pub fn init_values(init: &Init, shape: &Shape, rng: &HostRng) -> Vec<f32> {
    let n = shape.elem_count();
    match init {
        Init::Const(c) => vec![*c as f32; n],
        Init::Randn { mean, stdev } => rng.normal(n, *mean, *stdev),
        Init::Uniform { lo, up } => rng.uniform(n, *lo, *up),
        Init::Kaiming { dist, fan, non_linearity } => {
            let fan = fan.for_shape(shape);
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    rng.uniform(n, -bound, bound)
                }
                NormalOrUniform::Normal => rng.normal(n, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for SeededBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data =
            self.varmap.data().lock().map_err(|_| candle_core::Error::Msg("parameter map lock poisoned".into()))?;
        if let Some(var) = data.get(name) {
            let t = var.as_tensor();
            if t.shape() != &s {
                candle_core::bail!("parameter {name}: shape {:?} requested, {:?} stored", s, t.shape());
            }
            return t.to_dtype(dtype);
        }
        let values = init_values(&h, &s, &self.rng);
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data =
            self.varmap.data().lock().map_err(|_| candle_core::Error::Msg("parameter map lock poisoned".into()))?;
        match data.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("parameter {name} does not exist"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().map(|d| d.contains_key(name)).unwrap_or(false)
    }
}

/// How an architecture's convolution and linear weights are initialised when it is built fresh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitScheme {
    /// PyTorch's `nn.Linear` / `nn.Conv2d` defaults: `kaiming_uniform_(a = √5)` weights, i.e.
    /// U(±1/√fan_in), and biases U(±1/√fan_in).
    #[default]
    Torch,
    /// He-normal weights, N(0, 2/fan_in) (He et al. 2015; candle-nn's default), biases
    /// U(±1/√fan_in) as PyTorch's.
    He,
}

impl InitScheme {
    /// Whether this is the default ([`InitScheme::Torch`]), which configs leave out.
    pub fn is_default(&self) -> bool {
        *self == Self::Torch
    }

    /// The weight initialisation of a layer with `fan_in` inputs per output.
    pub fn weight(self, fan_in: usize) -> Init {
        let fan = fan_in.max(1) as f64;
        match self {
            Self::Torch => Init::Uniform { lo: -1.0 / fan.sqrt(), up: 1.0 / fan.sqrt() },
            Self::He => Init::Randn { mean: 0.0, stdev: (2.0 / fan).sqrt() },
        }
    }

    /// The bias initialisation of a layer with `fan_in` inputs per output (PyTorch's, for both).
    pub fn bias(self, fan_in: usize) -> Init {
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        Init::Uniform { lo: -bound, up: bound }
    }
}
