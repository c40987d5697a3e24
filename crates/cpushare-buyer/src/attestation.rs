//! Checking what a seller says it booted. A VM node is trusted only when its
//! seller's signed statement names this lease, the buyer's own image (and,
//! for a direct boot, the kernel, initrd and command line the buyer finds in
//! that image itself), and is signed by a node certificate that the exchange's
//! CA issued to the lease's seller node.

use cpushare_exchange::job::VM_BOOT_STATEMENT;
use cpushare_exchange::pki::verify_statement;
use cpushare_proto::v1 as pb;
use cpushare_sandbox::vm::boot::direct_boot;
use prost::Message;
use rustls::pki_types::CertificateDer;

/// What the buyer's own image holds: what every node must have booted.
#[derive(Debug, Clone)]
pub struct Expected {
    pub image_sha256: [u8; 32],
    /// The direct-boot entry: kernel and initrd digests and the command line
    /// (None when the image boots only through the BIOS).
    pub direct: Option<([u8; 32], Option<[u8; 32]>, String)>,
}

impl Expected {
    /// Reads the image's boot entry the way a seller does.
    pub fn of(iso: &std::path::Path, image_sha256: [u8; 32]) -> Expected {
        let direct = direct_boot(iso).ok().map(|d| {
            let (kernel, initrd) = d.digests();
            (kernel, initrd, d.cmdline)
        });
        Expected { image_sha256, direct }
    }
}

/// A statement that checked out: what the node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    pub boot: String,
    pub accel: String,
    pub qemu_version: String,
}

impl std::fmt::Display for Attested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "verified: your image, {} boot, {}, {}", self.boot, self.accel, self.qemu_version)
    }
}

/// Checks a node's attestation; the error says what did not match.
pub fn check(ca: &CertificateDer<'_>, seller_node: u64, lease: u64, expected: &Expected, attestation: Option<&pb::VmAttestation>) -> Result<Attested, String> {
    let a = attestation.ok_or("the seller sent no attestation")?;
    verify_statement(ca, &a.certificate, seller_node, VM_BOOT_STATEMENT, &a.statement, &a.signature)?;
    let s = pb::VmStatement::decode(a.statement.as_slice()).map_err(|e| format!("the statement is malformed: {e}"))?;
    if s.lease != lease {
        return Err(format!("the statement is for lease {}, not {lease}", s.lease));
    }
    if s.image_sha256 != expected.image_sha256 {
        return Err("the seller booted another image than yours".into());
    }
    match s.boot.as_str() {
        // The same image through the BIOS runs whatever its boot loader picks: still the buyer's.
        "bios" => {}
        "direct" => {
            let Some((kernel, initrd, cmdline)) = &expected.direct else {
                return Err("the seller claims a direct boot of an image that has no direct boot entry".into());
            };
            if s.kernel_sha256 != kernel.as_slice() || s.initrd_sha256 != initrd.map(|d| d.to_vec()).unwrap_or_default() {
                return Err("the seller booted another kernel or initrd than your image's".into());
            }
            if s.cmdline != *cmdline {
                return Err(format!("the seller booted with the command line {:?}, not your image's {cmdline:?}", s.cmdline));
            }
        }
        other => return Err(format!("unknown boot kind {other:?}")),
    }
    if !matches!(s.accel.as_str(), "kvm" | "tcg") {
        return Err(format!("unknown accelerator {:?}", s.accel));
    }
    Ok(Attested { boot: s.boot, accel: s.accel, qemu_version: s.qemu_version })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpushare_exchange::pki::{node_request, Authority, Identity};

    fn seller(ca: &Authority, node: u64) -> Identity {
        let (key, csr) = node_request("seller").unwrap();
        Identity { cert: ca.sign_node(&csr, node).unwrap(), key_pkcs8: key.serialize_der() }
    }

    fn signed(id: &Identity, s: &pb::VmStatement) -> pb::VmAttestation {
        let statement = s.encode_to_vec();
        let signature = id.sign_statement(VM_BOOT_STATEMENT, &statement).unwrap();
        pb::VmAttestation { statement, signature, certificate: id.cert.to_vec() }
    }

    #[test]
    fn only_a_statement_of_this_lease_image_and_boot_by_its_seller_is_trusted() {
        let ca = Authority::create("test").unwrap();
        let id = seller(&ca, 5);
        let expected = Expected { image_sha256: [1; 32], direct: Some(([2; 32], Some([3; 32]), "console=ttyS0".into())) };
        let good = pb::VmStatement {
            lease: 9,
            image_sha256: vec![1; 32],
            kernel_sha256: vec![2; 32],
            initrd_sha256: vec![3; 32],
            cmdline: "console=ttyS0".into(),
            boot: "direct".into(),
            accel: "tcg".into(),
            qemu_version: "QEMU emulator version 7.2".into(),
        };
        let ok = check(ca.cert_der(), 5, 9, &expected, Some(&signed(&id, &good))).unwrap();
        assert_eq!(ok.to_string(), "verified: your image, direct boot, tcg, QEMU emulator version 7.2");

        let refused = |s: pb::VmStatement, node: u64| check(ca.cert_der(), node, 9, &expected, Some(&signed(&id, &s))).unwrap_err();
        assert!(refused(pb::VmStatement { lease: 8, ..good.clone() }, 5).contains("not 9"));
        assert!(refused(pb::VmStatement { image_sha256: vec![0; 32], ..good.clone() }, 5).contains("another image"));
        assert!(refused(pb::VmStatement { kernel_sha256: vec![0; 32], ..good.clone() }, 5).contains("another kernel"));
        assert!(refused(pb::VmStatement { initrd_sha256: vec![], ..good.clone() }, 5).contains("another kernel or initrd"));
        assert!(refused(pb::VmStatement { cmdline: "init=/bin/evil".into(), ..good.clone() }, 5).contains("command line"));
        assert!(refused(good.clone(), 6).contains("not by node 6"), "a statement by another seller node");
        let bios = pb::VmStatement { boot: "bios".into(), kernel_sha256: vec![], initrd_sha256: vec![], cmdline: String::new(), ..good.clone() };
        assert_eq!(check(ca.cert_der(), 5, 9, &expected, Some(&signed(&id, &bios))).unwrap().boot, "bios");

        // A statement altered after signing, or none at all.
        let mut tampered = signed(&id, &good);
        let last = tampered.statement.len() - 1;
        tampered.statement[last] ^= 1;
        assert!(check(ca.cert_der(), 5, 9, &expected, Some(&tampered)).unwrap_err().contains("does not match"));
        assert!(check(ca.cert_der(), 5, 9, &expected, None).unwrap_err().contains("no attestation"));
        // A node certificate from another CA, even naming the right node.
        let other = Authority::create("elsewhere").unwrap();
        let forged = signed(&seller(&other, 5), &good);
        assert!(check(ca.cert_der(), 5, 9, &expected, Some(&forged)).unwrap_err().contains("not one the exchange's CA issued"));
    }
}
