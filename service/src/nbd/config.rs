//! The `[nbd]` section of the daemon's configuration.
//!
//! ```toml
//! [nbd]
//! socket = "/run/blksnap/nbd"          # Unix socket: mode 0600, root only
//! # group_reads = true                 # 0660: the top-level `group` reads every image too
//! tcp = "0.0.0.0:10809"                # TCP listener: TLS required
//! tls_cert = "/etc/blksnap/nbd/server-cert.pem"
//! tls_key = "/etc/blksnap/nbd/server-key.pem"
//! tls_ca = "/etc/blksnap/nbd/ca-cert.pem"  # client certificates must chain to it
//! # tls = false                        # only with a loopback `tcp` address
//! writable_origins = ["/var/lib/vm/disk0.img"]  # backings whose origins are exported writable
//! max_connections = 64
//! max_connections_per_export = 8
//! idle_timeout_secs = 600
//! max_request_bytes = 33554432
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::wire::MAX_PAYLOAD_BYTES;

/// NBD exports of snapshot images (and of writable origins).
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// Unix socket to serve NBD on: mode 0600 and root peers only, unless `group_reads`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Members of the daemon's `group` may use the Unix socket too (mode 0660, that group):
    /// they then read **every** snapshot image (and write the `writable_origins`), whoever
    /// added the device — more than the control socket lets a group member do (its own
    /// devices only, docs/SECURITY.md), hence an explicit choice, off by default.
    #[serde(default)]
    pub group_reads: bool,
    /// TCP address to serve NBD on (`HOST:PORT`).
    #[serde(default)]
    pub tcp: Option<SocketAddr>,
    /// TLS on the TCP listener (NBD_OPT_STARTTLS, required before any export is named).
    /// `false` is accepted only for a loopback address.
    #[serde(default = "yes")]
    pub tls: bool,
    /// The server's certificate chain (PEM).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that every client's certificate must chain to.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Backings (paths as configured or added) whose origins are exported, writable; no other
    /// origin is exported.
    #[serde(default)]
    pub writable_origins: Vec<PathBuf>,
    /// NBD connections at once over both listeners; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections at once to one export; more are refused at NBD_OPT_GO (policy).
    #[serde(default = "default_per_export")]
    pub max_connections_per_export: usize,
    /// A connection that sends nothing for this long is closed.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u32,
    /// Largest read or write payload (NBD's own limit: 32 MiB).
    #[serde(default = "default_max_request")]
    pub max_request_bytes: u32,
}

fn yes() -> bool {
    true
}
fn default_max_connections() -> usize {
    64
}
fn default_per_export() -> usize {
    8
}
fn default_idle() -> u32 {
    600
}
fn default_max_request() -> u32 {
    MAX_PAYLOAD_BYTES
}

impl Default for NbdConfig {
    fn default() -> NbdConfig {
        NbdConfig {
            socket: None,
            group_reads: false,
            tcp: None,
            tls: true,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            writable_origins: Vec::new(),
            max_connections: default_max_connections(),
            max_connections_per_export: default_per_export(),
            idle_timeout_secs: default_idle(),
            max_request_bytes: default_max_request(),
        }
    }
}

impl NbdConfig {
    /// Whether any listener is configured.
    pub fn enabled(&self) -> bool {
        self.socket.is_some() || self.tcp.is_some()
    }

    /// The group admitted to the Unix socket besides root: the daemon's `group` only with
    /// `group_reads` (a member reads every image there).
    pub fn unix_group(&self, daemon_group: Option<u32>) -> Option<u32> {
        daemon_group.filter(|_| self.group_reads)
    }

    /// Whether the TCP listener speaks TLS.
    pub fn tcp_tls(&self) -> bool {
        self.tcp.is_some() && self.tls
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.socket.as_ref().is_some_and(|s| !s.is_absolute()) {
            return Err("nbd.socket must be an absolute path".into());
        }
        if let Some(addr) = self.tcp {
            if !self.tls && !addr.ip().is_loopback() {
                return Err(format!(
                    "nbd.tls = false is refused for the non-loopback address {addr}: NBD over \
                     the network needs TLS (tls_cert, tls_key, tls_ca)"
                ));
            }
            if self.tls
                && (self.tls_cert.is_none() || self.tls_key.is_none() || self.tls_ca.is_none())
            {
                return Err("nbd.tcp needs nbd.tls_cert, nbd.tls_key and nbd.tls_ca (client \
                            certificates are verified against the CA), or tls = false on a \
                            loopback address"
                    .into());
            }
        }
        if !(1..=4096).contains(&self.max_connections) {
            return Err("nbd.max_connections must be 1..=4096".into());
        }
        if !(1..=4096).contains(&self.max_connections_per_export) {
            return Err("nbd.max_connections_per_export must be 1..=4096".into());
        }
        if !(1..=86_400).contains(&self.idle_timeout_secs) {
            return Err("nbd.idle_timeout_secs must be 1..=86400".into());
        }
        if !(4096..=MAX_PAYLOAD_BYTES).contains(&self.max_request_bytes) {
            return Err("nbd.max_request_bytes must be 4096..=33554432 (NBD's 32 MiB)".into());
        }
        for p in &self.writable_origins {
            if !p.is_absolute() {
                return Err(format!("nbd.writable_origins: {} is not absolute", p.display()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NbdConfig, String> {
        let c: NbdConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map(|()| c)
    }

    #[test]
    fn tls_rules() {
        assert!(!parse("").unwrap().enabled());
        assert!(parse("tcp = \"0.0.0.0:10809\"").unwrap_err().contains("tls_cert"));
        let e = parse("tcp = \"0.0.0.0:10809\"\ntls = false").unwrap_err();
        assert!(e.contains("non-loopback"), "{e}");
        let c = parse("tcp = \"127.0.0.1:10809\"\ntls = false").unwrap();
        assert!(c.enabled() && !c.tcp_tls());
        assert!(parse("tcp = \"[::1]:10809\"\ntls = false").is_ok());
        let c = parse(
            "tcp = \"192.0.2.1:10809\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\ntls_ca = \"/a\"",
        )
        .unwrap();
        assert!(c.tcp_tls());
    }

    #[test]
    fn the_group_reads_images_only_when_asked() {
        assert_eq!(parse("").unwrap().unix_group(Some(34)), None, "root only by default");
        assert_eq!(parse("group_reads = true").unwrap().unix_group(Some(34)), Some(34));
        assert_eq!(parse("group_reads = true").unwrap().unix_group(None), None);
    }

    #[test]
    fn limits() {
        assert!(parse("max_request_bytes = 67108864").is_err());
        assert!(parse("max_request_bytes = 1024").is_err());
        assert!(parse("max_connections = 0").is_err());
        assert!(parse("max_connections_per_export = 0").is_err());
        assert!(parse("idle_timeout_secs = 0").is_err());
        assert!(parse("socket = \"rel\"").is_err());
        assert!(parse("writable_origins = [\"rel.img\"]").is_err());
        assert!(parse("unknown = 1").is_err());
        assert_eq!(parse("").unwrap(), NbdConfig::default());
    }
}
