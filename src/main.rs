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

fn plot(a: samhost::cli::PlotArgs) -> runner::Outcome {
    let result =
        a.x.as_deref()
            .map(samhost::run::plot::XAxis::parse)
            .transpose()
            .and_then(|x| samhost::run::compare::plot_runs(&a.runs, a.metric.as_deref(), a.output.as_deref(), x));
    match result {
        Ok(c) => {
            let others: Vec<&str> = c.available.iter().map(String::as_str).filter(|m| *m != c.metric).collect();
            let more = if others.is_empty() { String::new() } else { format!(" (also logged: {})", others.join(", ")) };
            eprintln!("wrote {}: {} of {} run(s){more}", c.file.display(), c.metric, a.runs.len());
            runner::Outcome { code: 0, reports: Vec::new() }
        }
        Err(e) => runner::Outcome { code: 1, reports: vec![format!("error: {e:#}")] },
    }
}

fn main() -> ExitCode {
    samhost::runtime::tune();
    samhost::dist::share_cores();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(a) => runner::run(SessionOptions {
            device: a.device,
            precision: a.dtype.unwrap_or_default(),
            precision_given: a.dtype.is_some(),
            seed: a.seed.unwrap_or(samhost::session::DEFAULT_SEED),
            seed_given: a.seed.is_some(),
            overrides: a.set,
            quiet: a.quiet,
            script: Some(a.script),
            runs_dir: Some(a.runs_dir),
            resume: a.resume,
            progress_every: a.progress_every,
            command_line: std::env::args().collect(),
            offline: a.offline,
            max_loss: a.max_loss,
        }),
        Command::Plot(a) => plot(a),
        Command::Sharpness(a) => {
            match samhost::diagnostics::report::sharpness_report(
                &a.run,
                a.checkpoint.as_deref(),
                a.data.as_deref(),
                a.examples,
            ) {
                Ok(r) => {
                    eprintln!("{}:", r.checkpoint.display());
                    for l in &r.lines {
                        eprintln!("  {l}");
                    }
                    eprintln!("wrote {}", r.json.display());
                    runner::Outcome { code: 0, reports: Vec::new() }
                }
                Err(e) => runner::Outcome { code: 1, reports: vec![format!("error: {e:#}")] },
            }
        }
        Command::Sweep(a) => match samhost::sweep::command(a) {
            Ok((code, lines)) => {
                for l in lines {
                    eprintln!("{l}");
                }
                runner::Outcome { code, reports: Vec::new() }
            }
            Err(e) => runner::Outcome { code: 1, reports: vec![format!("error: {e:#}")] },
        },
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
    let rank = samhost::dist::world().rank();
    for r in &outcome.reports {
        match rank {
            0 => eprintln!("{r}"),
            _ => eprintln!("[rank {rank}] {r}"),
        }
    }
    samhost::dist::finish(outcome.code);
    ExitCode::from(outcome.code.clamp(0, 255) as u8)
}
