//! `peak_rss OUT PROGRAM [ARG...]`: runs PROGRAM with its arguments (stdin, stdout and stderr
//! inherited), writes its peak resident memory in KiB to the file OUT, and exits with its status.
//!
//! Why a process of its own: Linux counts, in a child's peak RSS, the memory of the process it
//! was spawned from (exec records the old address space's high-water mark). A test binary that
//! has loaded a model would lend its own size to every child it measures; this small process
//! lends almost nothing.

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, program, rest @ ..] = args.as_slice() else {
        eprintln!("usage: peak_rss OUT PROGRAM [ARG...]");
        return ExitCode::from(2);
    };
    let status = match Command::new(program).args(rest).status() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("peak_rss: cannot run {program}: {e}");
            return ExitCode::from(2);
        }
    };
    // SAFETY: getrusage only writes into the struct it is given. This process has had exactly
    // one child, so RUSAGE_CHILDREN is that child's usage.
    let max_rss_kib = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage), 0);
        usage.ru_maxrss
    };
    std::fs::write(out, max_rss_kib.to_string()).expect("write the peak RSS file");
    ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8)
}
