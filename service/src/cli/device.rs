//! `blksnap device add|remove|list`: serving devices with blksnapd without tracking them (what
//! `losetup` is to loop devices), over protocol v2's `AddDevice`/`RemoveDevice` and
//! `ListDevices`. In-process, devices come from the configuration: add and remove answer
//! EOPNOTSUPP, list shows the configured ones.

use std::path::{Path, PathBuf};

use blksnap_proto::{DeviceEntry, Reply, Request, Role};
use clap::Subcommand;
use serde_json::json;

use super::backend::{canonical, unexpected, Backend};
use super::error::CliError;
use super::{dev_str, Report};

/// What `blksnap device` does.
#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Serve a file or block device as a tracked-capable device (and attach the tracker unless
    /// --no-attach); prints the new device node.
    #[command(name = "add")]
    Add {
        /// The backing file or block device.
        path: PathBuf,
        /// Serve it without starting change tracking.
        #[arg(long)]
        no_attach: bool,
    },
    /// Stop serving a device (EBUSY while it is in a snapshot, mounted or held open
    /// exclusively).
    #[command(name = "remove")]
    Remove {
        /// The device: its node, MAJ:MIN, or its backing.
        device: String,
    },
    /// List the served devices: origins and snapshot images.
    #[command(name = "list")]
    List,
}

fn entry_json(d: &DeviceEntry) -> serde_json::Value {
    let (role, of) = match d.role {
        Role::Origin => ("origin", None),
        Role::Image { of } => ("image", Some(dev_str(of))),
    };
    json!({"device": dev_str(d.dev), "role": role, "image_of": of, "path": d.path,
           "backing": d.backing, "capacity_bytes": d.capacity_bytes})
}

fn entry_line(d: &DeviceEntry) -> String {
    let role = match d.role {
        Role::Origin => "origin".to_string(),
        Role::Image { of } => format!("image of {}", dev_str(of)),
    };
    let backing = if d.backing.is_empty() { "-" } else { &d.backing };
    format!("{} {} {} {} {}", dev_str(d.dev), d.path, role, d.capacity_bytes, backing)
}

/// Runs one `blksnap device` command.
pub fn execute(cmd: DeviceCommand, b: &mut dyn Backend) -> Result<Report, CliError> {
    match cmd {
        DeviceCommand::Add { path, no_attach } => {
            let backing = canonical(&path).display().to_string();
            match b.call(Request::AddDevice { backing, attach: !no_attach })? {
                Reply::Device(d) => Ok(Report::new(vec![d.path.clone()], entry_json(&d))),
                other => Err(unexpected(&other)),
            }
        }
        DeviceCommand::Remove { device } => {
            let dev = b.device(&device)?;
            match b.call(Request::RemoveDevice { dev })? {
                Reply::Done => Ok(Report::new(
                    vec![],
                    json!({"device": dev_str(dev), "removed": Path::new(&device)}),
                )),
                other => Err(unexpected(&other)),
            }
        }
        DeviceCommand::List => match b.call(Request::ListDevices)? {
            Reply::Devices(list) => Ok(Report::new(
                list.iter().map(entry_line).collect(),
                json!({"devices": list.iter().map(entry_json).collect::<Vec<_>>()}),
            )),
            other => Err(unexpected(&other)),
        },
    }
}
