//! The samhost binary: parse arguments, dispatch, print `error: …`, set the exit code.

use clap::Parser;
use samhost::cli::{Cli, Command};
use samhost::script::{self, runner};
use samhost::session::{Session, SessionOptions};
use std::process::ExitCode;
use std::rc::Rc;

fn api(json: bool, definitions: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let engine = script::build_engine(&Rc::new(Session::cpu()));
    if let Some(dir) = definitions {
        script::api::write_definitions(&engine, &dir)?;
        eprintln!("wrote Rhai definitions to {}", dir.display());
        return Ok(());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&script::api::reference_json(&engine)?)?);
    } else {
        print!("{}", script::api::reference_text(&engine)?);
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(a) => runner::run(SessionOptions {
            device: a.device,
            seed: a.seed,
            overrides: a.set,
            quiet: a.quiet,
            script: Some(a.script),
            offline: a.offline,
        }),
        Command::Check { script } => {
            let o = runner::check(&script);
            if o.code == 0 {
                eprintln!("{}: ok", script.display());
            }
            o
        }
        Command::Api { json, definitions } => match api(json, definitions) {
            Ok(()) => runner::Outcome { code: 0, reports: Vec::new() },
            Err(e) => runner::Outcome { code: 1, reports: vec![format!("error: {e:#}")] },
        },
    };
    for r in &outcome.reports {
        eprintln!("{r}");
    }
    ExitCode::from(outcome.code.clamp(0, 255) as u8)
}
