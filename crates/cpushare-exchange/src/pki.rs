//! The exchange's certificate authority and the nodes' identities.
//!
//! One CA per exchange signs the exchange's own server certificate and one
//! certificate per enrolled node. A node makes its key locally and sends only a
//! signing request, so its private key never leaves it. Nodes are recognised by
//! the SHA-256 fingerprint of their certificate, which the exchange records at
//! enrollment; revoking a node removes that fingerprint from the set it trusts.

use std::path::Path;

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// SHA-256 of a certificate's DER, as colon-separated hex (what users compare).
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// Normalises a fingerprint typed by a user (any case, with or without colons).
pub fn normalise_fingerprint(s: &str) -> anyhow::Result<String> {
    let hex: String = s.chars().filter(|c| !matches!(c, ':' | ' ' | '-')).collect::<String>().to_uppercase();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("{s:?} is not a SHA-256 fingerprint (expected 64 hex digits, colons optional)");
    }
    Ok(hex.as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(":"))
}

/// The exchange's certificate authority.
pub struct Authority {
    cert: CertificateDer<'static>,
    key: KeyPair,
}

impl Authority {
    /// A fresh CA named after the exchange.
    pub fn create(name: &str) -> anyhow::Result<Authority> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(&format!("{name} certificate authority"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key)?;
        Ok(Authority { cert: cert.der().clone(), key })
    }

    pub fn load(dir: &Path) -> anyhow::Result<Authority> {
        let cert = read_pem_cert(&dir.join("ca.crt"))?;
        let key_pem = std::fs::read_to_string(dir.join("ca.key")).with_context(|| format!("reading {}", dir.join("ca.key").display()))?;
        Ok(Authority { cert, key: KeyPair::from_pem(&key_pem)? })
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        write_private(&dir.join("ca.key"), &self.key.serialize_pem())?;
        std::fs::write(dir.join("ca.crt"), pem("CERTIFICATE", &self.cert))?;
        Ok(())
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// A secret of this exchange's own, for `purpose`, that lasts as long as its CA.
    pub fn derived_secret(&self, purpose: &str) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"cpushare derived secret\0");
        h.update(purpose.as_bytes());
        h.update(b"\0");
        h.update(self.key.serialize_der());
        h.finalize().into()
    }

    fn issuer(&self) -> anyhow::Result<Issuer<'_, &KeyPair>> {
        Ok(Issuer::from_ca_cert_der(&self.cert, &self.key)?)
    }

    /// The exchange's own certificate, valid for `names` (host names or IP addresses).
    pub fn issue_server(&self, names: &[String]) -> anyhow::Result<Identity> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = dn("cpushare exchange");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(Identity { cert: cert.der().clone(), key_pkcs8: key.serialize_der() })
    }

    /// Signs a node's request. Whatever subject the request asks for, the
    /// certificate names the node by number: identity comes from the exchange.
    pub fn sign_node(&self, csr_der: &[u8], node: u64) -> anyhow::Result<CertificateDer<'static>> {
        let mut csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .context("the certificate signing request is malformed or its signature is invalid")?;
        csr.params.distinguished_name = dn(&format!("cpushare node {node}"));
        csr.params.subject_alt_names = vec![SanType::URI(format!("cpushare:node:{node}").try_into()?)];
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        Ok(csr.signed_by(&self.issuer()?)?.der().clone())
    }
}

/// A certificate and its private key (PKCS#8 DER).
#[derive(Clone)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key_pkcs8: Vec<u8>,
}

impl Identity {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    pub fn load(dir: &Path, stem: &str) -> anyhow::Result<Identity> {
        let cert = read_pem_cert(&dir.join(format!("{stem}.crt")))?;
        let key_path = dir.join(format!("{stem}.key"));
        let key_pem = std::fs::read_to_string(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem).with_context(|| format!("{} holds no usable key", key_path.display()))?;
        Ok(Identity { cert, key_pkcs8: key.serialize_der() })
    }

    pub fn save(&self, dir: &Path, stem: &str) -> anyhow::Result<()> {
        write_private(&dir.join(format!("{stem}.key")), &pem("PRIVATE KEY", &self.key_pkcs8))?;
        std::fs::write(dir.join(format!("{stem}.crt")), pem("CERTIFICATE", &self.cert))?;
        Ok(())
    }

    /// Signs a statement of kind `what` (see [`verify_statement`]).
    pub fn sign_statement(&self, what: &str, statement: &[u8]) -> anyhow::Result<Vec<u8>> {
        use rcgen::SigningKey;
        let key = KeyPair::try_from(self.key_pkcs8.as_slice())?;
        Ok(key.sign(&signed_bytes(what, statement))?)
    }
}

/// What a statement's signature covers: its kind, then the statement. The
/// node key also signs TLS handshakes; the prefix keeps a signature made for
/// one purpose from being passed off as the other.
fn signed_bytes(what: &str, statement: &[u8]) -> Vec<u8> {
    let mut m = format!("cpushare signed statement: {what}\0").into_bytes();
    m.extend_from_slice(statement);
    m
}

/// Checks a node's signed statement: `certificate` must be issued by `ca` to
/// node `node` and `signature` must be its key's over (`what`, `statement`).
/// The error says which check failed.
pub fn verify_statement(ca: &CertificateDer<'_>, certificate: &[u8], node: u64, what: &str, statement: &[u8], signature: &[u8]) -> Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| format!("the exchange's CA certificate is unusable: {e}"))?;
    let der = CertificateDer::from(certificate);
    let cert = webpki::EndEntityCert::try_from(&der).map_err(|e| format!("the signer's certificate is malformed: {e}"))?;
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms.all;
    cert.verify_for_usage(algs, &[anchor], &[], rustls::pki_types::UnixTime::now(), webpki::KeyUsage::client_auth(), None, None)
        .map_err(|e| format!("the signer's certificate is not one the exchange's CA issued: {e}"))?;
    let named = node_of(certificate).ok_or("the signer's certificate names no cpushare node")?;
    if named != node {
        return Err(format!("signed by node {named}, not by node {node}"));
    }
    cert.verify_signature(webpki::ring::ECDSA_P256_SHA256, &signed_bytes(what, statement), signature)
        .map_err(|_| "the signature does not match the statement: it was altered or signed by another key".to_string())
}

/// The node a certificate names (its `cpushare:node:N` URI), as [`Authority::sign_node`] writes it.
pub fn node_of(certificate: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(certificate).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix("cpushare:node:")?.parse().ok(),
        _ => None,
    })
}

/// A node's new key and the signing request for it.
pub fn node_request(node_name: &str) -> anyhow::Result<(KeyPair, Vec<u8>)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(node_name);
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

pub fn pem(tag: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

pub fn read_pem_cert(path: &Path) -> anyhow::Result<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path).with_context(|| format!("reading the certificate {}", path.display()))
}

/// Writes a secret readable by its owner only.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_is_signed_by_the_ca_and_names_the_node() {
        let ca = Authority::create("test").unwrap();
        let (_key, csr) = node_request("laptop").unwrap();
        let cert = ca.sign_node(&csr, 42).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
        assert_eq!(parsed.subject().to_string(), "CN=cpushare node 42");
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        parsed.verify_signature(Some(ca_parsed.public_key())).unwrap();
        assert_eq!(fingerprint(&cert).len(), 95);
    }

    #[test]
    fn a_signed_statement_verifies_only_as_it_was_signed() {
        let ca = Authority::create("test").unwrap();
        let (key, csr) = node_request("seller").unwrap();
        let id = Identity { cert: ca.sign_node(&csr, 7).unwrap(), key_pkcs8: key.serialize_der() };
        assert_eq!(node_of(&id.cert), Some(7));
        let sig = id.sign_statement("vm", b"booted abc").unwrap();
        verify_statement(ca.cert_der(), &id.cert, 7, "vm", b"booted abc", &sig).unwrap();
        let e = verify_statement(ca.cert_der(), &id.cert, 7, "vm", b"booted abd", &sig).unwrap_err();
        assert!(e.contains("does not match the statement"), "{e}");
        let e = verify_statement(ca.cert_der(), &id.cert, 7, "other", b"booted abc", &sig).unwrap_err();
        assert!(e.contains("does not match the statement"), "another kind of statement: {e}");
        let e = verify_statement(ca.cert_der(), &id.cert, 8, "vm", b"booted abc", &sig).unwrap_err();
        assert!(e.contains("not by node 8"), "{e}");
        // The same node number from another CA is not the exchange's node.
        let other = Authority::create("other").unwrap();
        let (key2, csr2) = node_request("impostor").unwrap();
        let forged = Identity { cert: other.sign_node(&csr2, 7).unwrap(), key_pkcs8: key2.serialize_der() };
        let sig2 = forged.sign_statement("vm", b"booted abc").unwrap();
        let e = verify_statement(ca.cert_der(), &forged.cert, 7, "vm", b"booted abc", &sig2).unwrap_err();
        assert!(e.contains("not one the exchange's CA issued"), "{e}");
        assert!(verify_statement(ca.cert_der(), b"junk", 7, "vm", b"x", &sig).unwrap_err().contains("malformed"));
    }

    #[test]
    fn garbage_is_not_a_signing_request() {
        let ca = Authority::create("test").unwrap();
        let err = ca.sign_node(b"not a csr", 1).unwrap_err().to_string();
        assert!(err.contains("malformed"), "{err}");
    }

    #[test]
    fn fingerprints_are_normalised() {
        let f = fingerprint(b"x");
        assert_eq!(normalise_fingerprint(&f.replace(':', "").to_lowercase()).unwrap(), f);
        assert!(normalise_fingerprint("12:34").is_err());
    }

    #[test]
    fn the_authority_survives_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::create("test").unwrap();
        ca.save(dir.path()).unwrap();
        let again = Authority::load(dir.path()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        let (_k, csr) = node_request("n").unwrap();
        again.sign_node(&csr, 1).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the CA key is private");
    }
}
