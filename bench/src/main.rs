//! `blksnap-bench`: the performance table of blksnap-rs, measured side by side in one run on
//! memory-backed (`MemDev`) and file-backed (`FileDev`) storage.
//!
//! ```text
//! cargo run --release -p blksnap-bench -- [--quick] [--markdown FILE] [--reps N] [--only S,...]
//! ```
//!
//! Every measurement is repeated (6 times after one discarded warm-up, twice with `--quick`);
//! within a repetition the compared variants alternate batch by batch on the same backend, and
//! medians are reported (ratios: the median of the paired per-batch ratios of each repetition,
//! geometric mean over the repetitions). The report (Markdown) goes to stdout and to FILE,
//! progress to stderr. `FileDev` files go to `$BLKSNAP_BENCH_DIR`, else `/dev/shm` when it has
//! room, else the system temporary directory. `--only` runs some sections (writes, image, take,
//! memory, cbt, threads), for profiling. The verification budget (loom, shuttle, simulation
//! wall times) is `bench/verification-budget.sh`.

mod alloc;
mod cbt;
mod image;
mod memory;
mod setup;
mod take;
mod threads;
mod util;
mod writes;

use std::process::ExitCode;
use std::time::Instant;

use setup::{Env, Kind};
use util::{Table, GIB, MIB, TIB};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// Sizes and repetitions of one run.
pub struct Config {
    pub quick: bool,
    pub reps: usize,
    /// One discarded repetition before the measured ones.
    pub warmup: bool,
    pub disk_bytes: u64,
    pub rand_ops: usize,
    pub take_sizes: Vec<u64>,
    /// Run only these sections (`--only`, for profiling); empty = all.
    pub only: Vec<String>,
}

impl Config {
    fn full() -> Config {
        Config {
            quick: false,
            reps: 6,
            warmup: true,
            disk_bytes: 256 * MIB,
            rand_ops: 65_536,
            take_sizes: vec![GIB, 16 * GIB, 128 * GIB, TIB, 4 * TIB, 16 * TIB],
            only: Vec::new(),
        }
    }

    fn quick() -> Config {
        Config {
            quick: true,
            reps: 2,
            warmup: false,
            disk_bytes: 128 * MIB,
            rand_ops: 16_384,
            take_sizes: vec![GIB, 128 * GIB, 16 * TIB],
            only: Vec::new(),
        }
    }
}

/// The goals of the issue, collected by the sections for the summary table.
#[derive(Default)]
pub struct Goals {
    rows: Vec<(String, Kind, String, bool)>,
}

impl Goals {
    pub fn add(&mut self, what: String, kind: Kind, value: String, met: bool) {
        self.rows.push((what, kind, value, met));
    }

    fn table(&self) -> Table {
        let mut t = Table::new("Goals (targets, not assertions)", &["goal", "MemDev", "FileDev"]);
        let mut order: Vec<&String> = Vec::new();
        for (what, ..) in &self.rows {
            if !order.contains(&what) {
                order.push(what);
            }
        }
        for what in order {
            let cell = |kind: Kind| {
                self.rows
                    .iter()
                    .find(|(w, k, ..)| w == what && *k == kind)
                    .map(|(_, _, v, met)| format!("{v} — {}", util::verdict(*met)))
                    .unwrap_or_else(|| "—".to_string())
            };
            t.row(vec![what.clone(), cell(Kind::Mem), cell(Kind::File)]);
        }
        t
    }
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A progress line on stderr (the report itself goes to stdout).
pub fn progress(what: &str) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:6.1} s] {what}");
}

pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn machine(cfg: &Config, env: &Env) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_string(), |s| s.trim().to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<u64>().ok()))
        .map_or("?".to_string(), |kib| format!("{} GiB", kib / (1 << 20)));
    format!(
        "Machine: {} cores ({}), {} RAM, Linux {}; FileDev files in {} (buffered, no O_DIRECT). \
         Noisy: the cores are shared with other jobs, so absolute figures move between runs; \
         the ratios compare variants measured side by side (interleaved) in the same run. \
         Mode: {}, {} repetitions{}, medians.",
        nproc(),
        cpu,
        mem,
        kernel.trim(),
        env.describe(),
        if cfg.quick { "--quick" } else { "full" },
        cfg.reps,
        if cfg.warmup { " after one discarded warm-up" } else { "" },
    )
}

const USAGE: &str =
    "usage: blksnap-bench [--quick] [--markdown FILE] [--reps N] [--only SECTION,...]";

/// Section names for `--only`.
const SECTIONS: [&str; 6] = ["writes", "image", "take", "memory", "cbt", "threads"];

impl Config {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    START.get_or_init(Instant::now);
    let mut cfg = Config::full();
    let mut markdown = None;
    let mut reps = None;
    let mut only = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => cfg = Config::quick(),
            "--markdown" => match args.next() {
                Some(f) => markdown = Some(f),
                None => return usage(),
            },
            "--reps" => match args.next().and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n > 0 => reps = Some(n),
                _ => return usage(),
            },
            "--only" => match args.next() {
                Some(list) => only.extend(list.split(',').map(str::to_string)),
                None => return usage(),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => return usage(),
        }
    }
    if let Some(n) = reps {
        cfg.reps = n;
    }
    if let Some(bad) = only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
        eprintln!("blksnap-bench: unknown section {bad}; sections: {}", SECTIONS.join(", "));
        return usage();
    }
    cfg.only = only;
    match run(&cfg) {
        Ok(report) => {
            println!("{report}");
            if let Some(path) = markdown {
                if let Err(e) = std::fs::write(&path, &report) {
                    eprintln!("blksnap-bench: cannot write {path}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("blksnap-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: &Config) -> Result<String, Box<dyn std::error::Error>> {
    // Room for the largest section: five disk-sized files (three disks, two storages).
    let env = Env::new(6 * cfg.disk_bytes)?;
    let mut goals = Goals::default();
    let mut tables = Vec::new();
    if cfg.runs("writes") {
        tables.extend(writes::section(&env, cfg, &mut goals)?);
    }
    if cfg.runs("image") {
        tables.push(image::section(&env, cfg, &mut goals)?);
    }
    if cfg.runs("take") {
        tables.push(take::section(&env, cfg, &mut goals)?);
    }
    if cfg.runs("memory") {
        tables.push(memory::section(&env, cfg, &mut goals)?);
    }
    if cfg.runs("cbt") {
        tables.push(cbt::section(&env, cfg, &mut goals)?);
    }
    if cfg.runs("threads") {
        tables.push(threads::section(&env, cfg, &mut goals)?);
    }
    let elapsed = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    let mut out = format!("{}\n\n", machine(cfg, &env));
    out += &goals.table().render();
    for t in &tables {
        out += "\n";
        out += &t.render();
    }
    out += &format!(
        "\nMeasured by `cargo run --release -p blksnap-bench{}` in {elapsed:.0} s; the \
         verification budget by `bench/verification-budget.sh`.\n",
        if cfg.quick { " -- --quick" } else { "" }
    );
    Ok(out)
}
