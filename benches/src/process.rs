//! What a process, and the whole machine, costs, read from `/proc`.

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

/// CPU time spent in user space and in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Time in user space.
    pub user: Duration,
    /// Time in the kernel on the process's behalf.
    pub system: Duration,
}

impl CpuTimes {
    /// User and system time together.
    pub fn total(&self) -> Duration {
        self.user + self.system
    }
}

impl std::ops::Sub for CpuTimes {
    type Output = CpuTimes;

    fn sub(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

impl std::iter::Sum for CpuTimes {
    fn sum<I: Iterator<Item = CpuTimes>>(times: I) -> CpuTimes {
        times.fold(CpuTimes::default(), |sum, times| CpuTimes {
            user: sum.user + times.user,
            system: sum.system + times.system,
        })
    }
}

/// Clock ticks as time: USER_HZ is 100 on every Linux architecture the
/// kernel exports to user space.
fn ticks(count: u64) -> Duration {
    Duration::from_millis(count * 10)
}

/// The CPU time process `pid` has used so far, user and system apart
/// (`utime` and `stime` of `/proc/<pid>/stat`).
pub fn cpu_times(pid: u32) -> io::Result<CpuTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (user, system) = parse_cpu_ticks(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no utime and stime in /proc/{pid}/stat"),
        )
    })?;
    Ok(CpuTimes {
        user: ticks(user),
        system: ticks(system),
    })
}

/// `utime` and `stime` (fields 14 and 15) of a `/proc/<pid>/stat` text, in
/// clock ticks. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted from its closing parenthesis.
pub fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user, system))
}

/// How often the threads of process `pid` have been switched out so far,
/// voluntarily (blocking: each is a later wake-up) and not (preempted):
/// the sum over `/proc/<pid>/task/*/status`.
pub fn context_switches(pid: u32) -> io::Result<(u64, u64)> {
    let mut total = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        let (voluntary, preempted) = parse_context_switches(&status).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no context switch counts in a task status of {pid}"),
            )
        })?;
        total.0 += voluntary;
        total.1 += preempted;
    }
    Ok(total)
}

/// The minor page faults process `pid` has taken so far (`minflt`, field
/// 10 of `/proc/<pid>/stat`): memory it touched for the first time since the
/// kernel last gave it back, as after an allocator returned it.
pub fn minor_faults(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_minor_faults(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no minflt in /proc/{pid}/stat"),
        )
    })
}

/// `minflt` of a `/proc/<pid>/stat` text, counted from after the command
/// name as [`parse_cpu_ticks`] does.
pub fn parse_minor_faults(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(7)?.parse().ok()
}

/// `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of a status
/// text.
pub fn parse_context_switches(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        line[name.len()..].trim().parse().ok()
    };
    Some((
        field("voluntary_ctxt_switches:")?,
        field("nonvoluntary_ctxt_switches:")?,
    ))
}

/// The CPU time all of the machine's CPUs have been busy so far: user, nice,
/// system, interrupt and softirq time of `/proc/stat`, whoever it was spent
/// for (idle, I/O wait and time stolen by the hypervisor are not counted).
pub fn machine_busy() -> io::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    parse_busy_ticks(&stat).map(ticks).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no aggregate cpu line in /proc/stat",
        )
    })
}

/// The busy ticks of `/proc/stat`'s aggregate `cpu` line: user, nice,
/// system, irq and softirq (guest time is already inside user and nice).
pub fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let &[user, nice, system, _idle, _iowait, irq, softirq, ..] = fields.as_slice() else {
        return None;
    };
    Some(user + nice + system + irq + softirq)
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
        assert_eq!(parse_cpu_ticks(stat), Some((250, 31)));
        assert_eq!(parse_minor_faults(stat), Some(100));
        assert_eq!(parse_minor_faults("42 (short) S 1"), None);
        minor_faults(std::process::id()).expect("own faults");
        assert_eq!(parse_cpu_ticks("42 (short) S 1"), None);
        assert_eq!(parse_cpu_ticks("no name"), None);
        cpu_times(std::process::id()).expect("own CPU time");
    }

    #[test]
    fn reads_context_switches() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t17\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(parse_context_switches(status), Some((17, 3)));
        assert_eq!(
            parse_context_switches("voluntary_ctxt_switches:\t1\n"),
            None
        );
        let (voluntary, _) = context_switches(std::process::id()).expect("own switches");
        assert!(voluntary > 0);
    }

    #[test]
    fn reads_busy_ticks() {
        let stat = "cpu  100 2 30 5000 7 4 5 900 0 0\ncpu0 50 1 15 2500 3 2 2 450 0 0\n";
        assert_eq!(parse_busy_ticks(stat), Some(100 + 2 + 30 + 4 + 5));
        assert_eq!(parse_busy_ticks("cpu0 1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_busy_ticks("cpu  1 2 3\n"), None);
        assert_eq!(parse_busy_ticks("cpu  1 x 3 4 5 6 7 8\n"), None);
        machine_busy().expect("machine busy time");
    }
}
