//! Transparent huge pages off for a serving process.
//!
//! mimalloc marks its heap `madvise(MADV_HUGEPAGE)`. The kernel then backs
//! it with 2 MiB pages: a page fault may compact memory to find one, and
//! the `khugepaged` kernel thread collapses small pages into huge ones in
//! the background, copying 2 MiB at a time. On a two-core machine that
//! collapse held one core for two stretches of 17 ms while a features
//! call waited for its 10 ms budget, and the mesh's late stage answers
//! at steady load stopped when the heap no longer asked for huge pages
//! (docs/faults.md, run 19). A server with budgets of a few milliseconds
//! gives up the few percent huge pages may save for steady latency, as
//! Redis does (`disable-thp yes`).
//!
//! [`disable`] sets the process's "THP disable" flag (`prctl
//! PR_SET_THP_DISABLE`): no huge pages for any of its memory, whatever the
//! machine's `/sys/kernel/mm/transparent_hugepage/enabled` says, and
//! `khugepaged` leaves it alone. `server.transparent_huge_pages = true`
//! keeps the kernel's default.

use std::sync::OnceLock;

/// Turns transparent huge pages off for this whole process, once; later
/// calls (every service of `recmesh up` calls it) return the first result.
/// Logs what it did; a refusal is only a warning, since the server works
/// the same, with more jitter.
pub fn disable() -> bool {
    static DONE: OnceLock<bool> = OnceLock::new();
    *DONE.get_or_init(|| match set_disabled() {
        Ok(()) => {
            tracing::info!(
                "transparent huge pages off for this process (server.transparent_huge_pages = false)"
            );
            true
        }
        Err(e) => {
            tracing::warn!(error = %e,
                "could not turn transparent huge pages off for this process; \
                 latency may jitter while the kernel compacts or collapses memory \
                 (set MIMALLOC_ALLOW_THP=0 in the service's environment, or \
                 /sys/kernel/mm/transparent_hugepage/enabled to never)");
            false
        }
    })
}

#[cfg(target_os = "linux")]
fn set_disabled() -> std::io::Result<()> {
    nix::sys::prctl::set_thp_disable(true).map_err(std::io::Error::from)
}

/// Transparent huge pages are Linux's: elsewhere there is nothing to turn off.
#[cfg(not(target_os = "linux"))]
fn set_disabled() -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn disable_sets_the_process_flag_the_kernel_reports() {
        assert!(disable(), "prctl(PR_SET_THP_DISABLE) refused");
        // The kernel's own view of the process, as an operator would check it.
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let line = status
            .lines()
            .find(|l| l.starts_with("THP_enabled:"))
            .expect("THP_enabled in /proc/self/status");
        assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    }
}
