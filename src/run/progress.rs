//! The progress display of a run.
//!
//! It is driven implicitly, so scripts need no progress calls:
//! - every optimizer step (`train_step`, `sam_step`) calls [`Progress::step`] with its loss;
//! - every `log(tag, map)` calls [`Progress::logged`]: its line is shown, and an `epoch` key moves
//!   the epoch counter (the number of epochs done, as the example scripts log it);
//! - `config()` gives the number of epochs when the config has an integer `epochs` key
//!   ([`Progress::set_total_epochs`]);
//! - a batch iterator may announce the length of the epoch it starts with
//!   [`Progress::begin_epoch`]; without it the number of batches per epoch is learnt from the
//!   first epoch (the steps between two epoch changes).
//!
//! On a terminal (stderr), two indicatif bars: epochs (with the run's ETA) and batches of the
//! current epoch (loss, steps per second, the epoch's ETA); log lines scroll above them. When
//! stderr is not a terminal (CI, a log file), a plain line every N steps instead. With `--quiet`
//! nothing is shown.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// Progress bars (stderr is a terminal).
    Bars,
    /// A plain line every `every` steps, and the log lines.
    Lines {
        /// Steps between two progress lines (0: none).
        every: u64,
    },
    /// Nothing (`--quiet`).
    Off,
}

impl ProgressMode {
    /// Bars when stderr is a terminal, lines every `every` steps otherwise, nothing when quiet.
    pub fn detect(quiet: bool, every: u64) -> Self {
        if quiet {
            ProgressMode::Off
        } else if std::io::stderr().is_terminal() {
            ProgressMode::Bars
        } else {
            ProgressMode::Lines { every }
        }
    }
}

struct Bars {
    multi: MultiProgress,
    epochs: ProgressBar,
    batches: ProgressBar,
    batches_sized: bool,
}

/// The progress display (see the module documentation).
pub struct Progress {
    mode: ProgressMode,
    bars: Option<Bars>,
    total_epochs: Option<u64>,
    /// Batches per epoch: announced by the iterator, or learnt from the first epoch.
    per_epoch: Option<u64>,
    announced: bool,
    step: u64,
    epoch: u64,
    epoch_start_step: u64,
    loss: Option<f64>,
    /// When and at which step the first step of this session was seen (for the rate).
    first: Option<(Instant, u64)>,
}

/// A number for display: 4 decimals, or scientific when very small or large.
pub fn format_number(f: f64) -> String {
    if f == 0.0 {
        "0".into()
    } else if f.abs() >= 1e-3 && f.abs() < 1e5 {
        format!("{f:.4}")
    } else {
        format!("{f:.3e}")
    }
}

/// `1h02m03s`, `4m05s` or `6s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, s % 3600 / 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

impl Progress {
    /// A display in `mode`.
    pub fn new(mode: ProgressMode) -> Self {
        Self {
            mode,
            bars: None,
            total_epochs: None,
            per_epoch: None,
            announced: false,
            step: 0,
            epoch: 0,
            epoch_start_step: 0,
            loss: None,
            first: None,
        }
    }

    /// The mode.
    pub fn mode(&self) -> ProgressMode {
        self.mode
    }

    /// Sets the number of epochs of the run (from the config), when known.
    pub fn set_total_epochs(&mut self, total: Option<u64>) {
        self.total_epochs = total.filter(|&t| t > 0);
        if let (Some(b), Some(t)) = (&self.bars, self.total_epochs) {
            b.epochs.set_length(t);
        }
    }

    /// Continues from `step` and `epoch` (a resumed run).
    pub fn resume_at(&mut self, step: u64, epoch: u64) {
        self.step = step;
        self.epoch = epoch;
        self.epoch_start_step = step;
        self.first = None;
    }

    /// Announces that an epoch of `batches` batches starts (for batch iterators).
    pub fn begin_epoch(&mut self, batches: usize) {
        self.per_epoch = Some(batches as u64);
        self.announced = true;
        self.epoch_start_step = self.step;
        if let Some(b) = &mut self.bars {
            Self::size_batches(b, batches as u64);
            b.batches.set_position(0);
        }
    }

    fn size_batches(b: &mut Bars, n: u64) {
        b.batches.set_length(n);
        if !b.batches_sized {
            b.batches.set_style(style("{prefix:>7} [{bar:30.green/white}] {pos}/{len} batches  {msg}  ETA {eta}"));
            b.batches_sized = true;
        }
    }

    fn ensure_bars(&mut self) {
        if self.mode != ProgressMode::Bars || self.bars.is_some() {
            return;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let epochs = multi.add(match self.total_epochs {
            Some(t) => ProgressBar::new(t),
            None => ProgressBar::no_length(),
        });
        epochs.set_style(style("{prefix:>7} [{bar:30.cyan/blue}] {pos}/{len} epochs  {elapsed}  {msg}"));
        epochs.set_prefix("run");
        epochs.set_position(self.epoch);
        let batches = multi.add(ProgressBar::no_length());
        batches.set_style(style("{prefix:>7} {spinner} {pos} steps  {msg}"));
        batches.set_prefix("epoch");
        let mut b = Bars { multi, epochs, batches, batches_sized: false };
        if let Some(n) = self.per_epoch {
            Self::size_batches(&mut b, n);
        }
        self.bars = Some(b);
    }

    /// Steps per second in this session, once two steps have been seen.
    fn rate(&self) -> Option<f64> {
        let (t0, s0) = self.first?;
        let secs = t0.elapsed().as_secs_f64();
        (self.step > s0 && secs > 0.0).then(|| (self.step - s0) as f64 / secs)
    }

    /// Time left, when the number of epochs and of batches per epoch are known.
    fn eta(&self) -> Option<Duration> {
        let (total, per) = (self.total_epochs?, self.per_epoch?);
        let done_in_epoch = (self.step - self.epoch_start_step).min(per);
        let left = total.saturating_sub(self.epoch).saturating_mul(per).saturating_sub(done_in_epoch);
        let rate = self.rate()?;
        Some(Duration::from_secs_f64(left as f64 / rate))
    }

    /// One optimizer step finished: `step` steps done in the run, with this loss.
    pub fn step(&mut self, step: u64, loss: f64) {
        self.step = step;
        self.loss = Some(loss);
        if self.first.is_none() {
            self.first = Some((Instant::now(), step.saturating_sub(1)));
        }
        match self.mode {
            ProgressMode::Off => {}
            ProgressMode::Bars => {
                self.ensure_bars();
                let eta = self.eta();
                let in_epoch = step - self.epoch_start_step;
                let mut msg = format!("loss {}", format_number(loss));
                if let Some(r) = self.rate() {
                    msg.push_str(&format!("  {r:.1} steps/s"));
                }
                if let Some(b) = &self.bars {
                    b.batches.set_position(in_epoch);
                    b.batches.set_message(msg);
                    if let Some(eta) = eta {
                        b.epochs.set_message(format!("ETA {}", format_duration(eta)));
                    }
                }
            }
            ProgressMode::Lines { every } => {
                if every > 0 && step.is_multiple_of(every) {
                    eprintln!("{}", self.status_line());
                }
            }
        }
    }

    /// The plain progress line: step, epoch, loss, rate and ETA.
    pub fn status_line(&self) -> String {
        let mut line = format!("step {}", self.step);
        match self.total_epochs {
            Some(t) => line.push_str(&format!("  epoch {}/{t}", (self.epoch + 1).min(t))),
            None => line.push_str(&format!("  epoch {}", self.epoch + 1)),
        }
        if let Some(l) = self.loss {
            line.push_str(&format!("  loss {}", format_number(l)));
        }
        if let Some(r) = self.rate() {
            line.push_str(&format!("  {r:.1} steps/s"));
        }
        if let Some(eta) = self.eta() {
            line.push_str(&format!("  ETA {}", format_duration(eta)));
        }
        line
    }

    /// A `log()` call: shows `line`; `epoch` (epochs done) moves the epoch counter.
    pub fn logged(&mut self, epoch: Option<u64>, line: &str) {
        if let Some(e) = epoch {
            if e != self.epoch {
                let steps = self.step - self.epoch_start_step;
                if e > self.epoch && !self.announced && steps > 0 && e == self.epoch + 1 {
                    self.per_epoch = Some(steps);
                }
                self.epoch = e;
                self.epoch_start_step = self.step;
                if let Some(b) = &mut self.bars {
                    b.epochs.set_position(e);
                    b.batches.set_position(0);
                }
                if let (Some(b), Some(n)) = (&mut self.bars, self.per_epoch) {
                    Self::size_batches(b, n);
                }
            }
        }
        self.println(line);
    }

    /// Prints a line to stderr (above the bars), unless the display is off.
    pub fn println(&self, line: &str) {
        match (&self.mode, &self.bars) {
            (ProgressMode::Off, _) => {}
            (_, Some(b)) => {
                if b.multi.println(line).is_err() {
                    eprintln!("{line}");
                }
            }
            _ => eprintln!("{line}"),
        }
    }

    /// Runs `f` (which prints) with the bars hidden.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bars {
            Some(b) => b.multi.suspend(f),
            None => f(),
        }
    }

    /// Removes the bars (end of the run).
    pub fn finish(&mut self) {
        if let Some(b) = self.bars.take() {
            b.batches.finish_and_clear();
            b.epochs.finish_and_clear();
            let _ = b.multi.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_know_the_epoch_length_after_one_epoch() {
        let mut p = Progress::new(ProgressMode::Lines { every: 0 });
        p.set_total_epochs(Some(3));
        for s in 1..=4 {
            p.step(s, 0.5);
        }
        assert!(p.eta().is_none(), "the epoch length is not known yet");
        p.logged(Some(1), "[test] accuracy=0.5");
        p.step(5, 0.25);
        assert_eq!(p.per_epoch, Some(4));
        let line = p.status_line();
        assert!(line.starts_with("step 5  epoch 2/3  loss 0.2500"), "{line}");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h02m03s");
        assert_eq!(format_duration(Duration::from_secs(65)), "1m05s");
    }
}
