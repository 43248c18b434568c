//! `config(#{...})`: the script's defaults, overridden by `--set key=value`.

use super::convert::{err, from_json, Res};
use super::tensor::describe;
use crate::session::Session;
use rhai::{Dynamic, Engine, Map};
use std::rc::Rc;

/// Parses the text of `--set key=text` into the type of the default `default`.
pub fn parse_override(key: &str, text: &str, default: &Dynamic) -> Res<Dynamic> {
    let bad =
        |what: &str| err(format!("--set {key}={text}: `{text}` is not {what} (the default of `{key}` is {default})"));
    if default.is_int() {
        text.trim().parse::<rhai::INT>().map(Dynamic::from_int).map_err(|_| bad("an integer"))
    } else if default.is_float() {
        text.trim().parse::<rhai::FLOAT>().map(Dynamic::from_float).map_err(|_| bad("a number"))
    } else if default.is_bool() {
        match text.trim() {
            "true" => Ok(Dynamic::TRUE),
            "false" => Ok(Dynamic::FALSE),
            _ => Err(bad("true or false")),
        }
    } else if default.is_string() || default.is_unit() {
        Ok(Dynamic::from(text.to_string()))
    } else if default.is_array() || default.is_map() {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|_| bad("JSON"))?;
        let d = from_json(&v)?;
        if d.is_array() != default.is_array() {
            return Err(bad(if default.is_array() { "a JSON array" } else { "a JSON object" }));
        }
        Ok(d)
    } else {
        Err(err(format!(
            "--set {key}: the default of `{key}` is a {}, which cannot be set from the command line",
            default.type_name()
        )))
    }
}

/// The settings key that holds the run's seed.
pub const SEED_KEY: &str = "seed";

/// Applies the session's overrides to `defaults`. An integer `seed` setting takes the run's seed
/// (`--seed N`, `--set seed=N`, or the default), whatever the script wrote as its default.
pub fn resolve(session: &Session, mut defaults: Map) -> Res<Map> {
    for (key, text) in &session.overrides {
        if key == SEED_KEY {
            // Already the session's seed (crate::run::Run::start); applied below.
            mark_used(session, key)?;
            continue;
        }
        let default = match defaults.get(key.as_str()) {
            Some(d) => d.clone(),
            None => {
                let mut known: Vec<&str> = defaults.keys().map(|k| k.as_str()).collect();
                known.sort_unstable();
                return Err(err(format!("--set {key}: unknown key; the script's config has: {}", known.join(", "))));
            }
        };
        let value = parse_override(key, text, &default)?;
        defaults.insert(key.as_str().into(), value);
        mark_used(session, key)?;
    }
    if let Some(seed) = defaults.get_mut(SEED_KEY) {
        if seed.is_int() {
            let n = rhai::INT::try_from(session.seed)
                .map_err(|_| err(format!("config: the seed {} is too large for a script integer", session.seed)))?;
            *seed = Dynamic::from_int(n);
        }
    }
    Ok(defaults)
}

fn mark_used(session: &Session, key: &str) -> Res<()> {
    session
        .used_overrides
        .try_borrow_mut()
        .map_err(|_| err("config: the settings are in use"))?
        .insert(key.to_string());
    Ok(())
}

fn show(map: &Map) -> String {
    let mut keys: Vec<_> = map.keys().collect();
    keys.sort();
    keys.iter()
        .map(|k| {
            let v = &map[*k];
            let text = match v.clone().try_cast::<candle_core::Tensor>() {
                Some(t) => describe(&t),
                None => v.to_string(),
            };
            format!("  {k} = {text}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Registers `config`.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    let s = session.clone();
    api!(engine, "config", "defaults: Map -> Map",
        "The script's settings: `defaults` with the command line's `--set key=value` overrides applied, each parsed to the type of its default. An unknown key or a value of the wrong type is an error. An integer `seed` setting always holds the run's seed (`--seed N` or `--set seed=N`; 42 by default; a resumed run's recorded one), so one seed drives the initialisation and everything the script seeds with `cfg.seed` (label noise, batch order, augmentation); name a setting otherwise (e.g. `data_seed`) to keep it fixed across seeds. The resolved settings are printed and recorded in the run's config.json.",
        move |defaults: Map| -> Res<Map> {
            let resolved = resolve(&s, defaults)?;
            s.say(&format!("config:\n{}", show(&resolved)));
            if let Ok(json) = super::convert::to_json(&Dynamic::from_map(resolved.clone())) {
                s.set_resolved_config(json).map_err(|e| err(format!("config: {e:#}")))?;
            }
            Ok(resolved)
        });
}
