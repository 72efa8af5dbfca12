//! What a process costs, read from `/proc`.

use std::io;
use std::time::Duration;

/// The resident set size of process `pid`, in bytes (`VmRSS`).
pub fn resident_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss(&status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no VmRSS line in /proc/{pid}/status"),
        )
    })
}

/// The `VmRSS` of a `/proc/<pid>/status` text, in bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The CPU time process `pid` has used so far, user and system together
/// (`utime` + `stime` of `/proc/<pid>/stat`).
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_cpu_ticks(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no utime and stime in /proc/{pid}/stat"),
        )
    })?;
    // USER_HZ is 100 on every Linux architecture the kernel exports to user space.
    Ok(Duration::from_millis(ticks * 10))
}

/// `utime` + `stime` (fields 14 and 15) of a `/proc/<pid>/stat` text, in
/// clock ticks. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted from its closing parenthesis.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tztunnel\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(5 << 20));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert!(resident_bytes(std::process::id()).expect("own RSS") > 0);
    }

    #[test]
    fn reads_cpu_ticks() {
        let stat =
            "42 (tokio (rt) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 3 0 5 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(281));
        assert_eq!(parse_cpu_ticks("42 (short) S 1"), None);
        assert_eq!(parse_cpu_ticks("no name"), None);
        cpu_time(std::process::id()).expect("own CPU time");
    }
}
