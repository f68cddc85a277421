//! Progress of long steps: a bar with ETA on a terminal (indicatif), a line
//! per finished step otherwise, nothing with `--quiet`; and each step's wall
//! time and peak resident memory, for `docs/` and for sizing the job.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One finished step.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepReport {
    /// What ran.
    pub name: String,
    /// Wall time.
    pub seconds: f64,
    /// Peak resident memory of the process during the step, MiB (Linux;
    /// 0 where `/proc` is not there).
    pub peak_rss_mib: f64,
}

/// Reports steps as they run and keeps their figures.
#[derive(Debug)]
pub struct Progress {
    quiet: bool,
    current: Option<(String, Instant, ProgressBar)>,
    done: Vec<StepReport>,
}

/// Peak RSS since the last reset, MiB (`VmHWM`).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Starts a new peak-RSS window (writing 5 to `clear_refs` resets `VmHWM`).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

impl Progress {
    /// Bars and step lines on stderr, or nothing when `quiet`.
    pub fn new(quiet: bool) -> Self {
        Progress {
            quiet,
            current: None,
            done: Vec::new(),
        }
    }

    /// Ends the running step (if any) and starts `name`, with a bar of
    /// `len` units when `len > 0` (a spinner otherwise).
    pub fn start(&mut self, name: &str, len: u64) {
        self.finish();
        reset_peak();
        let bar = if self.quiet {
            ProgressBar::hidden()
        } else if len > 0 {
            let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>24} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        } else {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix:>24} {spinner} {elapsed_precise}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        };
        bar.set_prefix(name.to_owned());
        self.current = Some((name.to_owned(), Instant::now(), bar));
    }

    /// Moves the running step's bar to `pos`.
    pub fn set(&self, pos: u64) {
        if let Some((_, _, bar)) = &self.current {
            bar.set_position(pos);
        }
    }

    /// Ends the running step, recording its time and peak memory.
    pub fn finish(&mut self) {
        if let Some((name, started, bar)) = self.current.take() {
            bar.finish_and_clear();
            let step = StepReport {
                name,
                seconds: started.elapsed().as_secs_f64(),
                peak_rss_mib: peak_rss_mib(),
            };
            if !self.quiet {
                eprintln!(
                    "{:>24}: {:.1}s, peak RSS {:.0} MiB",
                    step.name, step.seconds, step.peak_rss_mib
                );
            }
            self.done.push(step);
        }
    }

    /// The finished steps, in order.
    pub fn steps(&mut self) -> &[StepReport] {
        self.finish();
        &self.done
    }

    /// The finished steps as a Markdown table.
    pub fn table(&mut self) -> String {
        let mut out = String::from("| step | wall time | peak RSS |\n|---|---|---|\n");
        for s in self.steps() {
            out.push_str(&format!(
                "| {} | {:.1} s | {:.0} MiB |\n",
                s.name, s.seconds, s.peak_rss_mib
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_recorded_in_order_with_their_memory() {
        let mut p = Progress::new(true);
        p.start("first", 0);
        p.start("second", 3);
        p.set(2);
        let steps = p.steps().to_vec();
        assert_eq!(
            steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["first", "second"]
        );
        if cfg!(target_os = "linux") {
            assert!(steps.iter().all(|s| s.peak_rss_mib > 0.0));
        }
        assert!(p.table().contains("| second |"));
    }
}
