//! A node's side: its configuration directory (the exchange's URL and CA, its
//! own key and certificate) and enrollment.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cpushare_proto::v1 as pb;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::client::{connect, Connection, Trust};
use crate::pki::{fingerprint, node_request, pem, read_pem_cert, Identity};

/// What `node.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeFile {
    exchange: String,
    ca_fingerprint: String,
    account: u64,
    node: u64,
}

/// An enrolled node.
pub struct NodeConfig {
    pub dir: PathBuf,
    pub url: String,
    pub ca: CertificateDer<'static>,
    pub identity: Identity,
    pub account: u64,
    pub node: u64,
}

/// Where a node keeps its identity: `--config`, `$CPUSHARE_CONFIG`, or
/// `$XDG_CONFIG_HOME/cpushare` (`~/.config/cpushare`).
pub fn default_config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CPUSHARE_CONFIG") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("cpushare")
}

impl NodeConfig {
    pub fn load(dir: &Path) -> anyhow::Result<NodeConfig> {
        let file = dir.join("node.json");
        let text = std::fs::read_to_string(&file).map_err(|_| {
            anyhow::anyhow!(
                "this machine is not enrolled ({} is missing): run `cpushare enroll --exchange URL --token TOKEN` first, \
                 or point --config at the directory of an enrolled node",
                file.display()
            )
        })?;
        let f: NodeFile = serde_json::from_str(&text).with_context(|| format!("{} is damaged", file.display()))?;
        let ca = read_pem_cert(&dir.join("ca.crt"))?;
        if fingerprint(&ca) != f.ca_fingerprint {
            bail!("{}: ca.crt does not match the fingerprint pinned at enrollment", dir.display());
        }
        Ok(NodeConfig { dir: dir.to_path_buf(), url: f.exchange, ca, identity: Identity::load(dir, "node")?, account: f.account, node: f.node })
    }

    pub fn save(&self) -> anyhow::Result<()> {
        create_private_dir(&self.dir)?;
        self.identity.save(&self.dir, "node")?;
        std::fs::write(self.dir.join("ca.crt"), pem("CERTIFICATE", &self.ca))?;
        let f = NodeFile { exchange: self.url.clone(), ca_fingerprint: fingerprint(&self.ca), account: self.account, node: self.node };
        std::fs::write(self.dir.join("node.json"), serde_json::to_string_pretty(&f)? + "\n")?;
        Ok(())
    }

    pub async fn connect(&self) -> anyhow::Result<Connection> {
        connect(&self.url, Trust::Ca(self.ca.clone()), Some(&self.identity)).await
    }
}

/// Enrolls this machine: makes a key here, sends only a signing request with the
/// one-time token, and saves the certificate and the exchange's CA in `dir`.
/// With `pin`, the exchange must present a CA with that fingerprint.
pub async fn enroll(url: &str, token: &str, pin: Option<String>, dir: &Path, node_name: &str) -> anyhow::Result<NodeConfig> {
    if dir.join("node.json").exists() {
        bail!("{} already holds an enrolled node; use another --config directory, or remove it first", dir.display());
    }
    let trust = match pin {
        Some(f) => Trust::Fingerprint(crate::pki::normalise_fingerprint(&f)?),
        None => Trust::FirstUse,
    };
    let mut conn = connect(url, trust, None).await?;
    let (key, csr) = node_request(node_name)?;
    let reply = conn
        .exchange
        .enroll(pb::EnrollRequest { token: token.trim().to_string(), csr_der: csr, node_name: node_name.to_string() })
        .await
        .map_err(|s| anyhow::anyhow!("enrollment refused: {}", s.message()))?
        .into_inner();
    let ca = CertificateDer::from(reply.ca_certificate_der);
    let seen = conn.seen_ca.lock().unwrap().clone();
    if seen.as_deref() != Some(fingerprint(&ca).as_str()) {
        bail!("the exchange sent a CA that is not the one it presented on the connection; refusing it");
    }
    let config = NodeConfig {
        dir: dir.to_path_buf(),
        url: url.to_string(),
        ca,
        identity: Identity { cert: CertificateDer::from(reply.certificate_der), key_pkcs8: key.serialize_der() },
        account: reply.account,
        node: reply.node,
    };
    config.save()?;
    Ok(config)
}

pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))
}
