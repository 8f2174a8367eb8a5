//! `blksnap`: the command line (upstream console tool's commands, `--json`, backups). The logic
//! is `blksnap_service::cli`.

fn main() {
    std::process::exit(blksnap_service::cli::run(std::env::args_os()));
}
