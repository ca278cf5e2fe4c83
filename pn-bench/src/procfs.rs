//! What the benchmarks read about a process from `/proc`: CPU time (utime + stime), resident
//! set (VmRSS) and its peak (VmHWM), open file descriptors and their limit, and the machine's
//! load. Read-only; a process that is gone reads as `None`.

use std::fs;

/// Clock ticks per second for `/proc/<pid>/stat` (USER_HZ; 100 on Linux unless told otherwise).
fn ticks_per_sec() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// utime + stime of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|t| t as f64 / ticks_per_sec())
}

/// utime + stime in ticks from the text of `/proc/<pid>/stat`. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` line of `/proc/<pid>/status` (VmRSS, VmHWM, …), in bytes.
pub fn status_bytes(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kb(&status, key).map(|kb| kb * 1024)
}

pub fn parse_status_kb(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

pub fn rss(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS")
}

pub fn peak_rss(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmHWM")
}

/// How many file descriptors `pid` has open.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The soft limit on open files of `pid`.
pub fn fd_limit(pid: u32) -> Option<u64> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

/// `/proc/loadavg`'s three averages, as `uptime` prints them.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|| "unknown".into())
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

/// `nproc` and the CPU model from /proc/cpuinfo.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} × {model}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "1234 (svc (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 40 0 0 20 0 9 0 12345 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(290));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_lines_in_kib_become_bytes() {
        let s = "Name:\tx\nVmHWM:\t   12345 kB\nVmRSS:\t    1000 kB\n";
        assert_eq!(parse_status_kb(s, "VmHWM"), Some(12345));
        assert_eq!(parse_status_kb(s, "VmRSS"), Some(1000));
        assert_eq!(parse_status_kb(s, "VmSwap"), None);
    }

    #[test]
    fn our_own_process_reads() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(rss(me).unwrap_or(0) > 0);
        assert!(peak_rss(me).unwrap_or(0) >= rss(me).unwrap_or(0) / 2);
        assert!(open_fds(me).unwrap_or(0) > 0);
        assert!(fd_limit(me).unwrap_or(0) > 0);
    }
}
