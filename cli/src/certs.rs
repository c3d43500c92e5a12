//! Development certificates for a topology: one CA, a server certificate for
//! each region (for its `tls_name`) and a client certificate for each edge.
//! Production deployments issue these from their own PKI; the layout is the
//! same.
//!
//! ```text
//! <out>/ca.pem  ca.key
//! <out>/regions/<region>.pem  <region>.key
//! <out>/edges/<edge>.pem  <edge>.key
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use earshot_common::topology::Topology;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Paths of one node's certificate and key.
#[derive(Debug, Clone)]
pub struct NodeCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn ca_path(out: &Path) -> PathBuf {
    out.join("ca.pem")
}

pub fn region_cert(out: &Path, region: &str) -> NodeCert {
    NodeCert {
        cert: out.join("regions").join(format!("{region}.pem")),
        key: out.join("regions").join(format!("{region}.key")),
    }
}

pub fn edge_cert(out: &Path, edge: &str) -> NodeCert {
    NodeCert {
        cert: out.join("edges").join(format!("{edge}.pem")),
        key: out.join("edges").join(format!("{edge}.key")),
    }
}

/// Writes a fresh CA and certificates for every region and edge.
pub fn generate(topology: &Topology, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out.join("regions"))?;
    std::fs::create_dir_all(out.join("edges"))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "earshot development CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    write(&ca_path(out), &ca.pem(), false)?;

    for region in topology.regions() {
        let paths = region_cert(out, &region.name);
        leaf(
            &ca,
            &region.tls_name,
            ExtendedKeyUsagePurpose::ServerAuth,
            &paths,
        )
        .with_context(|| format!("certificate for region {}", region.name))?;
    }
    for edge in topology.edges() {
        let paths = edge_cert(out, &edge.name);
        leaf(&ca, &edge.name, ExtendedKeyUsagePurpose::ClientAuth, &paths)
            .with_context(|| format!("certificate for edge {}", edge.name))?;
    }
    Ok(())
}

fn leaf(
    ca: &CertifiedIssuer<'_, KeyPair>,
    name: &str,
    usage: ExtendedKeyUsagePurpose,
    paths: &NodeCert,
) -> anyhow::Result<()> {
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    write(&paths.cert, &cert.pem(), false)?;
    write(&paths.key, &key.serialize_pem(), true)?;
    Ok(())
}

fn write(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
